"""The training loop: groups -> model -> optimizer step -> data -> checkpoints -> metrics.

Everything around the optimizer step is the same on CPU and GPU; `step_cpu` / `step_gpu`
provide the step. SIGTERM only sets a flag; at each step boundary the ranks agree (a MAX
all-reduce) whether any rank was signalled, so they all save the same step and exit together
with the retryable code.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from kubetron_api.ckpt_meta import Attempt, RunIdentity, claim, is_checkpoint_dir, plan_resume
from kubetron_api.config import FastPath, TrainerConfig
from kubetron_api.dims import ParallelDims
from kubetron_api.exitcodes import Terminated
from kubetron_trainer.data.batches import Batch, build_data
from kubetron_trainer.models.build import build_model
from kubetron_trainer.models.fast_path import EngineChoice
from kubetron_trainer.observe.flops import flops_per_token, peak_flops
from kubetron_trainer.observe.metrics import StepStats, TrainerMetrics
from kubetron_trainer.observe.profiling import StepProfiler
from kubetron_trainer.observe.tensorboard import TensorBoard
from kubetron_trainer.runtime.checkpoint import Checkpointer
from kubetron_trainer.runtime.evaluate import Evaluation, Evaluator
from kubetron_trainer.runtime.multi import Recipe
from kubetron_trainer.runtime.optimizer import build_scheduler, current_lr
from kubetron_trainer.runtime.parallel import GroupOptions, build_process_groups
from kubetron_trainer.runtime.seeding import setup_megatron_globals
from kubetron_trainer.runtime.step import (
    LM_LOSS,
    Objective,
    Stats,
    StepResult,
    share_from_last_stage,
)
from kubetron_trainer.runtime.topology import Topology

log = logging.getLogger(__name__)
GroupsMode = Literal["decentralized", "global"]


@dataclass(frozen=True)
class RunOptions:
    """How to run, beyond the config: chosen by the launcher or a test, not by the user's spec."""

    choice: EngineChoice  # the engine decided at start (`models.fast_path.decide_fast_path`)
    groups: GroupsMode = "decentralized"
    summary: Path | None = None
    metrics_linger_s: float = 0.0
    attempt: Attempt | None = None  # the operator's attempt (fences checkpoint writes)
    profile: tuple[int, int] | None = None  # (steps before, steps profiled): --profile-steps
    profile_out: Path | None = None  # where each rank writes profile_rank<R>.json


class Engine(Protocol):
    @property
    def optimizer(self) -> Any: ...

    def step(self, micro_batches: Sequence[Batch | None]) -> StepResult: ...

    def evaluate(self, micro_batches: Sequence[Batch | None]) -> list[Stats]:
        """Forward only (`recipe.eval`): the last stage's loss and loss tokens per micro-batch."""
        ...

    def after_load(self) -> None:
        """Called once a checkpoint has been loaded into the optimizer."""
        ...


@dataclass
class Summary:
    """What rank 0 writes to `--summary` at the end: per-step numbers and the run's totals."""

    job: str
    device: str
    attention: str
    groups: str
    resumed_from: int
    rng: str = "seeded"  # after a resume: "restored" (same shape) or "re-seeded"
    start: str = "random"  # the model's first weights: random, weights (finetune), checkpoint
    first_sample: int = 0  # the data position the run started at (consumed samples)
    steps: list[StepStats] = field(default_factory=list)  # the record logs and metrics got
    tokens_per_s: float = 0.0
    mfu: float | None = None
    wall_s: float = 0.0
    peak_memory_gib: float | None = None  # this rank's peak allocated GPU memory
    stopped_by: str = "completed"
    validation: list[Evaluation] = field(default_factory=list)  # recipe.eval's evaluations
    validation_indices: list[list[int]] = field(default_factory=list)  # read by each dp rank


