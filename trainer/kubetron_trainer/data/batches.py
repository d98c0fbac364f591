"""Training batches: deterministic mock tokens or Megatron indexed datasets, sharded by dp rank.

Every sample has a global index, and the index of each sample in each micro-batch is a pure
function of (consumed samples, micro-batch, dp rank) laid out as Megatron's pretraining sampler
does: step s reads the global batch of samples [consumed, consumed + globalBatchSize), cut into
micro-batch rows of `micro_batch * dp` samples, dp rank r taking its slice of each row. The
data position is the consumed-samples count a checkpoint records (step x globalBatchSize while
the global batch stays the same): a resumed run, with this or any other dp size, reads exactly
the samples an uninterrupted run of its shape would read from that step on, and no sampler
state needs saving. Only the first
and last pipeline stages read data (tokens feed the embedding, labels the loss); the others get
`None` micro-batches. Indexed datasets go through Megatron-Core's `BlendedMegatronDatasetBuilder`
and `GPTDataset`, so blends, splits and the index caches are Megatron's own; the caches go
beside the data as Megatron puts them, or under the checkpoint path where the data's volume is
read-only (`index_cache`).

With `recipe.eval` a second `Batches` reads the validation split (`build_data`): the same
layout, from sample 0 of that split at every evaluation, so each evaluation scores the same
samples, each dp rank its own (`split_indices` gives both splits' indices of a rank). Indexed
data's validation split is Megatron's (the builder's second size), chat and preference data's
the conversations or pairs after the train split's, mock data's a random stream of its own
(its sequences follow the same rule, so they measure the rule learned, not held-out text).

For DPO (recipe dpo: `data.type: preference`, or mock pairs) a sample is a pair, so batch sizes
count pairs; a micro-batch of k pairs is laid out as 2k rows, the k chosen sequences first, then
the k rejected ones in the same order (TRL's concatenated forward), and `Batch.index` holds the
pairs' global sample indices.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from kubetron_api.config import DataSpec, RecipeSpec, TrainerConfig
from kubetron_api.exitcodes import ConfigError
from kubetron_api.files import unreadable
from kubetron_trainer.data.chat import LOSS_MASK
from kubetron_trainer.data.packing import ChatDataset, block_causal_mask
from kubetron_trainer.data.pairs import check_marker
from kubetron_trainer.data.preference import PreferenceDataset, pair_sample
from kubetron_trainer.data.tokenizer import Tokenizer, check_for_model
from kubetron_trainer.models.megatron_config import padded_vocab_size

log = logging.getLogger(__name__)
INDEX_CACHE = "data-cache"  # under checkpoint.path, where the data's own directory is read-only


class SampleSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Batch:
    """One micro-batch, `[micro_batch, seq]` each (preference pairs: `[2 * micro_batch, seq]`,
    chosen rows first), on the training device."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    # packed conversations (data.type chat): `[micro_batch, 1, seq, seq]`, True = masked
    attention_mask: torch.Tensor | None = None
    # preference pairs: the global sample indices of the micro-batch's pairs, `[k]` (long)
    index: torch.Tensor | None = None
    # what another model of the job computed for these rows (a reference's log-probabilities,
    # a teacher's logits), attached on the way to the trained model's loss
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


# Mock data's split part p > 0 draws from generators seeded by (seed, index, MOCK_PART + p).
MOCK_PART = 1000


class MockDataset:
    """Learnable, deterministic sequences: `(start + stride * t) % vocab` per sample.

    Start and stride come from a generator seeded by (seed, index), so any rank can produce any
    sample, and a model that learns the rule drives the loss well below `ln(vocab)`. The
    validation split (`part` 1) seeds by (seed, index, MOCK_PART + 1): a stream of its own.
    """

    def __init__(
        self, vocab_size: int, seq_length: int, num_samples: int, seed: int, part: int = 0
    ) -> None:
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.seed = seed
        self.part = part

    def __len__(self) -> int:
        return self.num_samples

    def entropy(self, idx: int) -> list[int]:
        """The seed of sample `idx`'s generator."""
        return [self.seed, idx] + ([MOCK_PART + self.part] if self.part else [])

    def sequence(self, idx: int) -> np.ndarray:
        """Sample `idx`'s `seq_length + 1` tokens."""
        rng = np.random.default_rng(self.entropy(idx))
        start, stride = int(rng.integers(self.vocab_size)), int(rng.integers(1, 8))
        return (start + stride * np.arange(self.seq_length + 1)) % self.vocab_size

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        seq = torch.from_numpy(self.sequence(idx)).long()
        return {
            "tokens": seq[:-1],
            "labels": seq[1:],
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }


