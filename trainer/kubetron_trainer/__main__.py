"""`python -m kubetron_trainer --config FILE`: one trainer process, started by torchrun.

This is the container's entry point, so it owns the process-level contract with Kubernetes:
read and validate the config (a bad field exits 2 naming the field), read the rank environment,
join the job's process group, serve the pod's metrics from local rank 0, train, and map every
way of ending to an exit code the PyTorchJob `ExitCode` restart policy understands
(see `exitcodes`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import ValidationError

from kubetron_api.ckpt_meta import Attempt, check_fence, read_latest
from kubetron_api.config import FastPath, TrainerConfig
from kubetron_api.dims import ParallelDims
from kubetron_api.exitcodes import ConfigError, ExitCode, Terminated
from kubetron_api.final import ExitReport, FinalProgress
from kubetron_api.rules import TRAINER_RULES, ShapeSpec, check_shape
from kubetron_api.wire import METRICS_DIR
from kubetron_trainer.models.fast_path import EngineChoice, decide_fast_path
from kubetron_trainer.observe.profiling import parse_window
from kubetron_trainer.runtime.failures import classify
from kubetron_trainer.runtime.topology import Topology

if TYPE_CHECKING:
    from kubetron_trainer.observe.metrics import TrainerMetrics
    from kubetron_trainer.runtime.loop import RunOptions, Summary
    from kubetron_trainer.runtime.model_plan import ModelStart

log = logging.getLogger("kubetron_trainer")


def load_config(path: Path) -> TrainerConfig:
    """Parse the ConfigMap's JSON; errors name the field (camelCase, as in the spec)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("--config", f"{path} does not exist; mount the job's ConfigMap") from None
    except json.JSONDecodeError as err:
        raise ConfigError("--config", f"{path} is not valid JSON: {err}") from None
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "<root>"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(field, f"{problems} (in {path})") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kubetron-train", description="kubetron trainer process")
    p.add_argument("--config", type=Path, required=True, help="TrainerConfig JSON")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--groups",
        choices=["decentralized", "global"],
        default="decentralized",
        help="process groups: our own HyperCommGrid collection, or Megatron's parallel_state",
    )
    p.add_argument(
        "--attention",
        choices=["auto", "te", "sdpa", "unfused"],
        default="auto",
        help="core attention: auto (TE if importable, else sdpa), te, sdpa, or Megatron's unfused",
    )
    p.add_argument(
        "--fast-path",
        default=None,
        help="overrides recipe.fastPath: fused kernels without Transformer Engine (GPU, sdpa "
        "attention only): off, on, or a comma list of ce (fused linear cross-entropy), norm "
        "(RMSNorm), rope, cudnn (SDPA backend), wgrad (fp32 weight-gradient accumulation), "
        "adam (fused AdamW), swiglu (SwiGLU, dense models), overlap (gradient reduce-scatter "
        "overlapped with the backward pass); needs liger-kernel for ce",
    )
    p.add_argument("--summary", type=Path, help="rank 0 writes per-step numbers here (JSON)")
    p.add_argument(
        "--profile-steps",
        type=parse_window,
        metavar="START:COUNT",
        help="after START steps, profile COUNT steps with torch.profiler; each rank writes "
        "GPU time by kernel family to --profile-out/profile_rank<R>.json",
    )
    p.add_argument("--profile-out", type=Path, help="directory for --profile-steps")
    p.add_argument(
        "--metrics-linger",
        type=float,
        default=0.0,
        help="keep serving /metrics this many seconds after training, for a last scrape",
    )
    return p.parse_args(argv)


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    try:
        cfg = load_config(args.config)
        topology = Topology.from_env()
        if cfg.world_size != topology.world_size:
            raise ConfigError(
                "worldSize",
                f"the config expects {cfg.world_size} processes but torchrun started "
                f"{topology.world_size}; match nnodes*nproc-per-node to worldSize",
            )
        return run(prepare(cfg, topology, args), args)
    except BaseException as err:  # every way out gets an exit code for the restart policy
        code = classify(err)
        if isinstance(err, Terminated):
            log.warning("%s; exiting %d (retryable)", err, code)
        elif isinstance(err, KeyboardInterrupt):
            code = ExitCode.SIGTERM
        elif code == ExitCode.ERROR:
            log.exception("training failed; exiting %d", code)
        else:
            kind = "retryable" if code.retryable else "not retryable"
            log.error("%s; exiting %d (%s)", err, code, kind)
        record_exit_code(rank, code, "" if code == ExitCode.OK else f"{err}")
        return int(code)


