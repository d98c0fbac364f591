"""Setting up and running a job of several models (recipe dpo or distill) on this rank.

`setup_models` builds every model's groups (collective, in spec order), seeds, the frozen
models this rank holds, the recipe that connects them, and the trained model's `Run` exactly as
a one-model job builds its model (`loop.build_run` on the trained model's own view and groups).
A rank that holds no part of the trained model (a reference on a slice of its own) gets a
`Bystander` instead: `serve` runs its frozen models' share of every step and joins the job's
collective moments (the stop vote at each step boundary, the checkpoint saves) without a
trained model, so both sides take the same steps in the same order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from kubetron_api.config import TrainerConfig
from kubetron_api.exitcodes import Terminated
from kubetron_trainer.observe.metrics import TrainerMetrics
from kubetron_trainer.runtime.loop import (
    Run,
    RunOptions,
    StopFlag,
    Summary,
    build_run,
    sigterm_needs_save,
)
from kubetron_trainer.runtime.multi import (
    FrozenModel,
    ModelStart,
    Recipe,
    build_frozen,
    build_groups,
    seeding_groups,
    span_groups,
)
from kubetron_trainer.runtime.seeding import setup_megatron_globals
from kubetron_trainer.runtime.topology import Topology

log = logging.getLogger(__name__)


@dataclass
class Bystander:
    """A rank outside the trained model's slice: its frozen models and the recipe."""

    cfg: TrainerConfig
    topology: Topology
    device: torch.device
    recipe: Recipe
    trained: ModelStart


def setup_models(
    cfg: TrainerConfig,
    starts: tuple[ModelStart, ...],
    topology: Topology,
    device: torch.device,
    backend: str,
    options: RunOptions,
    metrics: TrainerMetrics | None,
) -> Run | Bystander:
    """Every model's groups, the frozen models this rank holds, the recipe, and the trained
    model's run (or a `Bystander` on a rank without it)."""
    timeout = timedelta(seconds=cfg.collective_timeout_seconds)
    groups = build_groups(starts, topology, backend, timeout)
    spans = span_groups(starts, topology, backend, timeout)
    setup_megatron_globals(seeding_groups(starts, groups), cfg.recipe.seed)
    frozen: dict[str, FrozenModel] = {}
    for s in starts:
        pg = groups[s.name].pg
        if not s.spec.trainable and pg is not None:
            frozen[s.name] = build_frozen(s, pg, device, spans[s.name])
            if metrics is not None:
                metrics.record_parameters(s.name, parameter_bytes([frozen[s.name].model]))
    trained = next(s for s in starts if s.spec.trainable)
    pg = groups[trained.name].pg
    recipe = make_recipe(cfg, starts, frozen, pg, device, topology.rank)
    if pg is None:
        return Bystander(cfg, topology, device, recipe, trained)
    trained_options = RunOptions(trained.choice, *_rest(options))
    run = build_run(trained.cfg, trained.dims, pg, topology, device, trained_options, metrics,
                    recipe, spans[trained.name])  # fmt: skip
    if metrics is not None:
        metrics.record_parameters(trained.name, parameter_bytes(run.chunks))
    return run


def parameter_bytes(modules: list[torch.nn.Module]) -> int:
    """Bytes of the parameters this rank holds of a model."""
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def _rest(options: RunOptions) -> tuple:
    """The run options after the engine choice (which is each model's own)."""
    return (
        options.groups, options.summary, options.metrics_linger_s, options.attempt,
        options.profile, options.profile_out,
    )  # fmt: skip


def make_recipe(
    cfg: TrainerConfig,
    starts: tuple[ModelStart, ...],
    frozen: dict[str, FrozenModel],
    trained_pg: ProcessGroupCollection | None,
    device: torch.device,
    rank: int,
) -> Recipe:
    """The recipe object of `recipe.kind` over the job's models (`trained_pg`: the trained
    model's groups where this rank holds it)."""
    trained = next(s for s in starts if s.spec.trainable)
    other = next(s for s in starts if not s.spec.trainable)
    if cfg.recipe.kind == "dpo":
        from kubetron_trainer.recipes.dpo import DpoRecipe

        colocated = other.spec.ranks == trained.spec.ranks
        source = None if colocated else other.spec.ranks.first
        return DpoRecipe(cfg, frozen.get(other.name), other, trained.name, device, source)
    if cfg.recipe.kind == "distill":
        from kubetron_trainer.recipes.teacher import DistillRecipe

        assert trained_pg is not None, "distillation's models are co-located"
        return DistillRecipe(cfg, frozen[other.name], other, trained, trained_pg, rank)
    raise ValueError(f"recipe.kind {cfg.recipe.kind} holds one model")


def serve(b: Bystander) -> Summary:
    """A bystander's part of the run: the frozen models' share of each step, the stop vote at
    each step boundary and the trained model's checkpoint saves, in the trained ranks' order."""
    cfg = b.cfg
    start, _, resumed = b.recipe.begin(0, 0, resumed=False)  # the trained ranks' values
    summary = Summary(cfg.job_name, str(b.device), "none", "decentralized", start)
    stop = StopFlag(b.device)
    interval, done = cfg.checkpoint.save_interval, cfg.recipe.train_iters
    saving = cfg.checkpoint.path is not None
    began = time.perf_counter()
    for step in range(start, done):
        if stop.agreed():
            if saving and sigterm_needs_save(step, start, resumed, interval):
                join_save(b, step)
            summary.stopped_by = "SIGTERM"
            raise Terminated(f"SIGTERM: stopped at step {step}")
        b.recipe.serve(step)
        if saving and (step + 1) % interval == 0:
            join_save(b, step + 1)
    if saving and done % interval and start < done:
        join_save(b, done)
    summary.wall_s = time.perf_counter() - began
    log.info("served %d steps of model %s", done - start, b.trained.name)
    return summary


def join_save(b: Bystander, step: int) -> None:
    """Take part in the trained model's checkpoint save of `step`: Megatron's save is
    collective over the whole job, so this rank writes an empty share beside it."""
    from kubetron_trainer.runtime.checkpoint import join_save as join

    path = b.trained.cfg.checkpoint.path
    assert path is not None
    join(Path(path), step)