class MockPreferenceDataset(MockDataset):
    """Deterministic pairs (`data.type: mock`, recipe dpo): the first half of a `MockDataset`
    sequence is the prompt both rows share; the chosen row continues it by the learnable rule,
    the rejected row with random tokens (a generator seeded by (seed, index, 1)). The loss is on
    the continuation only, so a policy that learns the rule prefers the chosen rows."""

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        chosen = self.sequence(idx)
        prompt = len(chosen) // 2
        rejected = chosen.copy()
        rng = np.random.default_rng([*self.entropy(idx), 1])
        rejected[prompt:] = rng.integers(self.vocab_size, size=len(chosen) - prompt)
        mask = (np.arange(len(chosen)) >= prompt).astype(np.float32)
        return pair_sample((chosen, rejected), (mask, mask), self.seq_length, pad=0)


# Megatron's pad id for "no padding in the data" (megatron.core.datasets.megatron_dataset).
NO_PAD = -1


@dataclass(frozen=True)
class DatasetTokenizer:
    """What Megatron's GPTDataset reads from a tokenizer. A pad token equal to EOD (Qwen3's
    base tokenizer has one) becomes Megatron's "no pad" id: masking it would hide every EOD from
    the loss, so Megatron would warn and drop it anyway."""

    eod: int
    pad: int
    vocab_size: int
    unique_identifiers: dict[str, object]

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> DatasetTokenizer:
        eod, pad = tokenizer.eod, tokenizer.pad
        assert eod is not None and pad is not None  # check_indexed_data refused it otherwise
        return cls(
            eod, NO_PAD if pad == eod else pad, tokenizer.vocab_size, tokenizer.unique_identifiers
        )


def check_indexed_data(cfg: TrainerConfig) -> Tokenizer:
    """What the trainer checks at start, before it joins the job, for `data.type: indexed`,
    `chat` and `preference`: every dataset's files exist (a chat or preference dataset's loss
    mask too, and a preference dataset's pairs marker), and the tokenizer loads, fits the model's
    padded vocabulary and has EOD and pad tokens. Raises ConfigError naming the field; returns
    the tokenizer."""
    data = cfg.data
    suffixes = [".bin", ".idx"]
    if data.type != "indexed":
        suffixes += [LOSS_MASK + ".bin", LOSS_MASK + ".idx"]
    for i, path in enumerate(data.paths):
        for suffix in suffixes:
            file = Path(path.prefix + suffix)
            if not file.is_file():
                how = "prepare it with kubetron-prepare-data" + (
                    "" if data.type == "indexed" else f" --{data.type}"
                )
                raise ConfigError(
                    f"data.paths[{i}].prefix",
                    f"{file} does not exist; give the prefix of a dataset "
                    f"(PREFIX{', PREFIX'.join(suffixes)}), {how}",
                )
            if problem := unreadable(file):
                raise ConfigError(f"data.paths[{i}].prefix", problem)
        if data.type == "preference":
            check_marker(path.prefix, f"data.paths[{i}].prefix")
    if data.type == "indexed":
        check_split(data)
    padded = padded_vocab_size(cfg.model.vocab_size, cfg.parallelism.tensor)
    return check_for_model(data.tokenizer, cfg.model.vocab_size, padded)


def check_split(data: DataSpec) -> None:
    """Megatron-Core builds every part of `data.split` whose weight is not 0, and loops for ever
    on a part that gets none of a dataset's sequences (a small share of a small dataset, rounded
    as Megatron rounds it): refused here, naming the part."""
    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(data.split))
    for i, path in enumerate(data.paths):
        n = IndexedDataset(path.prefix).sequence_lengths.shape[0]
        for part, share in zip(("train", "validation", "test"), bounds, strict=True):
            if share is not None and round(share[0] * n) == round(share[1] * n):
                raise ConfigError(
                    "data.split",
                    f"{data.split} gives the {part} part none of the {n} sequences of "
                    f"data.paths[{i}] ({path.prefix}), and Megatron-Core cannot build an empty "
                    f"part: give the {part} part a larger weight or 0, or use more data",
                )


def chat_dataset(
    cfg: TrainerConfig, num_samples: int, part: int = 0
) -> ChatDataset | PreferenceDataset:
    """Packed conversations (`data.type: chat`) or preference pairs (`preference`) of split part
    `part` (0 train, 1 validation), padded with the tokenizer's pad token."""
    tokenizer = check_indexed_data(cfg)
    assert tokenizer.pad is not None  # check_indexed_data refused it otherwise
    dataset = PreferenceDataset if cfg.data.type == "preference" else ChatDataset
    return dataset(
        cfg.data.paths[0].prefix, seq_length=cfg.recipe.seq_length, num_samples=num_samples,
        seed=cfg.recipe.seed, split=cfg.data.split, pad=tokenizer.pad, part=part,
    )  # fmt: skip


