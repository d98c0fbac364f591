"""Trainer runs on the GPUs of this host, one process a GPU: what tests/gpu checks and the GPU
benchmarks time.

Shapes here are for 2 GPUs (WORLD): every run of the modules beside this one (shapes, groups,
reshard, sequence_parallel, checkpoint_8b, async_save) needs exactly 2 visible GPUs. Runs write
under a work directory the caller passes (the tests their pytest temp dir, the benchmarks
`--workdir`); each run's trainer config comes from `trainer_config`, which the real trainer
validates like any MegatronJob's.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.cluster.paths import REPO_ROOT
from devtools.training.launch import Launch, launch
from kubetron_api.config import PRESETS, ModelArch, TrainerConfig

WORLD = 2
# "cpu" and "fp32" only to check this module's plumbing with gloo on a machine without GPUs
DEVICE, PRECISION = "cuda", "bf16"


def default_workdir() -> Path:
    """Where the GPU runs write when the caller names no directory."""
    return Path(tempfile.gettempdir()) / "kubetron-gpu"


@dataclass(frozen=True)
class Case:
    """One training shape, run with decentralized and with global groups."""

    name: str
    preset: str
    parallelism: dict[str, int]
    arch_overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 10
    seq: int = 2048
    micro_batch: int = 2
    global_batch: int = 16
    distributed_optimizer: bool = True
    global_first: bool = False  # alternate which run goes first, so warm caches favour neither
    # timed: the two runs one after the other, each alone on the GPUs; else both at once (two
    # processes a GPU), which checks the losses in half the time but says nothing about speed
    timed: bool = True

    def arch(self) -> ModelArch:
        return PRESETS[self.preset].model_copy(update=self.arch_overrides)


def trainer_config(
    name: str,
    arch: ModelArch,
    preset: str,
    parallelism: dict[str, Any],
    *,
    steps: int,
    seq: int,
    micro_batch: int,
    global_batch: int,
    distributed_optimizer: bool = True,
    lr: float = 1e-3,
    checkpoint: Path | None = None,
    save_interval: int = 100,
    fast_path: str = "off",
    precision: str | None = None,
    decay_iters: int | None = None,
) -> dict[str, Any]:
    schedule: dict[str, Any] = {"warmupIters": 1}
    if decay_iters is not None:
        schedule["decayIters"] = decay_iters
    recipe = {
        "trainIters": steps,
        "globalBatchSize": global_batch,
        "microBatchSize": micro_batch,
        "seqLength": seq,
        "precision": precision or PRECISION,
        "fastPath": fast_path,
        "optimizer": {"lr": lr, "minLr": lr / 10, "distributed": distributed_optimizer},
        "lrSchedule": schedule,
        "logInterval": 1,
    }
    cfg = TrainerConfig.model_validate(
        {
            "jobName": f"mg-{name}".replace("_", "-"),
            "model": arch.model_dump(),
            "preset": preset,
            "recipe": recipe,
            "parallelism": parallelism,
            "worldSize": WORLD,
            "gpusPerNode": WORLD,
            "checkpoint": {
                "path": str(checkpoint) if checkpoint else None,
                "saveInterval": save_interval,
            },
            "metrics": {"enabled": False},
        }
    )
    return cfg.model_dump(mode="json", by_alias=True)


def launch_trainer(
    cfg: dict[str, Any],
    workdir: Path,
    groups: str,
    *extra: str,
    extra_env: dict[str, str | None] | None = None,
) -> Launch:
    """Start the trainer's processes (one per GPU, LOCAL_RANK = rank) in a fresh `workdir`."""
    if workdir.exists():
        shutil.rmtree(workdir)
    args = ("--device", DEVICE, "--attention", "sdpa", *extra)
    return launch(cfg, workdir, *args, groups=groups, extra_env=extra_env)


def finish(started: Launch, what: str, timeout: float = 150) -> dict[str, Any]:
    codes = started.wait(timeout=timeout)
    if codes != [0] * len(codes):
        raise RuntimeError(f"{what}: exit codes {codes}\n{started.output()[-6000:]}")
    result: dict[str, Any] = started.result()
    return result


def summarize(result: dict[str, Any], warmup: int = 2) -> dict[str, Any]:
    steps = result["steps"]
    timed = [s.get("duration_s", s.get("s")) for s in steps[warmup:]]  # "s" before StepStats
    return {
        "groups": result["groups"],
        "attention": result["attention"],
        "resumed_from": result["resumed_from"],
        "losses": [s["loss"] for s in steps],
        "grad_norms": [s["grad_norm"] for s in steps],
        "step_s": timed,
        "median_step_s": statistics.median(timed) if timed else None,
        "tokens_per_s": result["tokens_per_s"],
        "mfu_per_gpu": result["mfu"],
        "peak_memory_gib_rank0": result.get("peak_memory_gib"),
    }


def fresh_dir(path: Path) -> Path:
    """`path` as a new, empty directory (an earlier run's files removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def torchrun_env(**extra: str) -> dict[str, str]:
    """The environment of torchrun workers that import this repository's packages."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"} | extra
    paths = [REPO_ROOT, REPO_ROOT / "trainer", REPO_ROOT / "operator"]
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")])
    return env


def torchrun_command(module: str, *args: str) -> list[str]:
    """`python -m module args` under torchrun on this host, one process a GPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*cmd, f"--nproc-per-node={WORLD}", "-m", module, *args]


def torchrun_module(
    module: str, args: list[str], out: Path, timeout: float = 200
) -> list[dict[str, Any]]:
    """Run `module` (a worker) under torchrun with `args`; every rank's JSON from
    `out/rank<r>.json`."""
    cmd = torchrun_command(module, *args)
    proc = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"workers failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def hung_stacks(log: str) -> list[str]:
    """The Python stack lines faulthandler wrote for each thread after a SIGABRT."""
    keep = [ln for ln in log.splitlines() if ln.startswith(("Thread 0x", "Current thread 0x",
                                                           "  File "))]  # fmt: skip
    return keep[-80:]
