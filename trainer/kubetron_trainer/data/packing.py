"""Supervised fine-tuning batches (`data.type: chat`): conversations packed into sequences.

The data is what `kubetron-prepare-data --chat` writes: PREFIX.bin/.idx (each conversation's
tokens, one document each) and PREFIX.loss_mask.bin/.idx (1 where an assistant wrote the token).
The train split is the first share of the conversations (`data.split`'s first weight, as
Megatron splits documents), the validation split the next share (`recipe.eval` scores it), so
no conversation is in both. Each epoch of a split shuffles its conversations (seeded by
`recipe.seed` and the epoch) and packs them in that order, next-fit, into sequences of
`seqLength + 1` tokens: a conversation goes into the current sequence when it fits, else it
starts the next one, whose tail is padded with the pad token; a conversation longer than a
sequence is cut to one (and counted in the log). Every rank computes the same packing, so
sample `i` is the same everywhere, as Megatron's indices are for pretraining.

Inside a sequence, each token attends only to the earlier tokens of its own conversation (a
block-diagonal causal mask; `Batch.attention_mask`, Megatron's convention: True = masked), its
position ids restart at 0 with each conversation, and the loss is taken where the label is a
token an assistant wrote in the same conversation: never across a boundary, never on padding.
So a packed sequence trains the model exactly as its conversations would one by one.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from kubetron_api.exitcodes import ConfigError
from kubetron_trainer.data.chat import LOSS_MASK

log = logging.getLogger(__name__)


def next_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Bin boundaries of packing items of `lengths` (each <= capacity) in order, next-fit:
    bin `i` holds items `bounds[i]:bounds[i + 1]`."""
    bounds = [0]
    used = 0
    for i, length in enumerate(lengths.tolist()):
        if used + length > capacity:
            bounds.append(i)
            used = 0
        used += length
    bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


# The parts of `data.split`, in its order, and the weight that sizes each.
SPLIT_PARTS = ("train", "validation", "test")
_WEIGHTS = ("first", "second", "third")


def split_documents(count: int, split: str, part: int) -> range:
    """The documents of part `part` of `split` (0 train, 1 validation, 2 test) among `count`:
    consecutive shares of the weights, each bound rounded (the train part's is Megatron's
    rounding of the first share)."""
    weights = [float(w) for w in split.split(",")]
    total = sum(weights)
    bounds = [round(count * sum(weights[:i]) / total) for i in range(len(weights) + 1)]
    return range(bounds[part], bounds[part + 1])


def train_documents(count: int, split: str) -> int:
    """How many conversations (the first ones) the train split holds."""
    return len(split_documents(count, split, 0))


def split_part(count: int, split: str, part: int, what: str) -> range:
    """`split_documents`, refused (naming data.split) where the part is empty."""
    documents = split_documents(count, split, part)
    if not documents:
        raise ConfigError(
            "data.split",
            f"the {SPLIT_PARTS[part]} split ({split}) of {count} {what} is empty; give the "
            f"{_WEIGHTS[part]} weight a larger share",
        )
    return documents


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """`[b, 1, s, s]`, True where query `i` may NOT attend key `j`: another conversation, or
    later (Megatron's attention_mask convention)."""
    s = document_ids.shape[-1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


@dataclass(frozen=True)
class Sample:
    tokens: np.ndarray  # seq_length + 1 token ids, padded
    loss_mask: np.ndarray  # seq_length + 1: 1 where an assistant wrote the token
    document_ids: np.ndarray  # seq_length + 1: conversation number in the sequence (pad: -1)


class ChatDataset:
    """Packed conversations (module docstring) behind the `SampleSource` interface."""

    def __init__(self, prefix: str, *, seq_length: int, num_samples: int, seed: int,
                 split: str, pad: int, field: str = "data.paths[0].prefix",
                 part: int = 0) -> None:  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.tokens = IndexedDataset(prefix)
        self.mask = IndexedDataset(prefix + LOSS_MASK)
        lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)
        if not np.array_equal(lengths, np.asarray(self.mask.sequence_lengths)):
            raise ConfigError(
                field,
                f"{prefix}{LOSS_MASK} does not match {prefix} (other conversations or lengths); "
                "prepare both again with one kubetron-prepare-data --chat run",
            )
        documents = split_part(len(lengths), split, part, "conversations")
        self.first = documents.start  # the part's first document
        self.seq_length = seq_length
        self.capacity = seq_length + 1
        self.pad = pad
        self.seed = seed
        own = lengths[documents.start : documents.stop]
        self.lengths = np.minimum(own, self.capacity)
        cut = int((own > self.capacity).sum())
        self.order = np.empty(0, dtype=np.int64)
        self.bounds = np.zeros(1, dtype=np.int64)
        epochs = 0
        while len(self.bounds) - 1 < num_samples:
            self._pack_epoch(epochs)
            epochs += 1
        tokens = int(self.lengths.sum())
        log.info(
            "chat data%s: %d conversations (%d cut to %d tokens), %d tokens packed into %d "
            "sequences per epoch (%.1f%% padding), %d epoch(s) for %d samples",
            f" ({SPLIT_PARTS[part]} split)" if part else "", len(own), cut, self.capacity, tokens,
            self.per_epoch,
            100 * (1 - tokens / (self.per_epoch * self.capacity)), epochs, num_samples,
        )  # fmt: skip

    def _pack_epoch(self, epoch: int) -> None:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
        bounds = next_fit(self.lengths[order], self.capacity)
        if epoch == 0:
            self.per_epoch = len(bounds) - 1
        self.bounds = np.concatenate([self.bounds, bounds[1:] + len(self.order)])
        self.order = np.concatenate([self.order, order])

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def documents(self, idx: int) -> np.ndarray:
        """The conversations (their document numbers in the dataset) packed into sample `idx`."""
        return self.first + self.order[self.bounds[idx] : self.bounds[idx + 1]]

    def sample(self, idx: int) -> Sample:
        """The packed sequence `idx` (seq_length + 1 tokens)."""
        docs = self.documents(idx)
        tokens = np.full(self.capacity, self.pad, dtype=np.int64)
        mask = np.zeros(self.capacity, dtype=np.int64)
        ids = np.full(self.capacity, -1, dtype=np.int64)
        at = 0
        for number, doc in enumerate(docs.tolist()):
            n = int(self.lengths[doc - self.first])
            tokens[at : at + n] = self.tokens[doc][:n]
            mask[at : at + n] = self.mask[doc][:n]
            ids[at : at + n] = number
            at += n
        return Sample(tokens, mask, ids)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        s = self.sample(idx)
        ids = s.document_ids
        # learn label t+1 where an assistant wrote it in the conversation of token t
        learn = (s.loss_mask[1:] == 1) & (ids[1:] == ids[:-1]) & (ids[:-1] >= 0)
        starts = np.flatnonzero(np.diff(ids[:-1], prepend=ids[0] - 1) != 0)
        positions = np.arange(self.seq_length) - np.repeat(
            starts, np.diff(np.append(starts, self.seq_length))
        )
        return {
            "tokens": torch.from_numpy(s.tokens[:-1]),
            "labels": torch.from_numpy(s.tokens[1:]),
            "loss_mask": torch.from_numpy(learn.astype(np.float32)),
            "position_ids": torch.from_numpy(positions),
            "document_ids": torch.from_numpy(ids[:-1]),
        }