def indexed_dataset(cfg: TrainerConfig, num_samples: int, reads_data: bool) -> GPTDataset | None:
    """The training split of the configured blend (`indexed_datasets`)."""
    return indexed_datasets(cfg, num_samples, 0, reads_data)[0]


def indexed_datasets(
    cfg: TrainerConfig, num_samples: int, num_valid: int, reads_data: bool
) -> tuple[GPTDataset | None, GPTDataset | None]:
    """The training and validation splits of the configured blend (`num_valid` samples: 0 builds
    none), built by Megatron-Core (collective: every rank of the job must call this; ranks that
    read no data get None)."""
    data = cfg.data
    tokenizer = check_indexed_data(cfg)
    log.info(
        "indexed data: %d dataset(s), %s (%d tokens, EOD %s, pad %s)",
        len(data.paths), tokenizer.describe(), tokenizer.vocab_size, tokenizer.eod, tokenizer.pad,
    )  # fmt: skip
    config = GPTDatasetConfig(
        random_seed=cfg.recipe.seed,
        sequence_length=cfg.recipe.seq_length,
        blend=([p.prefix for p in data.paths], [p.weight for p in data.paths]),
        split=data.split,
        tokenizer=DatasetTokenizer.of(tokenizer),  # type: ignore[arg-type]  # duck-typed
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=index_cache(cfg),
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, num_valid, 0], lambda: reads_data, config
    )
    train, valid, _ = builder.build()
    return train, (valid if num_valid else None)


def index_cache(cfg: TrainerConfig) -> str | None:
    """Where Megatron-Core keeps the index caches (each dataset's document, sample and shuffle
    order) that global rank 0 writes and every rank reading data loads: None, Megatron's own
    place (beside each dataset), while every dataset's directory can be written; else
    INDEX_CACHE under `checkpoint.path`, a volume every pod shares and writes. Raises
    ConfigError when neither can be written. Every rank decides alike: its pods mount the same
    volumes."""
    read_only = [i for i, p in enumerate(cfg.data.paths) if not _writable(Path(p.prefix).parent)]
    if not read_only:
        return None
    ckpt = cfg.checkpoint.path
    if ckpt is not None and _writable(Path(ckpt)):
        cache = Path(ckpt) / INDEX_CACHE
        log.info("indexed data: read-only, so its index caches go to %s", cache)
        return str(cache)
    i = read_only[0]
    raise ConfigError(
        f"data.paths[{i}].prefix",
        f"{Path(cfg.data.paths[i].prefix).parent} is read-only and Megatron-Core writes the "
        "dataset's index cache beside it: mount the data writable, or set checkpoint.path on a "
        f"writable volume (the cache then goes to <checkpoint.path>/{INDEX_CACHE})",
    )


def _writable(path: Path) -> bool:
    """Whether `path`, or the nearest existing directory above it, can be written (a read-only
    mount cannot, even by root)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK)


class Batches:
    """This rank's micro-batches of each step, from a global-index `SampleSource`."""

    def __init__(
        self,
        source: SampleSource | None,
        *,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        device: torch.device,
        on_wait: Callable[[float], None] | None = None,
        start_step: int = 0,
        start_sample: int = 0,
    ) -> None:
        self.source = source
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.device = device
        self.on_wait = on_wait
        self.start_step = start_step  # a resumed run's first step (0-based) ...
        self.start_sample = start_sample  # ... and the samples consumed before it

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def consumed(self, step: int) -> int:
        """Samples read before step `step` (0-based): the data position a checkpoint records."""
        return self.start_sample + (step - self.start_step) * self.global_batch

    def indices(self, step: int, micro: int) -> list[int]:
        """Global sample indices of micro-batch `micro` of step `step` (0-based) on this rank."""
        first = self.consumed(step) + micro * self.micro_batch * self.dp_size
        first += self.dp_rank * self.micro_batch
        return list(range(first, first + self.micro_batch))

    def samples(self, steps: range) -> list[int]:
        """The global sample indices this rank reads in `steps`, in reading order."""
        micro = range(self.num_micro_batches)
        return [i for s in steps for m in micro for i in self.indices(s, m)]

    def step(self, step: int) -> list[Batch | None]:
        """The micro-batches of one optimizer step; None on ranks that read no data."""
        start = time.perf_counter()
        if self.source is None:
            return [None] * self.num_micro_batches
        out: list[Batch | None] = [self._batch(step, m) for m in range(self.num_micro_batches)]
        if self.on_wait is not None:
            self.on_wait(time.perf_counter() - start)
        return out

    def _batch(self, step: int, micro: int) -> Batch:
        source = self.source
        assert source is not None
        indices = self.indices(step, micro)
        samples = [source[i % len(source)] for i in indices]
        pairs = samples[0]["tokens"].dim() == 2  # preference: [2, seq] a sample

        def stack(key: str) -> torch.Tensor:
            rows = torch.stack([s[key] for s in samples])
            if pairs:  # [k, 2, seq] -> [2k, seq]: the k chosen rows, then the k rejected ones
                rows = rows.transpose(0, 1).reshape(-1, rows.shape[-1])
            return rows.to(self.device, non_blocking=True)

        mask = block_causal_mask(stack("document_ids")) if "document_ids" in samples[0] else None
        index = torch.tensor(indices, dtype=torch.long, device=self.device) if pairs else None
        return Batch(
            stack("tokens"), stack("labels"), stack("loss_mask"), stack("position_ids"), mask,
            index,
        )  # fmt: skip