class StopFlag:
    """Set by SIGTERM; `agreed` asks every rank (collective) whether any was signalled."""

    def __init__(self, device: torch.device) -> None:
        self.signalled = False
        self.device = device
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.signalled else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def make_groups(
    cfg: TrainerConfig, dims: ParallelDims, topology: Topology, backend: str, mode: GroupsMode
) -> ProcessGroupCollection:
    """The model's process groups: our own (decentralized) or Megatron's global ones."""
    if mode == "global":
        parallel_state.initialize_model_parallel(**dims.megatron_sizes())  # type: ignore[arg-type]
        return ProcessGroupCollection.use_mpu_process_groups()
    timeout = timedelta(seconds=cfg.collective_timeout_seconds)
    groups = build_process_groups(dims, topology, backend, options=GroupOptions(timeout=timeout))
    if groups.pg is None:
        raise RuntimeError(f"rank {topology.rank} is outside its own grid")
    return groups.pg


def make_engine(
    cfg: TrainerConfig,
    chunks: list,
    pg: ProcessGroupCollection,
    device: torch.device,
    fast: FastPath | None = None,
    objective: Objective = LM_LOSS,
) -> Engine:
    if device.type == "cuda":
        from kubetron_trainer.runtime.step_gpu import GpuEngine

        return GpuEngine(cfg, chunks, pg, fast=fast, objective=objective)
    from kubetron_trainer.runtime.step_cpu import CpuEngine

    return CpuEngine(cfg, chunks, pg, objective=objective)


