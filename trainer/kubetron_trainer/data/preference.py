"""Preference batches (`data.type: preference`, recipe dpo): each sample is a pair, its chosen
and its rejected sequence side by side, for the policy and the reference to score.

The data is what `kubetron-prepare-data --preference` writes (`data.pairs`): documents 2i and
2i + 1 are pair i's prompt + chosen and prompt + rejected, PREFIX.loss_mask.bin/.idx marks the
response's tokens, PREFIX.pairs.json says the documents are pairs. The train split is the first
share of the pairs (`data.split`'s first weight, as Megatron splits documents), the validation
split the next share; each epoch of a split visits its pairs in a permutation seeded by
`recipe.seed` and the epoch, so sample `i` is the same pair on every rank. A sample is built
as Megatron builds a GPT sample, once per row: tokens = document[:-1], labels = document[1:],
loss mask = the mask of each label, cut to `seqLength` on the right and padded (labels with the
pad token, loss mask 0). Pairs are never packed: DPO compares a pair's two sequences as wholes.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from kubetron_api.exitcodes import ConfigError
from kubetron_trainer.data.chat import LOSS_MASK
from kubetron_trainer.data.packing import split_part
from kubetron_trainer.data.pairs import NOT_PREFERENCE, check_marker

log = logging.getLogger(__name__)


def pair_sample(
    documents: tuple[np.ndarray, np.ndarray],
    masks: tuple[np.ndarray, np.ndarray],
    seq_length: int,
    pad: int,
) -> dict[str, torch.Tensor]:
    """A pair's two documents (chosen, rejected) and their per-token loss masks as GPT samples,
    `[2, seq_length]` each: row 0 chosen, row 1 rejected."""
    width = seq_length + 1
    tokens = np.full((2, width), pad, dtype=np.int64)
    learned = np.zeros((2, width), dtype=np.float32)
    for row, (doc, mask) in enumerate(zip(documents, masks, strict=True)):
        n = min(len(doc), width)
        tokens[row, :n] = doc[:n]
        learned[row, :n] = mask[:n]
    return {
        "tokens": torch.from_numpy(tokens[:, :-1].copy()),
        "labels": torch.from_numpy(tokens[:, 1:].copy()),
        "loss_mask": torch.from_numpy(learned[:, 1:].copy()),
        "position_ids": torch.arange(seq_length).expand(2, seq_length).clone(),
    }


class PreferenceDataset:
    """Preference pairs (module docstring) behind the `SampleSource` interface."""

    def __init__(self, prefix: str, *, seq_length: int, num_samples: int, seed: int,
                 split: str, pad: int, field: str = "data.paths[0].prefix",
                 part: int = 0) -> None:  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset

        marked = check_marker(prefix, field)
        self.tokens = IndexedDataset(prefix)
        self.mask = IndexedDataset(prefix + LOSS_MASK)
        lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)
        if len(lengths) % 2 or len(lengths) != 2 * marked:
            raise ConfigError(
                field,
                f"{prefix} holds {len(lengths)} documents where {prefix}.pairs.json counts "
                f"{marked} pairs (two documents each): {NOT_PREFERENCE}",
            )
        if not np.array_equal(lengths, np.asarray(self.mask.sequence_lengths)):
            raise ConfigError(
                field,
                f"{prefix}{LOSS_MASK} does not match {prefix} (other documents or lengths); "
                "prepare both again with one kubetron-prepare-data --preference run",
            )
        pairs = split_part(marked, split, part, "pairs")
        count = len(pairs)
        self.seq_length = seq_length
        self.pad = pad
        epochs = -(-num_samples // count)
        self.order = pairs.start + np.concatenate(
            [np.random.default_rng([seed, e]).permutation(count) for e in range(epochs)]
        )
        cut = int((lengths[2 * pairs.start : 2 * pairs.stop] > seq_length + 1).sum())
        log.info(
            "preference data: %d pairs (%d of their sequences cut to %d tokens), %d epoch(s) "
            "for %d samples",
            count, cut, seq_length + 1, epochs, num_samples,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        pair = int(self.order[idx])
        docs = (2 * pair, 2 * pair + 1)
        return pair_sample(
            (self.tokens[docs[0]], self.tokens[docs[1]]),
            (self.mask[docs[0]], self.mask[docs[1]]),
            self.seq_length,
            self.pad,
        )
