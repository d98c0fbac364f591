"""Jobs of several models (recipe dpo, distill): each model's groups, and the frozen models.

Each model (its shape settled by `model_plan`) gets its own `HyperCommGrid`s over its ranks:
every rank of the job (co-located, each model its own grid over the same ranks) or a contiguous
slice. Every rank creates every model's groups, in spec order (group creation is collective over
the job); a rank builds the chunks of the models whose ranks include it. Megatron's global
`parallel_state` holds one shape per process; here each model's Megatron objects get its own
`ProcessGroupCollection`.

The trainable model is built by the training loop like a one-model job's model; the frozen ones
(a reference, a teacher) are built here, loaded from their weights (a Hugging Face directory or
a kubetron checkpoint), and run forward only, without gradients and without optimizer state.
`Recipe` is what a multi-model recipe (`recipes/`) adds to the training loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import Float16Module

from kubetron_trainer.data.batches import Batch
from kubetron_trainer.models.build import ModelChunks, build_model
from kubetron_trainer.runtime.model_plan import ModelStart
from kubetron_trainer.runtime.parallel import (
    GridSpec,
    GroupOptions,
    ParallelGroups,
    build_process_groups_multi,
)
from kubetron_trainer.runtime.step import Objective
from kubetron_trainer.runtime.topology import Topology

log = logging.getLogger(__name__)


class Recipe(Protocol):
    """What a multi-model recipe adds to the training loop of its trained model."""

    objective: Objective  # the trained model's loss
    stats: tuple[str, ...]  # the recipe's own numbers, by name, on every rank

    def begin(self, start_step: int, start_sample: int, resumed: bool) -> tuple[int, int, bool]:
        """The loop starts at `start_step` with `start_sample` samples read (`resumed` from a
        checkpoint). Collective: ranks without the trained model learn these from it; every
        rank gets the trained ranks' values back."""
        ...

    def feed(self, step: int, micro: Sequence[Batch | None]) -> Sequence[Batch | None]:
        """The trained model's micro-batches of `step`, with what the frozen models computed
        for them (possibly lazily, one micro-batch at a time)."""
        ...

    def serve(self, step: int) -> None:
        """A rank that holds no part of the trained model: its frozen models' share of
        `step` (collective with the trained model's `feed`)."""
        ...

    def frozen_flops_per_token(self) -> float:
        """The frozen models' forward FLOPs per token of the trained model's batch."""
        ...

    def spent(self, step_seconds: float) -> dict[str, float]:
        """Seconds each model spent in the last step of `step_seconds` on this rank: the
        frozen models' forward passes, the trained model the rest (and start over)."""
        ...


def build_groups(
    starts: tuple[ModelStart, ...], topology: Topology, backend: str, timeout: timedelta
) -> dict[str, ParallelGroups]:
    """Every model's groups (collective: every rank builds all of them, in spec order)."""
    specs = [
        GridSpec(s.name, s.dims, s.spec.ranks.first, GroupOptions(timeout=timeout)) for s in starts
    ]
    return build_process_groups_multi(specs, topology, backend)


def span_groups(
    starts: tuple[ModelStart, ...], topology: Topology, backend: str, timeout: timedelta
) -> dict[str, dist.ProcessGroup | None]:
    """Each model's group over all its ranks where it holds a slice (None where it spans the
    job, and on ranks outside it): the ranks that load its checkpoints together. Collective:
    every rank creates every model's, in spec order."""
    spans: dict[str, dist.ProcessGroup | None] = {}
    for s in starts:
        ranks = s.spec.ranks
        if ranks.count == topology.world_size:
            spans[s.name] = None
            continue
        members = list(range(ranks.first, ranks.end))
        group = dist.new_group(members, backend=backend, timeout=timeout)
        spans[s.name] = group if isinstance(group, dist.ProcessGroup) else None
    return spans


def seeding_groups(
    starts: tuple[ModelStart, ...], groups: dict[str, ParallelGroups]
) -> ProcessGroupCollection:
    """The collection this rank's RNG seeds come from: the trainable model's where this rank
    holds it (its initialisation and dropout), else the first model it holds."""
    ordered = sorted(starts, key=lambda s: not s.spec.trainable)
    for s in ordered:
        pg = groups[s.name].pg
        if pg is not None:
            return pg
    raise RuntimeError("this rank holds no model of the job")


class FrozenModel:
    """A model that runs forward only: no gradients, no optimizer, weights loaded at start."""

    def __init__(self, start: ModelStart, built: ModelChunks, pg: ProcessGroupCollection) -> None:
        if len(built.chunks) != 1:
            raise ValueError(f"model {start.name!r}: a frozen model runs in one pipeline stage")
        self.start = start
        self.pg = pg
        self.padded_vocab = built.padded_vocab_size
        model: torch.nn.Module = built.chunks[0]
        if built.config.bf16:
            model = Float16Module(built.config, model)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.seconds = 0.0  # forward time of the current step, for the model's metrics

    @property
    def name(self) -> str:
        return self.start.name

    @torch.no_grad()
    def forward(self, batch: Batch, *, logits: bool) -> torch.Tensor:
        """Per-token cross-entropy `[rows, seq]`, or this rank's vocabulary shard of the logits
        `[rows, seq, padded_vocab / tp]` where `logits`."""
        began = time.perf_counter()
        labels = None if logits else batch.labels
        out = self.model(batch.tokens, batch.position_ids, batch.attention_mask, labels=labels)
        self.seconds += time.perf_counter() - began
        return out.float()


def build_frozen(
    start: ModelStart,
    pg: ProcessGroupCollection,
    device: torch.device,
    span: dist.ProcessGroup | None = None,
) -> FrozenModel:
    """Build a frozen model's chunks on this rank and load its weights (`span`: its slice's
    group, None when it spans the job)."""
    if start.spec.weights is None:
        raise ValueError(f"model {start.name!r} is frozen and has no weights to load")
    built = build_model(start.cfg, start.dims, pg, device, start.choice)
    load_weights(start, built, pg, span)
    return FrozenModel(start, built, pg)


def load_weights(
    start: ModelStart,
    built: ModelChunks,
    pg: ProcessGroupCollection,
    span: dist.ProcessGroup | None = None,
) -> str:
    """Fill a model's chunks from its weights: a kubetron checkpoint (any shape, loaded over
    `span`) or a Hugging Face directory (each rank reads its own slices). Returns which."""
    assert start.spec.weights is not None
    path = Path(start.spec.weights)
    from kubetron_api.ckpt_meta import is_checkpoint_dir

    if is_checkpoint_dir(path):
        from kubetron_trainer.runtime.checkpoint import load_model_weights

        load_model_weights(built.chunks, pg, path, f"{start.field}.weights", span)
        return "checkpoint"
    from kubetron_trainer.models.hf_weights import load_hf_weights

    load_hf_weights(built.chunks, pg, start.cfg.model, path, built.padded_vocab_size)
    return "weights"