class Progress:
    """Turns step results into `StepStats`, the progress line and the summary."""

    def __init__(
        self,
        cfg: TrainerConfig,
        padded_vocab: int,
        device: torch.device,
        frozen_flops_per_token: float = 0.0,
    ) -> None:
        r = cfg.recipe
        self.cfg = cfg
        self.tokens = r.global_batch_size * r.seq_length * (2 if r.kind == "dpo" else 1)
        # the trained model's forward and backward (no weight gradients under LoRA), plus the
        # frozen models' forward passes
        trained = flops_per_token(cfg.model, r.seq_length, padded_vocab, r.peft is None)
        self.flops_per_token = trained + frozen_flops_per_token
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.peak = peak_flops(name, r.precision.value)
        self.durations: list[float] = []

    def stats(self, step: int, result: StepResult, lr: float, seconds: float) -> StepStats:
        self.durations.append(seconds)
        tps = self.tokens / seconds
        flops_per_gpu = tps * self.flops_per_token / dist.get_world_size()
        mfu = flops_per_gpu / self.peak if self.peak else None
        return StepStats(
            step, result.loss, result.grad_norm, lr, seconds, self.tokens, tps,
            flops_per_gpu / 1e12, mfu, result.extras,
        )  # fmt: skip

    def line(self, s: StepStats) -> str:
        total = self.cfg.recipe.train_iters
        recent = self.durations[-10:]
        eta = (total - s.step) * sum(recent) / len(recent)
        mfu = f"{100 * s.mfu:.1f}%" if s.mfu is not None else "n/a"
        extras = "".join(f" | {k.replace('_', ' ')} {v:.4f}" for k, v in s.extras.items())
        return (
            f"step {s.step}/{total} | loss {s.loss:.4f}{extras} | grad norm {s.grad_norm:.3f} | "
            f"lr {s.lr:.2e} | {s.tokens_per_s:,.0f} tok/s | {s.tflops_per_gpu:.2f} TFLOP/s/GPU | "
            f"MFU {mfu} | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )


@dataclass
class Run:
    """Everything one rank built for training; `train` drives it."""

    cfg: TrainerConfig
    options: RunOptions
    topology: Topology
    device: torch.device
    pg: ProcessGroupCollection
    chunks: list
    attention: str
    engine: Engine
    scheduler: object
    checkpointer: Checkpointer | None
    metrics: TrainerMetrics | None
    progress: Progress
    start: str = "random"  # what the model started from (start_weights)
    recipe: Recipe | None = None  # the other models of a multi-model job, and the loss
    board: TensorBoard | None = None  # spec.observability.tensorboard's writer (one rank)


def setup(
    cfg: TrainerConfig,
    dims: ParallelDims,
    topology: Topology,
    device: torch.device,
    backend: str,
    options: RunOptions,
    metrics: TrainerMetrics | None,
) -> Run:
    """Groups, seeds, model, optimizer, scheduler and checkpointer, in Megatron's order."""
    pg = make_groups(cfg, dims, topology, backend, options.groups)
    setup_megatron_globals(pg, cfg.recipe.seed)  # global memory buffer and RNG seeds
    return build_run(cfg, dims, pg, topology, device, options, metrics)


def build_run(
    cfg: TrainerConfig,
    dims: ParallelDims,
    pg: ProcessGroupCollection,
    topology: Topology,
    device: torch.device,
    options: RunOptions,
    metrics: TrainerMetrics | None,
    recipe: Recipe | None = None,
    span: dist.ProcessGroup | None = None,
) -> Run:
    """The trained model on its groups: chunks, weights, optimizer, scheduler, checkpointer.
    `recipe` (a multi-model job's) gives the loss and the frozen models' FLOPs; `span` is the
    group of the model's ranks where it holds a slice of the job (its checkpoints load over
    it)."""
    built = build_model(cfg, dims, pg, device, options.choice)
    identity = None
    if cfg.checkpoint.path is not None:
        identity = RunIdentity.from_config(cfg, dims, built.padded_vocab_size, options.attempt)
    # before the engine: a GPU optimizer copies the parameters into its fp32 main weights
    start = start_weights(cfg, identity, built.chunks, pg, built.padded_vocab_size, span)
    if cfg.recipe.peft is not None:  # adapters on the loaded base, which they leave frozen
        from kubetron_trainer.models.lora import apply_lora

        apply_lora(built.chunks, cfg.model, cfg.recipe.peft, pg, cfg.recipe.seed)
    objective = recipe.objective if recipe is not None else LM_LOSS
    engine = make_engine(cfg, built.chunks, pg, device, built.choice.fast, objective)
    scheduler = build_scheduler(engine.optimizer, cfg.recipe)
    checkpointer = None
    if cfg.checkpoint.path is not None and identity is not None:
        if topology.rank == 0:  # this attempt owns the directory from now on
            claim(Path(cfg.checkpoint.path), options.attempt)
        checkpointer = Checkpointer(
            Path(cfg.checkpoint.path), built.chunks, engine.optimizer, scheduler, pg, device,
            identity, async_save=cfg.checkpoint.async_save, group=span,
        )  # fmt: skip
        if metrics is not None:
            checkpointer.on_saved = lambda step, seconds: metrics.record_save(seconds, step)
    frozen = recipe.frozen_flops_per_token() if recipe is not None else 0.0
    progress = Progress(cfg, built.padded_vocab_size, device, frozen)
    return Run(
        cfg, options, topology, device, pg, built.chunks, built.attention, engine, scheduler,
        checkpointer, metrics, progress, start, recipe,
    )  # fmt: skip


def start_weights(
    cfg: TrainerConfig,
    identity: RunIdentity | None,
    chunks: list,
    pg: ProcessGroupCollection,
    padded_vocab: int,
    span: dist.ProcessGroup | None = None,
) -> str:
    """What the model starts from: `weights` (a finetune loads spec.model.weights; a model of a
    multi-model job its weights, a Hugging Face directory or a kubetron checkpoint loaded over
    `span`, its ranks' group), `checkpoint`
    (a finetune whose job already saved a checkpoint resumes from it instead: a restart must
    not start over) or `random` (pretrain). Every rank decides from the same files. A LoRA
    checkpoint holds the adapters only: their base weights are loaded first in either case."""
    if cfg.weights is None:
        return "random"
    path, auto = cfg.checkpoint.path, cfg.checkpoint.resume == "auto"
    resume = identity is not None and path and auto and plan_resume(Path(path), identity)
    if resume and cfg.recipe.peft is None:
        log.info("finetune: %s has a checkpoint; resuming from it, not from %s", path, cfg.weights)
        return "checkpoint"
    if is_checkpoint_dir(Path(cfg.weights)):  # a model of several: a kubetron checkpoint
        from kubetron_trainer.runtime.checkpoint import load_model_weights

        load_model_weights(chunks, pg, Path(cfg.weights), "weights", span)
    else:
        from kubetron_trainer.models.hf_weights import load_hf_weights

        load_hf_weights(chunks, pg, cfg.model, Path(cfg.weights), padded_vocab)
    return "checkpoint" if resume else "weights"


def train(run: Run) -> Summary:
    """Resume, train to `trainIters`, save on schedule and on SIGTERM; raises `Terminated`."""
    cfg, pg = run.cfg, run.pg
    resumed = None
    if run.checkpointer is not None and cfg.checkpoint.resume == "auto":
        resumed = run.checkpointer.load_latest()
        if resumed is not None:
            run.engine.after_load()
    start = resumed.step if resumed else 0
    first_sample = resumed.consumed_samples if resumed else 0
    attempt = run.options.attempt.number if run.options.attempt is not None else 0
    run.board = TensorBoard.open(cfg, pg, start + 1, attempt, run.device)
    first, last = pg.pp.rank() == 0, pg.pp.rank() == pg.pp.size() - 1
    data = build_data(
        cfg,
        # packed conversations: every stage needs the attention mask of its micro-batches
        reads_data=first or last or cfg.data.type == "chat",
        dp_rank=pg.dp.rank(),
        dp_size=pg.dp.size(),
        device=run.device,
        on_wait=run.metrics.record_data_wait if run.metrics else None,
        start_step=start,
        start_sample=first_sample,
    )
    batches = data.train
    if run.recipe is not None:  # the other models read the same steps in their own layouts
        run.recipe.begin(start, first_sample, resumed is not None)
    summary = Summary(cfg.job_name, str(run.device), run.attention, run.options.groups, start)
    evaluator = Evaluator(run, data.validation, summary)
    summary.start = "checkpoint" if resumed is not None else run.start
    if resumed is not None:
        summary.rng, summary.first_sample = resumed.rng, first_sample
    stop = StopFlag(run.device)
    profiler = None
    if run.options.profile is not None and run.options.profile_out is not None:
        window = (start + run.options.profile[0], run.options.profile[1])
        profiler = StepProfiler(window, run.options.profile_out, run.topology.rank, run.device)
    began = time.perf_counter()
    log.info("training steps %d..%d", start + 1, cfg.recipe.train_iters)
    done = cfg.recipe.train_iters
    for step in range(start, done):
        if stop.agreed():  # a pending background save completes first, this one synchronously
            interval = cfg.checkpoint.save_interval
            resave = sigterm_needs_save(step, start, resumed is not None, interval)
            pending = run.checkpointer.pending if run.checkpointer is not None else None
            if pending is not None and run.topology.rank == 0:
                log.warning(
                    "SIGTERM: completing the background save of step %d%s", pending.step,
                    f", then saving step {step}" if resave else "",
                )  # fmt: skip
            if resave:
                save(run, step, batches.consumed(step), blocking=True)
            elif run.checkpointer is not None:
                run.checkpointer.finalize(blocking=True)
            summary.stopped_by = "SIGTERM"
            finish(run, summary, began)
            raise Terminated(f"SIGTERM: saved step {step} and stopped")
        if run.checkpointer is not None:
            run.checkpointer.finalize()  # a background save that has finished (collective)
        if profiler is not None:
            profiler.before(step)
        one_step(run, batches.step(step), step + 1, summary)
        if profiler is not None:
            profiler.after(step, profile_context(run, summary))
        evaluator.after(step + 1)
        if run.checkpointer and (step + 1) % cfg.checkpoint.save_interval == 0:
            save(run, step + 1, batches.consumed(step + 1), blocking=step + 1 == done)
    evaluator.finish(done)
    if run.checkpointer and done % cfg.checkpoint.save_interval and start < done:
        save(run, done, batches.consumed(done), blocking=True)
    finish(run, summary, began)
    return summary


def sigterm_needs_save(step: int, start: int, resumed: bool, interval: int) -> bool:
    """Whether a SIGTERM at the boundary after `step` must save it: not when this run already
    saved that step on schedule (in the background perhaps: it is completed instead) or
    resumed from it. Saving it again would first delete the complete directory `latest`
    points at, and a SIGKILL at the end of the grace period would leave no checkpoint."""
    if step == start:
        return not resumed
    return step % interval != 0


def one_step(run: Run, micro: Sequence[Batch | None], step: int, summary: Summary) -> None:
    t0 = time.perf_counter()
    if run.recipe is not None:  # the frozen models' share of the step is part of its time
        micro = run.recipe.feed(step - 1, micro)
    result = run.engine.step(micro)
    run.scheduler.step(1)  # type: ignore[attr-defined]
    names = run.recipe.stats if run.recipe is not None else ()  # known on every stage
    shared = share_from_last_stage(
        [result.loss, result.grad_norm, *(result.extras.get(n, 0.0) for n in names)], run.pg
    )
    loss, norm, extras = shared[0], shared[1], dict(zip(names, shared[2:], strict=True))
    seconds = time.perf_counter() - t0
    lr = current_lr(run.engine.optimizer)
    stats = run.progress.stats(step, StepResult(loss, norm, result.ok, extras), lr, seconds)
    summary.steps.append(stats)
    if run.metrics is not None:
        run.metrics.record_step(stats)
        if run.recipe is not None:
            run.metrics.record_models(stats.tokens, run.recipe.spent(seconds))
        if run.device.type == "cuda":
            run.metrics.record_memory(
                torch.cuda.memory_allocated(run.device), torch.cuda.memory_reserved(run.device)
            )
    logs = step % run.cfg.recipe.log_interval == 0 or step == 1
    if run.board is not None:
        run.board.record_step(stats, flush=logs)
    if run.topology.rank == 0 and logs:
        log.info(run.progress.line(stats))


def profile_context(run: Run, summary: Summary) -> dict[str, Any]:
    """What a profile needs beside its kernels: the shape and the profiled steps' host times."""
    cfg = run.cfg
    micro = cfg.recipe.global_batch_size // (cfg.recipe.micro_batch_size * run.pg.dp.size())
    return {
        "pp_rank": run.pg.pp.rank(), "pp": run.pg.pp.size(), "tp": run.pg.tp.size(),
        "dp": run.pg.dp.size(), "micro_batches_per_step": micro,
        "seq_length": cfg.recipe.seq_length, "micro_batch": cfg.recipe.micro_batch_size,
        "attention": run.attention, "groups": run.options.groups,
        "step_s": [round(s.duration_s, 4) for s in summary.steps[-run.options.profile[1]:]]
        if run.options.profile else [],
    }  # fmt: skip


def save(run: Run, step: int, consumed_samples: int, blocking: bool = False) -> None:
    """A checkpoint of `step`; the checkpointer reports each completed save to the metrics."""
    if run.checkpointer is not None:
        run.checkpointer.save(step, consumed_samples, blocking=blocking)


def finish(run: Run, summary: Summary, began: float) -> None:
    """Totals over the steps this process ran (the first two are warmup), summary on rank 0;
    a background save still pending completes first."""
    if run.checkpointer is not None:
        run.checkpointer.close()
    if run.board is not None:
        run.board.close()
    summary.wall_s = time.perf_counter() - began
    timed = [s.duration_s for s in summary.steps[2:]] or [s.duration_s for s in summary.steps]
    if timed:
        summary.tokens_per_s = run.progress.tokens * len(timed) / sum(timed)
        if run.progress.peak:
            per_gpu = summary.tokens_per_s * run.progress.flops_per_token / dist.get_world_size()
            summary.mfu = per_gpu / run.progress.peak
    if run.device.type == "cuda":
        summary.peak_memory_gib = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
    if run.topology.rank == 0 and run.options.summary is not None:
        run.options.summary.parent.mkdir(parents=True, exist_ok=True)
        run.options.summary.write_text(json.dumps(asdict(summary), indent=1))