def record_exit_code(rank: int, code: int, message: str = "") -> None:
    """Leave this rank's code (first line) and the error that ended it (the rest) in
    `$KUBETRON_EXIT_CODE_DIR/rank-<r>` when the variable is set.

    torchrun exits 1 whenever a worker fails or it is itself sent SIGTERM, which the PyTorchJob
    `ExitCode` policy reads as permanent; the pod command (kubetron_trainer.launch) restores the
    workers' own codes and hands the message to Kubernetes as the termination message. A run
    that completes leaves global rank 0's exit report (`exit_report`) as its message instead.
    """
    directory = os.environ.get("KUBETRON_EXIT_CODE_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"rank-{rank}").write_text(f"{int(code)}\n{message}")


def exit_report(summary: Summary, cfg: TrainerConfig) -> ExitReport | None:
    """Global rank 0's final numbers for the operator (`kubetron_api.final`); None when this
    rank trained no step (a rank of a frozen model, a run resumed at its last step)."""
    if not summary.steps:
        return None
    last, saved = summary.steps[-1], None
    if cfg.checkpoint.path is not None:
        with contextlib.suppress(ValueError):  # a `latest` someone broke: no step to report
            saved = read_latest(Path(cfg.checkpoint.path))
    final = FinalProgress(
        step=last.step,
        loss=last.loss,
        validation_loss=summary.validation[-1].loss if summary.validation else None,
        tokens_per_second=summary.tokens_per_s or None,
        checkpoint_step=saved,
    )
    return ExitReport(final=final)


@dataclass(frozen=True)
class Start:
    """What the trainer settled before it joins the job."""

    cfg: TrainerConfig
    topology: Topology
    device: torch.device
    dims: ParallelDims  # the shape, checked once, on this device
    choice: EngineChoice  # the engine: attention and fast-path pieces
    attempt: Attempt | None  # set by the operator: fences checkpoint writes
    models: tuple[ModelStart, ...] = ()  # a multi-model job's models (the trained one's above)


def prepare(cfg: TrainerConfig, topology: Topology, args: argparse.Namespace) -> Start:
    """Everything that can refuse the run, checked before it joins the job (exit 2 naming the
    field): the shape on this device, the engine, the data, the checkpoint directory and a
    finetune's weights."""
    device = pick_device(args.device, topology.local_rank)
    fast = requested_fast_path(cfg, args)
    if cfg.models:
        return prepare_models(cfg, topology, device, fast, args)
    shape = ShapeSpec.of_config(cfg, "gpu" if device.type == "cuda" else "cpu")
    dims = check_shape(shape, TRAINER_RULES).dims
    choice = decide_fast_path(fast, cfg, dims, device, args.attention)
    log.info("engine: %s", choice.engine.to_label())
    check_data(cfg)
    attempt = Attempt.from_env(os.environ)
    check_checkpoint(cfg, dims, attempt)
    if cfg.weights is not None:  # a finetune's Hugging Face checkpoint fits the model (files)
        from kubetron_api.hf_config import check_weights

        check_weights(cfg.model, cfg.preset, Path(cfg.weights))
    return Start(cfg, topology, device, dims, choice, attempt)


def prepare_models(
    cfg: TrainerConfig,
    topology: Topology,
    device: torch.device,
    fast: FastPath,
    args: argparse.Namespace,
) -> Start:
    """`prepare` for a job of several models: each model's shape, engine and weights, the
    data, and the trained model's checkpoint directory."""
    from kubetron_api.hf_config import check_model_weights
    from kubetron_trainer.runtime.model_plan import plan_models

    models = plan_models(cfg, device, fast, args.attention)
    trained = next(m for m in models if m.spec.trainable)
    check_data(cfg)
    attempt = Attempt.from_env(os.environ)
    check_checkpoint(trained.cfg, trained.dims, attempt)
    for m in models:
        if m.spec.weights is not None:
            where = f"{m.field}.weights"
            check_model_weights(m.cfg.model, m.spec.preset, Path(m.spec.weights), where)
    return Start(cfg, topology, device, trained.dims, trained.choice, attempt, models)


def check_data(cfg: TrainerConfig) -> None:
    """The data's files, and the tokenizer against the model (indexed, chat, preference)."""
    if cfg.data.type != "mock":
        from kubetron_trainer.data.batches import check_indexed_data

        check_indexed_data(cfg)


def requested_fast_path(cfg: TrainerConfig, args: argparse.Namespace) -> FastPath:
    """recipe.fastPath, or `--fast-path` where given (the command line overrides the spec)."""
    if args.fast_path is None:
        return cfg.recipe.fast
    try:
        return FastPath.parse(args.fast_path)
    except ValueError as err:
        raise ConfigError("--fast-path", str(err)) from None


def run(start: Start, args: argparse.Namespace) -> int:
    """Join the job, train, clean up (imports Megatron only now, after every check)."""
    import torch.distributed as dist

    from kubetron_trainer.observe.metrics import MultiprocDir
    from kubetron_trainer.runtime import loop
    from kubetron_trainer.runtime.parallel import init_distributed

    cfg, topology = start.cfg, start.topology
    backend = "nccl" if start.device.type == "cuda" else "gloo"
    own_dir = f"{METRICS_DIR}-{cfg.job_name}-{topology.master_port}"  # outside a pod
    metrics_dir = MultiprocDir.prepare(topology.local_rank, own_dir)
    init_distributed(topology, backend, timedelta(seconds=cfg.collective_timeout_seconds))
    dist.barrier()  # the metrics directory is clean before any rank writes to it
    metrics = start_metrics(start)
    options = loop.RunOptions(
        start.choice, args.groups, args.summary, args.metrics_linger, start.attempt,
        args.profile_steps, args.profile_out or (args.summary.parent if args.summary else None),
    )  # fmt: skip
    summary = train(start, options, backend, metrics)
    log.info(
        "done: %d steps, final loss %.4f, %.0f tokens/s",
        len(summary.steps), summary.steps[-1].loss if summary.steps else float("nan"),
        summary.tokens_per_s,
    )  # fmt: skip
    if topology.rank == 0 and (report := exit_report(summary, cfg)) is not None:
        record_exit_code(topology.rank, ExitCode.OK, report.to_message())
    if args.metrics_linger > 0 and topology.local_rank == 0:
        linger(args.metrics_linger)  # the other ranks wait in the barrier below
    dist.barrier()
    dist.destroy_process_group()
    metrics_dir.remove(topology.local_rank)  # every local rank is past its last write
    return int(ExitCode.OK)


def train(
    start: Start, options: RunOptions, backend: str, metrics: TrainerMetrics | None
) -> Summary:
    """Build this rank's part of the job and train it (imports Megatron)."""
    from kubetron_trainer.runtime import loop

    cfg, topology = start.cfg, start.topology
    if start.models:
        from kubetron_trainer.runtime.multi_run import Bystander, serve, setup_models

        built = setup_models(cfg, start.models, topology, start.device, backend, options, metrics)
        if isinstance(built, Bystander):
            return serve(built)
        state = built
    else:
        state = loop.setup(cfg, start.dims, topology, start.device, backend, options, metrics)
    log.info(
        "kubetron trainer: %s, %s, %s groups, attention: %s",
        topology.describe(), start.dims, options.groups, state.attention,
    )  # fmt: skip
    return loop.train(state)


def start_metrics(start: Start) -> TrainerMetrics | None:
    """This rank's metrics, None when spec.metrics is off. They report the engine from the
    start; local rank 0 serves the pod's endpoint."""
    if not start.cfg.metrics.enabled:
        return None
    from kubetron_trainer.observe.metrics import TrainerMetrics

    t = start.topology
    metrics = TrainerMetrics(
        start.cfg.job_name, t.rank, t.local_rank, t.world_size,
        attempt=start.attempt.number if start.attempt else 0,
    )  # fmt: skip
    metrics.record_engine(start.choice.engine.to_label())
    if t.local_rank == 0:
        metrics.serve(start.cfg.metrics.port)
    return metrics


def check_checkpoint(cfg: TrainerConfig, dims: ParallelDims, attempt: Attempt | None) -> None:
    """Refuse, before joining the job and without writing anything, a checkpoint directory a
    newer attempt of this job has claimed, and a checkpoint the run would resume from but cannot
    (`ckpt_meta.plan_resume`: reads `latest` and `kubetron.json` only)."""
    if cfg.checkpoint.path is None:
        return
    check_fence(Path(cfg.checkpoint.path), attempt)
    if cfg.checkpoint.resume != "auto":
        return
    from kubetron_api.ckpt_meta import RunIdentity, plan_resume
    from kubetron_trainer.models.megatron_config import padded_vocab_size

    vocab = padded_vocab_size(cfg.model.vocab_size, dims.tp)
    plan_resume(Path(cfg.checkpoint.path), RunIdentity.from_config(cfg, dims, vocab))


def linger(seconds: float) -> None:
    """Keep serving /metrics after training for `seconds`, or until SIGTERM (then exit 0:
    training is complete, there is nothing to save)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    stop.wait(seconds)


def pick_device(choice: str, local_rank: int) -> torch.device:

    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device", "cuda was asked for but no GPU is visible")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


if __name__ == "__main__":
    sys.exit(main())