@dataclass(frozen=True)
class Data:
    """This rank's batches: the train split's, and the validation split's with `recipe.eval`."""

    train: Batches
    validation: Batches | None = None


def validation_samples(recipe: RecipeSpec) -> int:
    """Samples one evaluation reads: `recipe.eval.iterations` global batches (0 without eval)."""
    return recipe.eval.iterations * recipe.global_batch_size if recipe.eval else 0


def build_data(
    cfg: TrainerConfig,
    *,
    reads_data: bool,
    dp_rank: int,
    dp_size: int,
    device: torch.device,
    on_wait: Callable[[float], None] | None = None,
    start_step: int = 0,
    start_sample: int = 0,
) -> Data:
    """Mock, indexed, chat or preference batches for this rank (collective for indexed data),
    the train split's from sample `start_sample` at step `start_step` (a resumed run's consumed
    samples), the validation split's from its sample 0."""
    gbs = cfg.recipe.global_batch_size
    # train_iters x gbs when the global batch never changed (the dataset, and an indexed one's
    # shuffle, are then the uninterrupted run's)
    num_samples = max(start_sample + max(cfg.recipe.train_iters - start_step, 0) * gbs, gbs)
    num_valid = validation_samples(cfg.recipe)
    train, valid = sources(cfg, num_samples, num_valid, reads_data)
    log.info("data: %s, %s", cfg.data.type, "read on this rank" if reads_data else "not read")
    laid_out = partial(
        Batches, global_batch=gbs, micro_batch=cfg.recipe.micro_batch_size, dp_rank=dp_rank,
        dp_size=dp_size, device=device,
    )  # fmt: skip
    return Data(
        laid_out(train, on_wait=on_wait, start_step=start_step, start_sample=start_sample),
        laid_out(valid) if num_valid else None,
    )


def build_batches(cfg: TrainerConfig, **layout: Any) -> Batches:
    """The train split's batches of `build_data` (its keywords)."""
    return build_data(cfg, **layout).train


def sources(
    cfg: TrainerConfig, num_samples: int, num_valid: int, reads_data: bool
) -> tuple[SampleSource | None, SampleSource | None]:
    """The train split's `num_samples` samples and the validation split's `num_valid` (0: none);
    None on a rank that reads no data."""
    if cfg.data.type == "indexed":  # collective: every rank builds, or not, together
        return indexed_datasets(cfg, num_samples, num_valid, reads_data)
    if not reads_data:
        return None, None

    def part(p: int, n: int) -> SampleSource:
        if cfg.data.type in ("chat", "preference"):
            return chat_dataset(cfg, n, p)
        mock = MockPreferenceDataset if cfg.recipe.kind == "dpo" else MockDataset
        return mock(cfg.model.vocab_size, cfg.recipe.seq_length, n, cfg.recipe.seed, p)

    return part(0, num_samples), (part(1, num_valid) if num_valid else None)


@dataclass(frozen=True)
class SplitIndices:
    """The samples one dp rank reads, by their index in each split."""

    train: list[int]  # over every step of an uninterrupted run
    validation: list[int]  # in one evaluation (every evaluation reads these)


def split_indices(recipe: RecipeSpec, dp_rank: int, dp_size: int) -> SplitIndices:
    """The sample indices dp rank `dp_rank` of `dp_size` reads of each split, by the
    arithmetic of `Batches` (the two splits hold different documents, mock data different
    streams)."""
    layout = Batches(
        None, global_batch=recipe.global_batch_size, micro_batch=recipe.micro_batch_size,
        dp_rank=dp_rank, dp_size=dp_size, device=torch.device("cpu"),
    )  # fmt: skip
    iterations = recipe.eval.iterations if recipe.eval else 0
    return SplitIndices(
        layout.samples(range(recipe.train_iters)), layout.samples(range(iterations))
    )
