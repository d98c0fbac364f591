"""`python -m kubetron_trainer --config FILE`: one trainer process, started by torchrun.

This is the container's entry point, so it owns the process-level contract with Kubernetes:
read and validate the config (a bad field exits 2 naming the field), read the rank environment,
join the job's process group, serve the pod's metrics from local rank 0, train, and map every
way of ending to an exit code the PyTorchJob `ExitCode` restart policy understands
(see `exitcodes`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import ValidationError

from kubetron_api.ckpt_meta import Attempt, check_fence
from kubetron_api.config import FastPath, TrainerConfig
from kubetron_api.dims import ParallelConfigError, ParallelDims
from kubetron_api.exitcodes import ConfigError, ExitCode, Terminated
from kubetron_api.rules import (
    ShapeSpec,
    check_device,
    check_shape,
    missing_transformer_engine,
    transformer_engine_uses,
)
from kubetron_trainer.observe.profiling import parse_window
from kubetron_trainer.runtime.failures import classify
from kubetron_trainer.runtime.topology import Topology

if TYPE_CHECKING:
    from kubetron_trainer.models.build import AttentionBackend

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
        shape = check_shape(ShapeSpec.of_config(cfg))
        return run(cfg, shape.dims, topology, args)
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
    workers' own codes and hands the message to Kubernetes as the termination message.
    """
    directory = os.environ.get("KUBETRON_EXIT_CODE_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"rank-{rank}").write_text(f"{int(code)}\n{message}")


def run(
    cfg: TrainerConfig, dims: ParallelDims, topology: Topology, args: argparse.Namespace
) -> int:
    """Join the job, train, clean up (imports Megatron only now, after the config is valid)."""
    import torch.distributed as dist

    from kubetron_trainer.models.build import resolve_backend
    from kubetron_trainer.observe.metrics import prepare_multiproc_dir
    from kubetron_trainer.runtime.parallel import init_distributed

    if args.fast_path is None:
        fast_path = cfg.recipe.fast
    else:  # the command line overrides the spec
        try:
            fast_path = FastPath.parse(args.fast_path)
        except ValueError as err:
            raise ConfigError("--fast-path", str(err)) from None
    device = pick_device(args.device, topology.local_rank)
    if device.type == "cpu" and (problems := check_device("cpu", cfg)):
        raise ParallelConfigError(problems, f"device cpu, world={cfg.world_size}")
    attention = args.attention
    if cfg.data.type == "chat":  # packed conversations: a block-diagonal mask TE's spec ignores
        if attention == "te":
            raise ConfigError(
                "--attention",
                "te ignores the attention mask of packed conversations (data.type chat); use "
                "sdpa (what auto picks for chat data)",
            )
        attention = "sdpa" if attention == "auto" else attention
    attention = pick_attention(attention, device.type, fast_path, cfg)
    # fp8 and context parallelism need TE's layer spec, which only an image with TE has
    no_te = resolve_backend(attention) != "te"
    if no_te and (problems := missing_transformer_engine(cfg.recipe, cfg.parallelism)):
        raise ParallelConfigError(problems, f"device {device.type}, world={cfg.world_size}")
    if cfg.data.type != "mock":  # the files, and the tokenizer against the model
        from kubetron_trainer.data.batches import check_indexed_data

        check_indexed_data(cfg)
    attempt = Attempt.from_env(os.environ)  # set by the operator: fences checkpoint writes
    check_checkpoint(cfg, dims, attempt)
    if cfg.weights is not None:  # a finetune's Hugging Face checkpoint fits the model (files)
        from kubetron_api.hf_config import check_weights

        check_weights(cfg.model, cfg.preset, Path(cfg.weights))
    backend = "nccl" if device.type == "cuda" else "gloo"
    from kubetron_trainer.observe.metrics import MULTIPROC_ENV

    own_metrics_dir = MULTIPROC_ENV not in os.environ  # pods get theirs from the operator
    metrics_dir = prepare_multiproc_dir(
        topology.local_rank, f"/tmp/kubetron-metrics-{cfg.job_name}-{topology.master_port}"
    )
    init_distributed(topology, backend, timedelta(seconds=cfg.collective_timeout_seconds))
    dist.barrier()  # the metrics directory is clean before any rank writes to it
    from kubetron_trainer.observe.metrics import TrainerMetrics
    from kubetron_trainer.runtime import loop

    metrics = None
    if cfg.metrics.enabled:
        metrics = TrainerMetrics(
            cfg.job_name, topology.rank, topology.local_rank, topology.world_size,
            attempt=attempt.number if attempt else 0,
        )  # fmt: skip
        if topology.local_rank == 0:
            metrics.serve(cfg.metrics.port)
    options = loop.RunOptions(
        args.groups, attention, args.summary, args.metrics_linger, fast_path, attempt,
        args.profile_steps, args.profile_out or (args.summary.parent if args.summary else None),
    )  # fmt: skip
    state = loop.setup(cfg, dims, topology, device, backend, options, metrics)
    log.info(
        "kubetron trainer: %s, %s, %s groups, attention: %s",
        topology.describe(), dims, args.groups, state.attention,
    )  # fmt: skip
    engine = engine_name(state.attention)
    log.info("engine: %s", engine)
    if metrics is not None:
        metrics.record_engine(engine)
    summary = loop.train(state)
    log.info(
        "done: %d steps, final loss %.4f, %.0f tokens/s",
        len(summary.steps), summary.steps[-1].loss if summary.steps else float("nan"),
        summary.tokens_per_s,
    )  # fmt: skip
    if args.metrics_linger > 0 and topology.local_rank == 0:
        linger(args.metrics_linger)  # the other ranks wait in the barrier below
    dist.barrier()
    dist.destroy_process_group()
    if own_metrics_dir and topology.local_rank == 0:  # every local rank is past its last write
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return int(ExitCode.OK)


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
    from kubetron_trainer.models.build import padded_vocab_size

    vocab = padded_vocab_size(cfg.model.vocab_size, dims.tp)
    plan_resume(Path(cfg.checkpoint.path), RunIdentity.from_config(cfg, dims, vocab))


def pick_attention(
    attention: AttentionBackend, device_type: str, fast_path: FastPath, cfg: TrainerConfig
) -> AttentionBackend:
    """The engine: on GPUs the TE-free fast path (recipe.fastPath, on by default) replaces
    `auto`'s Transformer Engine, unless the recipe needs TE (fp8, context parallelism);
    `fastPath: off` or `--attention te` asks for TE. Elsewhere `attention` as given."""
    needs_te = bool(transformer_engine_uses(cfg.recipe, cfg.parallelism))
    if attention == "auto" and device_type == "cuda" and fast_path.enabled and not needs_te:
        return "sdpa"
    return attention


def engine_name(attention: str) -> str:
    """What runs the layers, for the logs and status.progress.engine: transformer-engine, the
    fast path with its pieces, or the local spec without fused kernels."""
    if attention.startswith("transformer-engine"):
        return "transformer-engine"
    if "fast path: " in attention:
        return "fast path (" + attention.split("fast path: ", 1)[1] + ")"
    return "local spec"


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
