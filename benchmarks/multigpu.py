"""Multi-GPU validation of kubetron's decentralized process groups: NCCL, one process per GPU.

One command runs every piece that fits the GPUs of this host and prints one JSON document:

  oracle      every shape of the world (tests/distributed/_pg_worker.py's oracle, with NCCL):
              each ProcessGroupCollection field's members vs Megatron's global parallel_state
  multi       two models of different shapes in one world (policy TP2, reference TP1 x DP2)
              over all ranks: members vs parallel_state, and an all-reduce on each grid's groups
  setup       seconds to build all process groups with NCCL: Megatron's
              initialize_model_parallel vs kubetron's collection (and its variants)
  train       the real trainer (`python -m kubetron_trainer`, one process per GPU) per shape,
              with `--groups decentralized` and `--groups global`: losses, step times,
              tokens/s and MFU per GPU
  checkpoint  a TP2 checkpoint resumed as PP2 and as TP1 x DP2: losses vs the uninterrupted run
  sp_grads    sequence parallelism without TE: one fp32 step of a small TP2 model with and
              without SP (local spec, fast-path norm) through Megatron's DDP and
              finalize_model_grads: losses and every parameter's gradient compared
  sp          the trainer at TP2 with and without SP (local spec and `fastPath: on`), bf16,
              each run alone on the GPUs: losses, peak memory, step time; SP with global groups
  reshard     checkpoints resumed across shapes (issue 19): PP2 -> PP2 x VPP2, PP2 x VPP2 -> DP2,
              PP2 -> DP2, MoE EP2 -> EP1 x DP2 and back; each resume against the new shape's
              and the old shape's uninterrupted runs from a common checkpoint: losses, step,
              data position, RNG re-seed, save and load seconds
  ckpt8b      Qwen3-8B DP2 (issue 17): synchronous save, wipe, load; asynchronous save while
              two steps train, load: seconds, GB/s, each rank's peak host memory, every
              tensor compared (KUBETRON_CKPT8B_PROBE=1 also builds Megatron's gathered state)
  async_ckpt  the trainer with checkpoint.asyncSave, resumed, against an uninterrupted run
  train8b     Qwen3-8B and Llama3-8B at seq 4096, DP2, TP2+SP and PP2, fast path, decentralized
              and global groups (KUBETRON_TRAIN8B narrows it: preset:shape:both|dec|glo[:seq])
  profile8b   Qwen3-8B TP2+SP, PP2 and DP2 at seq 4096, two steps under torch.profiler on each
              rank: GPU time by kernel family, top kernels, compute / exposed communication /
              idle (KUBETRON_PROFILE8B narrows it: preset:shape[:seq],...)

Then it runs tests/gpu/test_multigpu.py and tests/gpu/test_reshard_gpu.py in this process with
pytest: the tests reuse the runs above (cached per process) instead of training again, and their
outcome goes into the JSON.

    python benchmarks/multigpu.py --output benchmarks/results/multigpu.json

Shapes are for 2 GPUs (world size = the number of visible GPUs must be 2); with fewer GPUs it
exits with a message. Pieces run in priority order and stop once `--budget-s` is spent, so a
lease that runs short still returns what finished (each skipped piece is listed).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "operator", ROOT / "trainer", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from kubetron_api.config import PRESETS, ModelArch, TrainerConfig  # noqa: E402

WORLD = 2
# "cpu" and "fp32" only to check this script's plumbing with gloo on a machine without GPUs
DEVICE, PRECISION = "cuda", "bf16"
TEST_FILES = [
    ROOT / "tests/gpu/test_multigpu.py",
    ROOT / "tests/gpu/test_reshard_gpu.py",
    ROOT / "tests/gpu/test_checkpoint_8b.py",
]
WORKDIR = Path(os.environ.get("KUBETRON_MULTIGPU_WORKDIR", tempfile.gettempdir())) / "kubetron-mg"

# ------------------------------------------------------------------------------ trainer cases


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


# qwen3-0.6b as published (28 layers: PP2 x VPP2 gives 7 layers a chunk), bf16, distributed
# optimizer; the MoE case is qwen3-30b-a3b's widths with 4 layers and 16 experts (top-4).
CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("tp2", "qwen3-0.6b", {"tensor": 2}),
        Case("dp2", "qwen3-0.6b", {}, global_first=True),
        Case("pp2", "qwen3-0.6b", {"pipeline": 2}, timed=False),
        Case("pp2_vpp2", "qwen3-0.6b", {"pipeline": 2, "virtualPipeline": 2}, timed=False),
        Case(
            "ep2_moe",
            "qwen3-30b-a3b",
            {"expert": 2},
            {"num_layers": 4, "num_experts": 16, "moe_router_topk": 4},
            seq=1024,
            timed=False,
        ),
    ]
}

# Checkpoint resharding: a small, fast-learning model (qwen3-0.6b widths, 4 layers, a 4096-token
# vocabulary), saved every 4 steps as TP2, resumed from step 4 in other shapes.
CKPT_ARCH = {"num_layers": 4, "vocab_size": 4096}
CKPT_STEPS, CKPT_AT = 8, 4
CKPT_TARGETS = {"pp2": {"pipeline": 2}, "tp1_dp2": {}}


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


def launch_trainer(cfg: dict[str, Any], workdir: Path, groups: str, *extra: str) -> Any:
    """Start the trainer's processes (one per GPU, LOCAL_RANK = rank); returns the Launch."""
    from devtools.training.launch import launch

    if workdir.exists():
        shutil.rmtree(workdir)
    return launch(cfg, workdir, "--device", DEVICE, "--attention", "sdpa", *extra, groups=groups)


def finish(started: Any, what: str, timeout: float = 150) -> dict[str, Any]:
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


def train_pair(name: str) -> dict[str, Any]:
    """Case `name` with both kinds of groups, one after the other (each alone on the GPUs)."""
    case = CASES[name]
    cfg = trainer_config(
        name,
        case.arch(),
        case.preset,
        case.parallelism,
        steps=case.steps,
        seq=case.seq,
        micro_batch=case.micro_batch,
        global_batch=case.global_batch,
        distributed_optimizer=case.distributed_optimizer,
    )
    order = ["global", "decentralized"] if case.global_first else ["decentralized", "global"]
    runs = {}
    if case.timed:
        for groups in order:
            started = launch_trainer(cfg, WORKDIR / name / groups, groups)
            runs[groups] = summarize(finish(started, f"{name} {groups}"))
    else:
        both = {groups: launch_trainer(cfg, WORKDIR / name / groups, groups) for groups in order}
        runs = {groups: summarize(finish(s, f"{name} {groups}")) for groups, s in both.items()}
    dec, glo = runs["decentralized"], runs["global"]
    diffs = [abs(a - b) for a, b in zip(dec["losses"], glo["losses"], strict=True)]
    return {
        "case": name,
        "preset": case.preset,
        "arch_overrides": case.arch_overrides,
        "parallelism": case.parallelism,
        "recipe": {
            "steps": case.steps, "seq_length": case.seq, "micro_batch": case.micro_batch,
            "global_batch": case.global_batch, "precision": PRECISION,
            "distributed_optimizer": case.distributed_optimizer, "warmup_steps_excluded": 2,
        },
        "order": order if case.timed else "both at once, 2 processes a GPU: timings not comparable",
        "decentralized": dec,
        "global": glo,
        "losses_bitwise_equal": dec["losses"] == glo["losses"],
        "max_abs_loss_diff": max(diffs),
        "step_time_ratio_decentralized_over_global": dec["median_step_s"] / glo["median_step_s"],
        "tokens_per_s_ratio": dec["tokens_per_s"] / glo["tokens_per_s"],
    }  # fmt: skip


def checkpoint_reshard() -> dict[str, Any]:
    """TP2 trains CKPT_STEPS steps saving every CKPT_AT; the step-CKPT_AT checkpoint is then
    resumed as each of CKPT_TARGETS (concurrently: only losses are compared here)."""
    arch = PRESETS["qwen3-0.6b"].model_copy(update=CKPT_ARCH)
    base = WORKDIR / "ckpt"
    if base.exists():
        shutil.rmtree(base)

    def cfg(name: str, parallelism: dict[str, int], ckpt: Path) -> dict[str, Any]:
        return trainer_config(
            f"ckpt-{name}", arch, "qwen3-0.6b", parallelism, steps=CKPT_STEPS, seq=512,
            micro_batch=2, global_batch=8, lr=3e-3, checkpoint=ckpt, save_interval=CKPT_AT,
        )  # fmt: skip

    source = base / "tp2"
    full = summarize(finish(launch_trainer(cfg("tp2", {"tensor": 2}, source), base / "run-tp2",
                                           "decentralized"), "checkpoint source tp2"))  # fmt: skip
    started = {}
    for target, parallelism in CKPT_TARGETS.items():
        ckpt = base / f"from-tp2-to-{target}"
        ckpt.mkdir(parents=True)
        shutil.copytree(source / f"iter_{CKPT_AT:07d}", ckpt / f"iter_{CKPT_AT:07d}")
        (ckpt / "latest").write_text(f"{CKPT_AT}\n")
        started[target] = launch_trainer(
            cfg(target, parallelism, ckpt), base / f"run-{target}", "decentralized"
        )
    resumed = {
        target: summarize(finish(s, f"resume as {target}"), warmup=0)
        for target, s in started.items()
    }
    after = full["losses"][CKPT_AT:]
    return {
        "arch": "qwen3-0.6b widths, " + ", ".join(f"{k}={v}" for k, v in CKPT_ARCH.items()),
        "saved_as": {"tensor": 2},
        "saved_step": CKPT_AT,
        "optimizer": "Megatron distributed optimizer, saved fully_reshardable",
        "uninterrupted_tp2": full,
        "resumed": resumed,
        "max_rel_loss_diff": {
            target: max(abs(a - b) / abs(b) for a, b in zip(r["losses"], after, strict=True))
            for target, r in resumed.items()
        },
        "loss_drop_steps_1_to_resume": full["losses"][0] - full["losses"][CKPT_AT],
    }


# ------------------------------------------------- checkpoints across PP / VPP / EP (issue 19)

# Each pair (old shape -> new shape) on 2 GPUs, bf16, distributed optimizer, mock data:
#   base       one run of the family's base shape trains steps 1..K0 and saves step K0
#   reference  every shape of the family resumes that step-K0 checkpoint and trains K0+1..N
#              without interruption, saving at K and N (the "uninterrupted run" of that shape)
#   resumed    a copy of the old shape's step-K checkpoint, resumed in the new shape, K+1..N
# On GPUs Megatron initialises each rank's shards from seeds offset by pipeline stage and by
# expert-parallel rank (seeding.rng_seeds), so runs of two shapes started at step 0 hold other
# weights; from the common step-K0 checkpoint every shape starts from the same ones, and the
# resumed run must follow both the new shape's reference and the old shape's continuation.
# Dense: the checkpoint piece's model (qwen3-0.6b widths, 4 layers, 4096-token vocabulary;
# PP2 x VPP2 holds one layer a chunk). MoE: the ep2_moe case's qwen3-30b-a3b widths, 4 layers,
# 16 experts top-4, with the same small vocabulary so that the loss moves within a few steps.
RESHARD_K0, RESHARD_K, RESHARD_N = 2, 4, 8
RESHARD_SEQ, RESHARD_MICRO, RESHARD_GBS, RESHARD_LR = 512, 2, 8, 3e-3
RESHARD_REL = 5e-3  # bf16, another order of reductions: the checkpoint piece's tolerance
# gradient norms of a resume and of the old shape's continuation (the same state at step K);
# measured on 2 H200s: at most 3.4e-4 (dense) and 4.2e-3 (MoE) apart
RESHARD_GRAD_REL = 5e-2
RESHARD_TIMEOUT_S = 150.0  # one wave's runs, up to five jobs sharing the 2 GPUs
RESHARD_TOTAL_S = 300.0  # every run is killed once the piece has run this long
RESHARD_FALLBACK_AFTER_S = 200.0  # no fallback wave once the piece has run this long
RESHARD_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("qwen3-0.6b", {"num_layers": 4, "vocab_size": 4096}),
    "moe": (
        "qwen3-30b-a3b",
        {"num_layers": 4, "num_experts": 16, "moe_router_topk": 4, "vocab_size": 4096},
    ),
}
RESHARD_SHAPES: dict[str, tuple[str, dict[str, int]]] = {
    "pp2": ("dense", {"pipeline": 2}),
    "pp2_vpp2": ("dense", {"pipeline": 2, "virtualPipeline": 2}),
    "dp2": ("dense", {}),
    "moe_ep2": ("moe", {"expert": 2}),
    "moe_ep1_dp2": ("moe", {}),
}
RESHARD_BASE = {"dense": "dp2", "moe": "moe_ep2"}  # the shape that trains steps 1..K0
# beside each base run, another shape trains steps 1..K0 from its own initial weights: how far
# runs of two shapes started at step 0 are apart (recorded, not asserted)
RESHARD_INIT_CHECK = {"dense": "pp2", "moe": "moe_ep1_dp2"}
# fresh runs (steps 1..K0, no checkpoint) recorded beside them: PP2 x VPP2 with decentralized
# and with Megatron's global groups (its gradient norms after a resume were 1e4 times PP2's)
RESHARD_FRESH = [("pp2_vpp2", "decentralized"), ("pp2_vpp2", "global")]
RESHARD_PAIRS = [
    ("pp2", "pp2_vpp2"),
    ("pp2_vpp2", "dp2"),
    ("pp2", "dp2"),
    ("moe_ep2", "moe_ep1_dp2"),
    ("moe_ep1_dp2", "moe_ep2"),
    ("pp2_vpp2", "pp2_vpp2"),  # control: the same shape (RNG restored)
]
RESEED_LOG = "RNG states not loaded (saved by another shape): re-seeded"
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \[rank 0\]")
_SAVED = re.compile(r"saved checkpoint of step (\d+) to \S+ in ([0-9.]+)s")
_ERROR = re.compile(r"^\s*([\w.]+(Error|Exception)|AssertionError)\b.*")


def pair_key(old: str, new: str) -> str:
    return f"{old}_to_{new}"


def reshard_config(
    name: str, shape: str, ckpt: Path | None, steps: int, interval: int
) -> dict[str, Any]:
    family, parallelism = RESHARD_SHAPES[shape]
    preset, overrides = RESHARD_MODELS[family]
    arch = PRESETS[preset].model_copy(update=overrides)
    return trainer_config(
        f"rs-{name}", arch, preset, parallelism, steps=steps, seq=RESHARD_SEQ,
        micro_batch=RESHARD_MICRO, global_batch=RESHARD_GBS, lr=RESHARD_LR, checkpoint=ckpt,
        save_interval=interval, decay_iters=RESHARD_N,  # one LR schedule for every run
    )  # fmt: skip


def copy_step(source: Path, step: int, dest: Path | None) -> None:
    """`dest` as a checkpoint directory holding `source`'s step `step` only, `latest` on it."""
    assert dest is not None
    dest.mkdir(parents=True)
    shutil.copytree(source / f"iter_{step:07d}", dest / f"iter_{step:07d}")
    (dest / "latest").write_text(f"{step}\n")


def log_times(log: str) -> dict[str, Any]:
    """From rank 0's log: each save's seconds (the trainer's own timing) and the load's wall
    seconds, from the line logged after setup to 'resumed from' (the files' metadata, the
    sharded load, model, optimizer and scheduler state, the RNG)."""
    saves = {m.group(1): float(m.group(2)) for m in _SAVED.finditer(log)}
    began = resumed = None
    for line in log.splitlines():
        stamp = _LOG_TIME.match(line)
        if stamp is None:
            continue
        when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if "kubetron trainer:" in line:
            began = when
        elif "resumed from" in line and began is not None:
            resumed = when
    load = (resumed - began).total_seconds() if began and resumed else None
    return {"save_s": saves, "load_s": load}


def failure(started: Any, codes: list[int] | None, err: str | None = None) -> dict[str, Any]:
    """What a failed run said: its exit codes, each rank's last error line and log tail."""
    errors, tails = [], []
    for log in started.logs:
        text = log.read_text() if log.exists() else ""
        lines = text.splitlines()
        found = [m.group(0).strip() for m in map(_ERROR.match, lines) if m]
        found = found or [line for line in lines if "] ERROR " in line]
        errors.append(found[-1] if found else None)
        tails.append(text[-2500:])
    return {"status": "failed", "exit_codes": codes, "error": err or errors[0] or errors[-1],
            "errors_per_rank": errors, "log_tails": tails}  # fmt: skip


def reshard_record(started: Any, ckpt: Path | None) -> dict[str, Any]:
    result = started.result()
    steps = result["steps"]
    saved = {}
    latest = ckpt / "latest" if ckpt else None
    for meta_file in sorted(ckpt.glob("iter_*/kubetron.json") if ckpt else []):
        meta = json.loads(meta_file.read_text())
        saved[str(meta["step"])] = {k: meta[k] for k in ("shape", "consumedSamples", "step")}
    return {
        "status": "ok",
        "resumed_from": result["resumed_from"],
        "rng": result["rng"],
        "first_sample": result["first_sample"],
        "reseed_logged": RESEED_LOG in started.output(),
        "steps": [s["step"] for s in steps],
        "losses": [s["loss"] for s in steps],
        "lrs": [s["lr"] for s in steps],
        "grad_norms": [s["grad_norm"] for s in steps],
        **log_times(started.logs[0].read_text()),
        "wall_s": result["wall_s"],
        "peak_memory_gib_rank0": result.get("peak_memory_gib"),
        "groups": result["groups"],
        "latest": latest.read_text().strip() if latest and latest.exists() else None,
        "saved": saved,
    }


def wait_job(started: Any, deadline: float, grace_s: float = 15.0) -> list[int] | None:
    """Exit codes of a job's processes; once one rank failed the others get `grace_s` (a rank
    left in a collective would wait for the collective timeout), then are killed. None when
    the deadline passed first (every process killed)."""
    failed_at = None
    while True:
        codes = [p.poll() for p in started.procs]
        if all(c is not None for c in codes):
            return codes  # type: ignore[return-value]
        now = time.monotonic()
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = now
        if now > deadline or (failed_at is not None and now - failed_at > grace_s):
            for proc in started.procs:
                if proc.poll() is None:
                    proc.kill()
            final = [proc.wait() for proc in started.procs]
            return None if failed_at is None else final
        time.sleep(0.5)


Job = tuple[dict[str, Any], Path | None, str]  # trainer config, checkpoint path, groups


def run_wave(jobs: dict[str, Job], base: Path, deadline: float) -> dict[str, Any]:
    """Start every job at once (up to six jobs, two processes each, on the 2 GPUs: their
    timings are shared), wait for all; a failed job is recorded with what it said."""
    started, out = {}, {}
    for name, (cfg, _, groups) in jobs.items():
        started[name] = launch_trainer(cfg, base / name / "run", groups)
    limit = deadline - time.monotonic()
    for name, s in started.items():
        codes = wait_job(s, deadline)
        if codes is None:
            out[name] = failure(s, None, f"no exit within {limit:.0f}s (killed)")
        elif codes != [0] * len(codes):
            out[name] = failure(s, codes)
        else:
            out[name] = reshard_record(s, jobs[name][1])
    return out


def by_step(run: dict[str, Any], steps: range, what: str = "losses") -> list[float] | None:
    if run.get("status") != "ok":
        return None
    losses = dict(zip(run["steps"], run[what], strict=True))
    return [losses[s] for s in steps] if all(s in losses for s in steps) else None


def max_rel(a: list[float] | None, b: list[float] | None) -> float | None:
    if a is None or b is None:
        return None
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def reshard_runs() -> dict[str, Any]:
    """Three waves: each family's base run to K0; every shape from K0 to N (saving at K);
    each pair's resume of the old shape's step K in the new shape. A failed run is recorded
    (its error and log tails) and only the runs that need it are left out; an old shape whose
    reference failed is trained from step 0 instead (`fresh_<shape>`, its own initial weights,
    so that pair is compared with the old shape's continuation only)."""
    k0, k, n = RESHARD_K0, RESHARD_K, RESHARD_N
    base = WORKDIR / "reshard"
    if base.exists():
        shutil.rmtree(base)
    began = time.monotonic()
    report: dict[str, Any] = {
        "steps": {"base_to": k0, "resume_at": k, "to": n},
        "recipe": {"seq_length": RESHARD_SEQ, "micro_batch": RESHARD_MICRO,
                   "global_batch": RESHARD_GBS, "lr": RESHARD_LR, "warmup": 1,
                   "decay_iters": n, "precision": PRECISION, "distributed_optimizer": True,
                   "optimizer_sharding": "fully_reshardable", "data": "mock"},
        "models": {f: {"preset": p, "overrides": o} for f, (p, o) in RESHARD_MODELS.items()},
        "shapes": {s: {"model": f, "parallelism": v} for s, (f, v) in RESHARD_SHAPES.items()},
        "base_shape": RESHARD_BASE,
        "tolerance_rel": RESHARD_REL,
        "concurrency": "each wave's jobs at once on the 2 GPUs (save/load seconds are shared)",
        "wave_s": {},
        "runs": {},
    }  # fmt: skip

    def wave(label: str, jobs: dict[str, Job]) -> dict[str, Any]:
        t0 = time.monotonic()
        deadline = min(t0 + RESHARD_TIMEOUT_S, began + RESHARD_TOTAL_S)
        out = run_wave(jobs, base, deadline) if jobs else {}
        report["wave_s"][label] = time.monotonic() - t0
        report["runs"][label] = out
        (base / "partial.json").write_text(json.dumps(report, indent=1))
        return out

    def job(name: str, shape: str, steps: int, interval: int, save: bool = True) -> Job:
        ckpt = base / name / "ckpt" if save else None
        groups = "global" if name.endswith("_global") else "decentralized"
        return reshard_config(name, shape, ckpt, steps, interval), ckpt, groups

    base.mkdir(parents=True)
    jobs: dict[str, Job] = {
        f"base_{f}": job(f"base_{f}", shape, k0, k0) for f, shape in RESHARD_BASE.items()
    }
    jobs |= {f"init_{s}": job(f"init_{s}", s, k0, k0, False) for s in RESHARD_INIT_CHECK.values()}
    for shape, groups in RESHARD_FRESH:
        name = f"fresh0_{shape}" + ("_global" if groups == "global" else "")
        jobs[name] = job(name, shape, k0, k0, False)
    bases = wave("base", jobs)
    report["init_check"] = {
        f: {
            "shapes": [RESHARD_BASE[f], other],
            "losses": [bases[f"base_{f}"].get("losses"), bases[f"init_{other}"].get("losses")],
            "max_rel_diff": max_rel(
                bases[f"base_{f}"].get("losses"), bases[f"init_{other}"].get("losses")
            ),
        }
        for f, other in RESHARD_INIT_CHECK.items()
    }

    jobs = {}
    refs: dict[str, Any] = {}
    for shape, (family, _) in RESHARD_SHAPES.items():
        name = f"ref_{shape}"
        if bases[f"base_{family}"]["status"] != "ok":
            refs[name] = {"status": "not run", "error": f"base_{family} failed"}
            continue
        jobs[name] = job(name, shape, n, k)
        copy_step(base / f"base_{family}" / "ckpt", k0, jobs[name][1])
    refs |= wave("reference", jobs)
    report["runs"]["reference"] = refs

    olds = {old for old, _ in RESHARD_PAIRS}
    sources = {old: f"ref_{old}" for old in olds if refs[f"ref_{old}"]["status"] == "ok"}
    missing = sorted(olds - set(sources))
    fresh: dict[str, Any] = {}
    if missing and time.monotonic() - began < RESHARD_FALLBACK_AFTER_S:
        fresh = wave("fresh", {f"fresh_{s}": job(f"fresh_{s}", s, n, k) for s in missing})
        sources |= {s: f"fresh_{s}" for s in missing if fresh[f"fresh_{s}"]["status"] == "ok"}
    done = refs | fresh

    jobs = {}
    resumed: dict[str, Any] = {}
    for old, new in RESHARD_PAIRS:
        name = pair_key(old, new)
        if old not in sources:
            resumed[name] = {"status": "not run", "error": f"no run of {old} saved step {k}"}
            continue
        jobs[name] = job(name, new, n, k)
        copy_step(base / sources[old] / "ckpt", k, jobs[name][1])
    resumed |= wave("resumed", jobs)
    report["runs"]["resumed"] = resumed

    after = range(k + 1, n + 1)
    pairs = {}
    for old, new in RESHARD_PAIRS:
        run: dict[str, Any] = resumed[pair_key(old, new)]
        source = sources.get(old)
        ref_old: dict[str, Any] = done.get(source or "", {"status": "not run"})
        ref_new: dict[str, Any] = (
            refs[f"ref_{new}"] if source == f"ref_{old}" else {"status": "not comparable"}
        )
        got, want, cont = by_step(run, after), by_step(ref_new, after), by_step(ref_old, after)
        pairs[pair_key(old, new)] = {
            "old": old,
            "new": new,
            "old_parallelism": RESHARD_SHAPES[old][1],
            "new_parallelism": RESHARD_SHAPES[new][1],
            "source_run": source,
            "status": run["status"],
            "error": run.get("error"),
            "steps": list(after),
            "losses_resumed": got,
            "losses_uninterrupted_new": want,
            "losses_uninterrupted_old": cont,
            "max_rel_diff_vs_new": max_rel(got, want),
            "max_rel_diff_vs_old": max_rel(got, cont),
            "grad_norms_resumed": run.get("grad_norms"),
            "max_rel_grad_norm_diff_vs_old": max_rel(
                run.get("grad_norms"), by_step(ref_old, after, "grad_norms")
            ),
            "max_rel_grad_norm_diff_vs_new": max_rel(
                run.get("grad_norms"), by_step(ref_new, after, "grad_norms")
            ),
            "save_s_old_at_k": ref_old.get("save_s", {}).get(str(k)),
            "load_s": run.get("load_s"),
            "save_s_new_at_n": run.get("save_s", {}).get(str(n)),
        }
    report["pairs"] = pairs
    (base / "partial.json").write_text(json.dumps(report, indent=1))
    return report


# ------------------------------------------------------------------ sequence parallelism (TE-free)

# The trainer runs: qwen3-0.6b as published at TP2, like the tp2 case, on the local spec and with
# `fastPath: on` (at TP2 that is norm+rope+cudnn+adam: ce needs TP1, wgrad needs ce or untied
# embeddings), each with and without sequence parallelism, then SP on Megatron's global groups.
SP_CASE = Case("sp", "qwen3-0.6b", {"tensor": 2})
SP_PATHS = {"local": "off", "fast": "on"}
# The gradient check: qwen3-0.6b widths, 4 layers (q/k norms), a 4096-token vocabulary, fp32,
# 2 micro-batches of 2 x 1024 tokens; the fast path's norm piece is Liger's RMSNorm in fp32.
SP_GRAD_ARCH = {"num_layers": 4, "vocab_size": 4096}
SP_GRAD_PATHS = {"local": "off", "fast_norm": "norm"}


def sp_trainer_config(name: str, sp: bool, fast_path: str) -> dict[str, Any]:
    case = SP_CASE
    return trainer_config(
        name, case.arch(), case.preset, {**case.parallelism, "sequenceParallel": sp},
        steps=case.steps, seq=case.seq, micro_batch=case.micro_batch,
        global_batch=case.global_batch, distributed_optimizer=case.distributed_optimizer,
        fast_path=fast_path,
    )  # fmt: skip


def loss_diffs(a: list[float], b: list[float]) -> dict[str, Any]:
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return {
        "abs_loss_diff_per_step": diffs,
        "max_abs_loss_diff": max(diffs),
        "max_rel_loss_diff": max(d / abs(y) for d, y in zip(diffs, b, strict=True)),
        "losses_bitwise_equal": a == b,
    }


def sequence_parallel_runs() -> dict[str, Any]:
    """TP2 with and without SP per path, one run after the other (each alone on the GPUs;
    the order alternates between paths), then SP on the local spec with global groups."""
    runs: dict[str, Any] = {}
    plan = []
    for i, (path, fast) in enumerate(SP_PATHS.items()):
        order = [False, True] if i % 2 == 0 else [True, False]
        plan += [(f"{path}_{'sp' if sp else 'nosp'}", sp, fast, "decentralized") for sp in order]
    plan.append(("local_sp_global", True, SP_PATHS["local"], "global"))
    for name, sp, fast, groups in plan:
        cfg = sp_trainer_config(name, sp, fast)
        started = launch_trainer(cfg, WORKDIR / "sp" / name, groups)
        runs[name] = summarize(finish(started, f"sp {name}")) | {"fast_path": fast, "sp": sp}
    compare = {}
    for path in SP_PATHS:
        on, off = runs[f"{path}_sp"], runs[f"{path}_nosp"]
        compare[path] = loss_diffs(on["losses"], off["losses"]) | {
            "peak_memory_gib_rank0": {"sp": on["peak_memory_gib_rank0"],
                                      "nosp": off["peak_memory_gib_rank0"]},
            "median_step_s": {"sp": on["median_step_s"], "nosp": off["median_step_s"]},
            "step_time_ratio_sp_over_nosp": on["median_step_s"] / off["median_step_s"],
            "tokens_per_s": {"sp": on["tokens_per_s"], "nosp": off["tokens_per_s"]},
        }  # fmt: skip
    glo, dec = runs["local_sp_global"], runs["local_sp"]
    compare["local_sp_decentralized_vs_global"] = loss_diffs(dec["losses"], glo["losses"])
    case = SP_CASE
    return {
        "preset": case.preset,
        "parallelism": {**case.parallelism, "sequenceParallel": "both"},
        "recipe": {
            "steps": case.steps, "seq_length": case.seq, "micro_batch": case.micro_batch,
            "global_batch": case.global_batch, "precision": PRECISION,
            "distributed_optimizer": case.distributed_optimizer, "warmup_steps_excluded": 2,
        },
        "order": [name for name, *_ in plan],
        "runs": runs,
        "compare": compare,
    }  # fmt: skip


def sp_grads_worker(out_dir: Path) -> None:
    """One torchrun process of the gradient check: per path, the same seed, data and TP2 model
    without and with SP; one forward/backward through the trainer's GpuEngine (Megatron's DDP,
    schedule and finalize_model_grads), then every parameter's `main_grad` compared."""
    import torch.distributed as dist

    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.data.batches import build_batches
    from kubetron_trainer.models.build import build_model
    from kubetron_trainer.models.fused import FastPath
    from kubetron_trainer.runtime.loop import make_groups
    from kubetron_trainer.runtime.parallel import init_distributed
    from kubetron_trainer.runtime.seeding import setup_megatron_globals
    from kubetron_trainer.runtime.step_gpu import GpuEngine
    from kubetron_trainer.runtime.topology import Topology

    topo = Topology.from_env()
    init_distributed(topo, "nccl")
    device = torch.device("cuda", topo.local_rank)
    arch = PRESETS["qwen3-0.6b"].model_copy(update=SP_GRAD_ARCH)
    pg = None
    report: dict[str, Any] = {"arch": SP_GRAD_ARCH, "precision": "fp32", "paths": {}}
    for path, fast in SP_GRAD_PATHS.items():
        seen: dict[bool, Any] = {}
        for sp in (False, True):
            raw = trainer_config(
                f"spg-{path}", arch, "qwen3-0.6b", {"tensor": 2, "sequenceParallel": sp},
                steps=1, seq=1024, micro_batch=2, global_batch=4,
                distributed_optimizer=False, fast_path=fast, precision="fp32",
            )  # fmt: skip
            cfg = TrainerConfig.model_validate(raw)
            dims = ParallelDims.from_degrees(WORLD, tp=2)
            if pg is None:
                pg = make_groups(cfg, dims, topo, "nccl", "decentralized")
            setup_megatron_globals(pg, cfg.recipe.seed)
            built = build_model(cfg, dims, pg, device, "sdpa", FastPath.parse(fast))
            engine = GpuEngine(cfg, built.chunks, pg, fast=built.fast)
            batches = build_batches(cfg, reads_data=True, dp_rank=0, dp_size=1, device=device)
            losses = engine.forward_backward(batches.step(0))
            named = list(engine.model[0].named_parameters())
            grads = {n: p.main_grad.detach().float().clone() for n, p in named}
            marked = [n for n, p in named if getattr(p, "sequence_parallel", False)]
            # the all-reduced norm gradients must be equal on both tensor-parallel ranks
            spread = 0.0
            for n in marked:
                first = grads[n].clone()
                dist.broadcast(first, src=dist.get_global_rank(pg.tp, 0), group=pg.tp)
                spread = max(spread, float((grads[n] - first).abs().max()))
            seen[sp] = {
                "losses": [float(x["lm loss"]) for x in losses],
                "grads": grads,
                "marked": marked,
                "tp_spread": spread,
                "attention": built.attention,
            }
            del engine, built
            torch.cuda.empty_cache()
        off, on = seen[False], seen[True]
        rel = {
            n: float((on["grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
            for n, g in off["grads"].items()
        }
        norms = {n: r for n, r in rel.items() if n in on["marked"]}
        worst = max(rel, key=lambda n: rel[n])
        report["paths"][path] = {
            "fast_path": fast,
            "attention": on["attention"],
            "losses": {"nosp": off["losses"], "sp": on["losses"]},
            "max_abs_loss_diff": max(
                abs(a - b) for a, b in zip(on["losses"], off["losses"], strict=True)
            ),
            "params": len(rel),
            "sp_marked_params": len(on["marked"]),
            "sp_marked_without_sp": len(off["marked"]),
            "max_rel_grad_diff": rel[worst],
            "worst_param": worst,
            "max_rel_grad_diff_norms": max(norms.values()) if norms else None,
            "sp_norm_grad_spread_over_tp": on["tp_spread"],
        }
    (out_dir / f"rank{topo.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def sp_grads_run() -> dict[str, Any]:
    """One torchrun of `sp_grads_worker` over both GPUs; rank 0's report plus rank 1's spread."""
    out = WORKDIR / "sp-grads"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ranks = torchrun_worker(["--sp-worker", str(out)], out)
    report = ranks[0]
    report["rank1"] = {p: r["sp_norm_grad_spread_over_tp"] for p, r in ranks[1]["paths"].items()}
    return dict(report)


def torchrun_worker(args: list[str], out: Path, timeout: float = 200) -> list[dict[str, Any]]:
    """This script under torchrun, one process a GPU, with `args`; every rank's JSON from
    `out/rank<r>.json`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={WORLD}", __file__, *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "trainer"), str(ROOT / "operator"), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"workers failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


# ------------------------------------------------------------ checkpoints at 8B (issue 17)

# Qwen3-8B as published, DP2, bf16, distributed optimizer: one training step (so Adam's moments
# exist), then in one torchrun process a GPU: a synchronous save, the state wiped and loaded
# back (every tensor's checksum compared), the step removed, an asynchronous save while two
# more steps train, loaded back and compared again. Each phase's seconds, the bytes written
# and each rank's peak host memory (resident set, sampled every 50 ms, its forked writers
# counted apart). The checkpoint is 14 bytes a parameter (bf16 weights, fp32 main weights and
# two Adam moments): 115 GB for Qwen3-8B, so one at a time, where the most space is free; with
# too little space the model keeps fewer layers (recorded). Last, Megatron's own
# fully_reshardable state (what the trainer saved before) is built, not written, to record
# the host memory it takes.
CKPT8B_PRESET, CKPT8B_SEQ = "qwen3-8b", 1024
CKPT8B_BYTES_PER_PARAM = 14
CKPT8B_DIRS = ("/tmp", "/dev/shm", str(Path.home()), str(ROOT))


def _rss_kib(pid: int) -> tuple[int, int]:
    """(resident, peak resident) KiB of one process from /proc (0, 0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields.get("VmRSS", "0 kB").split()[0]), int(fields.get("VmHWM", "0 kB").split()[0])


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


class RssSampler:
    """Peak resident memory of this process and of its descendants (the async writer's forked
    processes) while inside, sampled by a thread every `period` seconds."""

    def __init__(self, period: float = 0.05) -> None:
        import threading

        self.period = period
        self.peak_self = self.peak_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = os.getpid()
        self.peak_self = max(self.peak_self, _rss_kib(me)[0])
        kids = sum(_rss_kib(k)[0] for k in _descendants(me))
        self.peak_children = max(self.peak_children, kids)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict[str, float]:
        return {"peak_rss_gib": self.peak_self / 2**20,
                "peak_children_rss_gib": self.peak_children / 2**20}  # fmt: skip


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mount_of(path: str) -> dict[str, str]:
    """The /proc/mounts entry (longest mount point) that holds `path`."""
    best = {"mount": "/", "fstype": "?"}
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        point = parts[1]
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(
            best["mount"]
        ):
            best = {"mount": point, "fstype": parts[2]}
    return best


def _pick_ckpt_dir(need: int) -> tuple[Path, dict[str, Any]]:
    """The candidate directory on a disk (not memory-backed: a checkpoint written into RAM
    competes with the trainers' own host memory) with the most free space; every candidate's
    numbers and file system recorded."""
    seen: dict[str, dict[str, Any]] = {}
    for d in CKPT8B_DIRS:
        if os.path.isdir(d):
            usage = shutil.disk_usage(d)
            seen[d] = {"free_gib": usage.free / 2**30, "total_gib": usage.total / 2**30,
                       **_mount_of(os.path.realpath(d))}  # fmt: skip
    disks = [d for d in seen if seen[d]["fstype"] not in ("tmpfs", "ramfs")] or list(seen)
    best = max(disks, key=lambda d: seen[d]["free_gib"])
    return Path(best) / "kubetron-ckpt8b", {"candidates": seen, "need_gib": need / 2**30}


def _state_checksums(engine: Any) -> list[float]:
    """Float64 sums of every model weight, fp32 main weight and optimizer moment of this rank."""
    from kubetron_trainer.runtime.optimizer import megatron_optimizers

    sums = [float(p.detach().double().sum()) for m in engine.model for p in m.parameters()]
    for opt in megatron_optimizers(engine.optimizer):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                sums.append(float(p.detach().double().sum()))
                for v in opt.optimizer.state[p].values():
                    if isinstance(v, torch.Tensor) and v.numel() > 1:
                        sums.append(float(v.detach().double().sum()))
    return sums


def _wipe_state(engine: Any) -> None:
    """Zero every weight, main weight and moment: a load must write all of them back."""
    from kubetron_trainer.runtime.optimizer import megatron_optimizers

    with torch.no_grad():
        for m in engine.model:
            for p in m.parameters():
                p.zero_()
        for opt in megatron_optimizers(engine.optimizer):
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    p.zero_()
                    for v in opt.optimizer.state[p].values():
                        if isinstance(v, torch.Tensor) and v.numel() > 1:
                            v.zero_()


def ckpt8b_worker(out_dir: Path, megatron_probe: bool) -> None:
    """One torchrun process of the 8B checkpoint piece (see CKPT8B_PRESET)."""
    import torch.distributed as dist

    from kubetron_api.ckpt_meta import RunIdentity
    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.data.batches import build_batches
    from kubetron_trainer.models.build import build_model
    from kubetron_trainer.models.fused import FastPath
    from kubetron_trainer.runtime import checkpoint as ck
    from kubetron_trainer.runtime.loop import make_groups
    from kubetron_trainer.runtime.optimizer import build_scheduler
    from kubetron_trainer.runtime.parallel import init_distributed
    from kubetron_trainer.runtime.seeding import setup_megatron_globals
    from kubetron_trainer.runtime.step_gpu import GpuEngine
    from kubetron_trainer.runtime.topology import Topology

    topo = Topology.from_env()
    init_distributed(topo, "nccl")
    device = torch.device("cuda", topo.local_rank)
    rank = topo.rank
    arch = PRESETS[CKPT8B_PRESET]
    params = 8.19e9 * arch.num_layers / 36 if CKPT8B_PRESET == "qwen3-8b" else 8.03e9
    need = int(params * CKPT8B_BYTES_PER_PARAM * 1.05)
    root, space = _pick_ckpt_dir(need)
    free = space["candidates"][str(root.parent)]["free_gib"] * 2**30
    if free < need:  # fewer layers, recorded
        layers = max(2, int(arch.num_layers * free / need) - 1)
        arch = arch.model_copy(update={"num_layers": layers})
    report: dict[str, Any] = {"rank": rank, "space": space, "dir": str(root),
                              "num_layers": arch.num_layers, "phases": {}}  # fmt: skip

    def flush() -> None:
        (out_dir / f"rank{rank}.json").write_text(json.dumps(report))

    raw = trainer_config(
        "ckpt8b", arch, CKPT8B_PRESET, {}, steps=4, seq=CKPT8B_SEQ, micro_batch=1,
        global_batch=2, fast_path="on", checkpoint=root, save_interval=100,
    )  # fmt: skip
    cfg = TrainerConfig.model_validate(raw)
    dims = ParallelDims.from_degrees(WORLD)
    pg = make_groups(cfg, dims, topo, "nccl", "decentralized")
    setup_megatron_globals(pg, cfg.recipe.seed)
    t0 = time.perf_counter()
    built = build_model(cfg, dims, pg, device, "sdpa", FastPath.parse("on"))
    engine = GpuEngine(cfg, built.chunks, pg, fast=built.fast)
    scheduler = build_scheduler(engine.optimizer, cfg.recipe)
    batches = build_batches(cfg, reads_data=True, dp_rank=pg.dp.rank(), dp_size=pg.dp.size(),
                            device=device)  # fmt: skip
    report["build_s"] = time.perf_counter() - t0
    report["params"] = sum(p.numel() for m in built.chunks for p in m.parameters())
    engine.step(batches.step(0))
    scheduler.step(1)
    torch.cuda.synchronize()
    if rank == 0 and root.exists():
        shutil.rmtree(root)
    dist.barrier()
    identity = RunIdentity.from_config(cfg, dims, built.padded_vocab_size)

    def checkpointer(async_save: bool) -> Any:
        return ck.Checkpointer(root, built.chunks, engine.optimizer, scheduler, pg, device,
                               identity, async_save=async_save)  # fmt: skip

    def timed(name: str, fn: Any) -> Any:
        dist.barrier()
        with RssSampler() as rss:
            began = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - began
        dist.barrier()
        report["phases"][name] = {"s": seconds, **rss.report()}
        flush()
        return out

    def roundtrip(name: str, before: list[float]) -> None:
        _wipe_state(engine)
        timed(f"{name}_load", lambda: checkpointer(False).load_latest())
        engine.after_load()
        after = _state_checksums(engine)
        report["phases"][f"{name}_load"]["tensors_compared"] = len(before)
        report["phases"][f"{name}_load"]["tensors_differing"] = sum(
            a != b for a, b in zip(before, after, strict=True)
        )
        flush()

    try:
        _ckpt8b_phases(report, flush, timed, roundtrip, checkpointer, engine, scheduler, batches,
                       root, rank)  # fmt: skip
        if megatron_probe:
            _ckpt8b_probe(report, flush, timed, engine, built, pg)
    except Exception:
        import traceback

        report["error"] = traceback.format_exc()[-4000:]
        flush()
        raise
    report["done"] = True
    flush()
    dist.barrier()
    dist.destroy_process_group()


def _ckpt8b_phases(
    report: dict[str, Any], flush: Any, timed: Any, roundtrip: Any, checkpointer: Any,
    engine: Any, scheduler: Any, batches: Any, root: Path, rank: int,
) -> None:  # fmt: skip
    import torch.distributed as dist

    from kubetron_api.ckpt_meta import read_latest
    from kubetron_trainer.runtime import checkpoint as ck

    # 1. synchronous save of step 1, load back
    before = _state_checksums(engine)
    timed("sync_save", lambda: checkpointer(False).save(1, 2))
    written = _dir_bytes(ck.step_dir(root, 1))
    report["phases"]["sync_save"]["rank_bytes"] = written  # the whole step, read by each rank
    report["phases"]["sync_save"]["latest"] = read_latest(root)
    roundtrip("sync", before)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(ck.step_dir(root, 1))
    dist.barrier()

    # 2. asynchronous save of step 2 while two steps train, then load it back
    engine.step(batches.step(1))
    scheduler.step(1)
    before = _state_checksums(engine)
    asyncer = checkpointer(True)
    step_s: list[float] = []
    with RssSampler() as rss:
        dist.barrier()
        began = time.perf_counter()
        blocked = asyncer.save(2, 4)
        for i in (2, 3):
            asyncer.finalize()
            t = time.perf_counter()
            engine.step(batches.step(i))
            torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t)
        waited = time.perf_counter()
        asyncer.finalize(blocking=True)
        total = time.perf_counter() - began
        waited = time.perf_counter() - waited
        asyncer.close()
    report["phases"]["async_save"] = {
        "blocked_s": blocked, "total_s": total, "final_wait_s": waited,
        "step_s_while_writing": step_s, "latest": read_latest(root),
        "rank_bytes": _dir_bytes(ck.step_dir(root, 2)), **rss.report(),
    }  # fmt: skip
    flush()
    # the model and optimizer have moved on two steps: load step 2 back and compare
    roundtrip("async", before)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root)
    dist.barrier()


def _ckpt8b_probe(
    report: dict[str, Any], flush: Any, timed: Any, engine: Any, built: Any, pg: Any
) -> None:
    """Megatron's own fully_reshardable state (gathered on every rank), built, not written."""
    from kubetron_trainer.runtime import checkpoint as ck

    meta = {"distrib_optim_sharding_type": "fully_reshardable", "dp_cp_group": pg.dp_cp,
            "chained_optim_avoid_prefix": True}  # fmt: skip

    def build() -> None:
        model = {"model": ck.sharded_model_state(built.chunks[0], pg)}
        state = engine.optimizer.sharded_state_dict(model, is_loading=False, metadata=meta)
        del state

    report["phases"]["megatron_gather_probe"] = {"started": True}
    flush()
    torch.cuda.empty_cache()
    timed("megatron_gather_probe", build)


def _hung_stacks(log: str) -> list[str]:
    """The Python stack lines faulthandler wrote for each thread after a SIGABRT."""
    keep = [ln for ln in log.splitlines() if ln.startswith(("Thread 0x", "Current thread 0x",
                                                           "  File "))]  # fmt: skip
    return keep[-80:]


def _reported_done(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("done"))
    except (OSError, ValueError):  # not there yet, or being written
        return False


def _run_until_reported(
    args: list[str], out: Path, timeout: float, exit_grace: float = 45
) -> tuple[list[dict[str, Any]], str | None, dict[str, Any]]:
    """This script under torchrun (its own process group), one process a GPU, until every rank
    wrote `"done"` to `out/rank<r>.json` and exited. A process left `exit_grace` seconds after
    that (or at `timeout`) gets SIGABRT, so faulthandler prints where each thread is (kept in
    the result), then the whole group is killed."""
    import signal

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={WORLD}", __file__, *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                        "PYTHONFAULTHANDLER": "1"}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "trainer"), str(ROOT / "operator"), env.get("PYTHONPATH", "")]
    )
    log_path = out / "torchrun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        began, reported_at = time.monotonic(), None
        info: dict[str, Any] = {}
        while proc.poll() is None:
            time.sleep(1)
            files = [out / f"rank{r}.json" for r in range(WORLD)]
            if reported_at is None and all(_reported_done(f) for f in files):
                reported_at = time.monotonic()
            late = reported_at is not None and time.monotonic() - reported_at > exit_grace
            if late or time.monotonic() - began > timeout:
                info["hung_after_report"] = late
                for pid in _descendants(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGABRT)
                time.sleep(5)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
    text = log_path.read_text()
    info |= {"returncode": proc.returncode, "exit_s_after_report": (
        time.monotonic() - reported_at if reported_at else None)}  # fmt: skip
    if info.get("hung_after_report") is not None:
        info["stacks"] = _hung_stacks(text)
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    failed = None if proc.returncode == 0 else text[-4000:]
    return ranks, failed, info


def ckpt8b_run(megatron_probe: bool = False) -> dict[str, Any]:
    """One torchrun of `ckpt8b_worker` over both GPUs; both ranks' reports."""
    out = Path(os.environ.get("KUBETRON_CKPT8B_OUT", WORKDIR / "ckpt8b"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    args = ["--ckpt8b-worker", str(out)] + ([] if megatron_probe else ["--no-probe"])
    began = time.perf_counter()
    ranks, failed, exit_info = _run_until_reported(args, out, timeout=450)
    if not ranks:
        raise RuntimeError(failed or "no rank reported")
    report: dict[str, Any] = {
        "preset": CKPT8B_PRESET, "parallelism": "DP2 (data parallel 2)",
        "optimizer": "Megatron distributed optimizer, fully_reshardable format (kubetron's "
                     "gather-free writer), bf16 weights + fp32 main weights and Adam moments",
        "wall_s": time.perf_counter() - began, "error": failed, "exit": exit_info,
        "ranks": ranks,
    }  # fmt: skip
    sync = [r["phases"].get("sync_save") for r in ranks]
    if all(sync) and all("rank_bytes" in x for x in sync):
        size = sync[0]["rank_bytes"]
        report["checkpoint_gb"] = size / 1e9
        for name in ("sync_save", "sync_load", "async_load"):
            secs = [r["phases"][name]["s"] for r in ranks if name in r["phases"]]
            if secs:
                report[f"{name}_gb_per_s"] = size / 1e9 / max(secs)
        asy = [r["phases"].get("async_save") for r in ranks]
        if all(asy) and all("total_s" in a for a in asy):
            report["async_save_total_gb_per_s"] = size / 1e9 / max(a["total_s"] for a in asy)
    return report


# ------------------------------------------------- asynchronous saves in the trainer (issue 17)

# qwen3-0.6b widths, 4 layers, a 4096-token vocabulary, DP2: `checkpoint.asyncSave` saving every
# 2 steps to step 6 (steps 2 and 4 in the background, 6 at the end synchronously), resumed to
# step 8; beside it the same 8 steps uninterrupted without checkpoints.
ASYNC_ARCH = {"num_layers": 4, "vocab_size": 4096}
ASYNC_STEPS, ASYNC_TO, ASYNC_EVERY = 6, 8, 2


def launch_dumpable(cfg: dict[str, Any], workdir: Path) -> Any:
    """The trainer (decentralized groups) with faulthandler on: a SIGABRT prints every
    thread's Python stack into the rank's log."""
    from devtools.training.launch import launch

    if workdir.exists():
        shutil.rmtree(workdir)
    return launch(cfg, workdir, "--device", DEVICE, "--attention", "sdpa",
                  extra_env={"PYTHONFAULTHANDLER": "1"})  # fmt: skip


def wait_or_dump(started: Any, timeout: float = 240, exit_grace: float = 30) -> dict[str, Any]:
    """Exit codes of a trainer launch; a rank still running `exit_grace` seconds after rank 0
    logged 'done' (or at `timeout`) gets SIGABRT, and its stacks are kept, then is killed."""
    import signal

    began, done_at = time.monotonic(), None
    while any(p.poll() is None for p in started.procs):
        time.sleep(0.5)
        if done_at is None and "kubetron_trainer: done:" in started.logs[0].read_text():
            done_at = time.monotonic()
        late = done_at is not None and time.monotonic() - done_at > exit_grace
        if late or time.monotonic() - began > timeout:
            alive = [i for i, p in enumerate(started.procs) if p.poll() is None]
            for i in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(started.procs[i].pid, signal.SIGABRT)
            time.sleep(5)
            for p in started.procs:
                if p.poll() is None:
                    p.kill()
            codes = [p.wait() for p in started.procs]
            stacks = {i: _hung_stacks(started.logs[i].read_text()) for i in alive}
            return {"codes": codes, "hung_ranks": alive, "after_done": late, "stacks": stacks}
    exit_s = None if done_at is None else time.monotonic() - done_at
    return {"codes": [p.returncode for p in started.procs], "exit_s_after_done": exit_s}


def async_ckpt_runs() -> dict[str, Any]:
    arch = PRESETS["qwen3-0.6b"].model_copy(update=ASYNC_ARCH)
    base = WORKDIR / "async-ckpt"
    if base.exists():
        shutil.rmtree(base)
    ckpt = base / "ckpt"

    def cfg(steps: int, path: Path | None) -> dict[str, Any]:
        raw = trainer_config(
            "async", arch, "qwen3-0.6b", {}, steps=steps, seq=512, micro_batch=2,
            global_batch=8, lr=3e-3, checkpoint=path, save_interval=ASYNC_EVERY,
            decay_iters=ASYNC_TO,
        )  # fmt: skip
        if path is not None:
            raw["checkpoint"]["asyncSave"] = True
        return raw

    first = launch_dumpable(cfg(ASYNC_STEPS, ckpt), base / "async")
    plain = launch_dumpable(cfg(ASYNC_TO, None), base / "plain")
    exits = {"async": wait_or_dump(first), "plain": wait_or_dump(plain)}
    if exits["async"]["codes"] != [0] * WORLD or exits["plain"]["codes"] != [0] * WORLD:
        raise RuntimeError(f"async save runs: {json.dumps(exits)[-6000:]}")
    a, p = first.result(), plain.result()
    log0 = first.logs[0].read_text()
    latest_after_first = (ckpt / "latest").read_text().strip()
    resumed = launch_dumpable(cfg(ASYNC_TO, ckpt), base / "resume")
    exits["resume"] = wait_or_dump(resumed)
    if exits["resume"]["codes"] != [0] * WORLD:
        raise RuntimeError(f"resume of the async checkpoint: {json.dumps(exits)[-6000:]}")
    r = resumed.result()
    background = re.findall(r"checkpoint of step (\d+): writing in the background", log0)
    finalized = re.findall(r"saved checkpoint of step (\d+) to \S+ in ([0-9.]+)s in the "
                           r"background \(training waited ([0-9.]+)s", log0)  # fmt: skip
    synced = re.findall(r"saved checkpoint of step (\d+) to \S+ in ([0-9.]+)s \(", log0)
    metas = sorted(int(m.parent.name.split("_")[1]) for m in ckpt.glob("iter_*/kubetron.json"))
    after = p["steps"][ASYNC_STEPS:]
    return {
        "arch": "qwen3-0.6b widths, " + ", ".join(f"{k}={v}" for k, v in ASYNC_ARCH.items()),
        "parallelism": "DP2", "save_interval": ASYNC_EVERY,
        "first_run_steps": ASYNC_STEPS, "resumed_to": ASYNC_TO,
        "background_saves": [int(x) for x in background],
        "finalized_background": [
            {"step": int(st), "total_s": float(t), "training_waited_s": float(w)}
            for st, t, w in finalized
        ],
        "synchronous_saves": [{"step": int(st), "s": float(t)} for st, t in synced],
        "latest_after_first_run": latest_after_first,
        "steps_with_kubetron_json": metas,
        "resumed_from": r["resumed_from"],
        "losses_first": [x["loss"] for x in a["steps"]],
        "losses_resumed": [x["loss"] for x in r["steps"]],
        "losses_uninterrupted": [x["loss"] for x in p["steps"]],
        "max_abs_loss_diff_resumed_vs_uninterrupted": max(
            abs(x["loss"] - y["loss"]) for x, y in zip(r["steps"], after, strict=True)
        ),
        "first_run_step_s": [x["duration_s"] for x in a["steps"]],
        "exits": exits,
    }  # fmt: skip


# ------------------------------------------------ 8B-class models on 2 GPUs (issue 17 part 3)

# Each shape with decentralized and with Megatron's global groups, one run after the other,
# `fastPath: on`, bf16, distributed optimizer, mock data. Micro-batch 1 at seq 4096 (2 at
# DP2 fits too, but 1 is what every shape runs); global batch 16: DP2 8 micro-batches a rank,
# TP2 and PP2 16. The order alternates which groups go first.
TRAIN8B_MODELS = ("qwen3-8b", "llama3-8b")
TRAIN8B_SHAPES: dict[str, dict[str, Any]] = {
    "dp2": {},
    "tp2_sp": {"tensor": 2, "sequenceParallel": True},
    "pp2": {"pipeline": 2},
}
TRAIN8B_STEPS, TRAIN8B_SEQ, TRAIN8B_MICRO, TRAIN8B_GBS = 8, 4096, 1, 16


def train8b_case(
    preset: str, shape: str, groups: list[str], seq: int = TRAIN8B_SEQ
) -> dict[str, Any]:
    arch = PRESETS[preset]
    steps = int(os.environ.get("KUBETRON_TRAIN8B_STEPS", TRAIN8B_STEPS))
    fast = os.environ.get("KUBETRON_TRAIN8B_FAST", "on")
    cfg = trainer_config(
        f"{preset}-{shape}", arch, preset, TRAIN8B_SHAPES[shape], steps=steps,
        seq=seq, micro_batch=TRAIN8B_MICRO, global_batch=TRAIN8B_GBS, fast_path=fast,
    )  # fmt: skip
    # e.g. 36: every layer of Qwen3-8B recomputed (its DP2 run at seq 8192 needs it)
    recompute = int(os.environ.get("KUBETRON_TRAIN8B_RECOMPUTE", "0"))
    cfg["recipe"]["recomputeLayers"] = recompute
    runs: dict[str, Any] = {}
    for g in groups:
        try:
            started = launch_trainer(cfg, WORKDIR / "train8b" / f"{preset}-{shape}-{g}", g)
            runs[g] = summarize(finish(started, f"{preset} {shape} {g}", timeout=300))
        except Exception as err:  # one shape's failure must not hide the others
            runs[g] = {"error": f"{type(err).__name__}: {err}"[-3000:]}
    out: dict[str, Any] = {
        "preset": preset, "shape": shape, "parallelism": TRAIN8B_SHAPES[shape],
        "recipe": {"steps": steps, "seq_length": seq, "micro_batch": TRAIN8B_MICRO,
                   "global_batch": TRAIN8B_GBS, "precision": PRECISION, "fast_path": fast,
                   "distributed_optimizer": True, "warmup_steps_excluded": 2,
                   "recompute_layers": recompute},
        "order": groups, "runs": runs,
    }  # fmt: skip
    dec, glo = runs.get("decentralized", {}), runs.get("global", {})
    if dec.get("median_step_s") and glo.get("median_step_s"):
        out["step_time_ratio_decentralized_over_global"] = (
            dec["median_step_s"] / glo["median_step_s"]
        )
        out["max_abs_loss_diff"] = max(
            abs(a - b) for a, b in zip(dec["losses"], glo["losses"], strict=True)
        )
    return out


def train8b_runs() -> dict[str, Any]:
    """Every TRAIN8B model x shape (KUBETRON_TRAIN8B narrows it: `preset:shape:groups,...`,
    groups `both`, `dec` or `glo`)."""
    plan = []
    wanted = os.environ.get("KUBETRON_TRAIN8B")
    if wanted:
        for item in wanted.split(","):
            preset, shape, which, *rest = item.split(":")
            order = {
                "both": ["decentralized", "global"], "dec": ["decentralized"], "glo": ["global"],
                "globfirst": ["global", "decentralized"],
            }[which]  # fmt: skip
            plan.append((preset, shape, order, int(rest[0]) if rest else TRAIN8B_SEQ))
    else:  # qwen3-8b's shapes first, then llama3-8b's
        i = 0
        for preset in TRAIN8B_MODELS:
            for shape in TRAIN8B_SHAPES:
                order = ["decentralized", "global"] if i % 2 == 0 else ["global", "decentralized"]
                plan.append((preset, shape, order, TRAIN8B_SEQ))
                i += 1
    results: dict[str, Any] = {}
    # KUBETRON_TRAIN8B_UNTIL (epoch seconds): start no case with less than 100 s a run left
    until = float(os.environ.get("KUBETRON_TRAIN8B_UNTIL", "inf"))
    for preset, shape, order, seq in plan:
        key = f"{preset}_{shape}_seq{seq}"
        if (
            time.time() + float(os.environ.get("KUBETRON_TRAIN8B_RUN_S", "100")) * len(order)
            > until
        ):
            results.setdefault("not_run_for_time", []).append(key)
            continue
        results[key] = train8b_case(preset, shape, order, seq)
        partial("train8b", results)
        print(f"[multigpu] train8b {key}: " + json.dumps(
            {g: r.get("mfu_per_gpu", r.get("error")) for g, r in results[key]["runs"].items()}
        ), file=sys.stderr, flush=True)  # fmt: skip
    return results


# ------------------------------------------- profiles of the 8B shapes (issue 17, the gap)

# Each shape's train8b config (fast path, micro-batch 1, global batch 16), decentralized groups,
# PROFILE8B_STEPS steps of which steps 4-5 run under torch.profiler on every rank
# (`--profile-steps 3:2`); each rank's report: GPU time by kernel family, top kernels, the
# timeline split into compute, exposed communication and idle. KUBETRON_PROFILE8B narrows it:
# `preset:shape[:seq],...`.
PROFILE8B_PLAN = [("qwen3-8b", "tp2_sp"), ("qwen3-8b", "pp2"), ("qwen3-8b", "dp2")]
PROFILE8B_STEPS, PROFILE8B_WINDOW = 6, "3:2"


def profile8b_plan() -> list[tuple[str, str, int]]:
    wanted = os.environ.get("KUBETRON_PROFILE8B")
    if not wanted:
        return [(preset, shape, TRAIN8B_SEQ) for preset, shape in PROFILE8B_PLAN]
    plan = []
    for item in wanted.split(","):
        preset, shape, *rest = item.split(":")
        if preset not in PRESETS or shape not in TRAIN8B_SHAPES:
            raise ValueError(f"KUBETRON_PROFILE8B: unknown preset or shape in {item!r}")
        plan.append((preset, shape, int(rest[0]) if rest else TRAIN8B_SEQ))
    return plan


def pipeline_bubble(pp: int, micro_batches: int) -> float:
    """1F1B's idle share of a step without virtual stages: (pp - 1) / (m + pp - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


def profile8b_case(preset: str, shape: str, seq: int) -> dict[str, Any]:
    cfg = trainer_config(
        f"prof-{preset}-{shape}", PRESETS[preset], preset, TRAIN8B_SHAPES[shape],
        steps=PROFILE8B_STEPS, seq=seq, micro_batch=TRAIN8B_MICRO, global_batch=TRAIN8B_GBS,
        fast_path="on",
    )  # fmt: skip
    workdir = WORKDIR / "profile8b" / f"{preset}-{shape}-{seq}"
    out = workdir / "profiles"
    extra = ("--profile-steps", PROFILE8B_WINDOW, "--profile-out", str(out))
    t0 = time.monotonic()
    started = launch_trainer(cfg, workdir / "run", "decentralized", *extra)
    run = summarize(finish(started, f"profile {preset} {shape}", timeout=300), warmup=2)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("profile_rank*.json"))]
    case: dict[str, Any] = {
        "preset": preset, "shape": shape, "parallelism": TRAIN8B_SHAPES[shape],
        "seq_length": seq, "micro_batch": TRAIN8B_MICRO, "global_batch": TRAIN8B_GBS,
        "profiled_steps": ranks[0]["steps"] if ranks else None, "wall_s": time.monotonic() - t0,
        "unprofiled_step_s": [s for i, s in enumerate(run["step_s"]) if i + 3 not in (4, 5)],
        "losses": run["losses"], "peak_memory_gib_rank0": run["peak_memory_gib_rank0"],
        "ranks": ranks,
    }  # fmt: skip
    if ranks and ranks[0].get("pp", 1) > 1:
        case["pipeline_bubble_1f1b"] = pipeline_bubble(
            ranks[0]["pp"], ranks[0]["micro_batches_per_step"]
        )
    return case


def profile8b_runs() -> dict[str, Any]:
    results: dict[str, Any] = {}
    until = float(os.environ.get("KUBETRON_TRAIN8B_UNTIL", "inf"))
    for preset, shape, seq in profile8b_plan():
        key = f"{preset}_{shape}_seq{seq}"
        if time.time() + float(os.environ.get("KUBETRON_TRAIN8B_RUN_S", "100")) > until:
            results.setdefault("not_run_for_time", []).append(key)
            continue
        try:
            results[key] = profile8b_case(preset, shape, seq)
        except Exception as err:  # one shape's failure must not hide the others
            results[key] = {"error": f"{type(err).__name__}: {err}"[-3000:]}
        partial("profile8b", results)
        brief = [r.get("timeline_share") for r in results[key].get("ranks", [])]
        print(f"[multigpu] profile8b {key}: {json.dumps(brief)}", file=sys.stderr, flush=True)
    return results


# ------------------------------------------------------------------------- groups (torchrun)


MULTI_GRIDS = [("policy", {"tp": 2}), ("reference", {"tp": 1})]  # both over all ranks


def full_shape(shape: dict[str, int]) -> dict[str, int]:
    return {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": 1} | shape


def worker(out_dir: Path, reps: int, backend: str = "nccl") -> None:
    """One torchrun process: oracle, two grids in one world, setup timing (gloo: a CPU check
    of this script)."""
    import torch.distributed as dist

    from devtools.training import pg_oracle as oracle
    from kubetron_trainer.runtime.parallel import init_distributed
    from kubetron_trainer.runtime.topology import Topology

    oracle.BACKEND = backend  # the oracle's own groups, built with NCCL like the trainer's
    topo = Topology.from_env()
    init_distributed(topo, backend=backend)
    default = dist.distributed_c10d._get_default_group()
    result: dict[str, Any] = {
        "topology": topo.__dict__,
        "backend": dist.get_backend(),
        "bound_device_id": str(getattr(default, "bound_device_id", None)),
    }
    begin = time.perf_counter()
    result["oracle"] = oracle.run_oracle(topo)
    result["oracle_s"] = time.perf_counter() - begin
    result["multi"] = run_multi(topo, oracle, backend)
    result["setup"] = time_setup(topo, reps, oracle, backend)
    (out_dir / f"rank{topo.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_multi(topo: Any, oracle: Any, backend: str) -> dict[str, Any]:
    """Policy TP2 and reference TP1 x DP2 on the same two ranks; a CUDA all-reduce (sum of
    rank + 1) over each grid's tp and dp groups proves the communicators work."""
    import torch.distributed as dist

    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.runtime.parallel import GridSpec, build_process_groups_multi

    specs = [
        GridSpec(name, ParallelDims.from_degrees(topo.world_size, **full_shape(shape)))
        for name, shape in MULTI_GRIDS
    ]
    built = build_process_groups_multi(specs, topo, backend)
    device = "cuda" if backend == "nccl" else "cpu"
    sums: dict[str, dict[str, float]] = {}
    for name, groups in built.items():
        assert groups.pg is not None
        sums[name] = {}
        for dim in ("tp", "dp"):
            value = torch.tensor([float(topo.rank + 1)], device=device)
            dist.all_reduce(value, group=getattr(groups.pg, dim))
            sums[name][dim] = value.item()
    ours = {name: oracle.describe(g.pg) for name, g in built.items()}
    for groups in built.values():
        groups.destroy()
    theirs = {name: oracle.megatron_groups(full_shape(shape)) for name, shape in MULTI_GRIDS}
    return {"ours": ours, "megatron": theirs, "sums": sums}


SETUP_SHAPES = [{"tp": 2}, {"pp": 2}]


def time_setup(topo: Any, reps: int, oracle: Any, backend: str) -> list[dict[str, Any]]:
    """Seconds from a barrier to the slowest rank's finish, per variant, `reps` times after one
    untimed round (NCCL's first communicator pays one-off costs)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.runtime.parallel import GroupOptions, build_process_groups

    nccl = backend == "nccl"
    out = []
    built: list[Any] = []
    for shape in SETUP_SHAPES:
        dims = ParallelDims.from_degrees(topo.world_size, **full_shape(shape))

        def megatron(gloo: bool, dims: ParallelDims = dims) -> None:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=dims.tp,
                pipeline_model_parallel_size=dims.pp,
                expert_tensor_parallel_size=dims.etp,
                create_gloo_process_groups=gloo,
            )

        def ours(options: GroupOptions, dims: ParallelDims = dims) -> None:
            built.append(build_process_groups(dims, topo, backend, options=options))

        variants = {
            "megatron": functools.partial(megatron, True),
            "megatron_no_gloo": functools.partial(megatron, False),
            "kubetron": functools.partial(ours, GroupOptions()),
            "kubetron_shared": functools.partial(ours, GroupOptions(share_identical=True)),
            "kubetron_local": functools.partial(ours, GroupOptions(local_sync=True)),
        }
        times: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(reps + 1):
            for variant, build in variants.items():
                dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)
                start = time.perf_counter()
                build()
                elapsed = torch.tensor(
                    [time.perf_counter() - start], device="cuda" if nccl else "cpu"
                )
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if rep:
                    times[variant].append(elapsed.item())
                if variant.startswith("megatron"):
                    oracle.destroy_megatron()
                while built:
                    built.pop().destroy()
        entry: dict[str, Any] = {"shape": shape, "reps": reps}
        for variant, values in times.items():
            entry[variant] = {"median_s": statistics.median(values), "runs_s": values}
        for variant in variants:
            entry[f"{variant}_over_megatron"] = (
                entry[variant]["median_s"] / entry["megatron"]["median_s"]
            )
        out.append(entry)
    return out


def groups_run(reps: int = 2, backend: str = "nccl") -> list[dict[str, Any]]:
    """One torchrun of `worker` over all GPUs; every rank's JSON."""
    out = WORKDIR / "groups"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return torchrun_worker(["--worker", str(out), "--reps", str(reps), "--backend", backend], out)


def groups_report(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """What to record: shapes checked, per-rank agreement, the multi-grid sums, setup times."""
    fields_checked = 0
    mismatches = []
    for seen in ranks:
        for case in seen["oracle"]:
            for name, theirs in case["megatron"].items():
                if name.startswith("_") or name in ("gtp_remat", "expt_gtp_remat"):
                    continue
                fields_checked += 1
                if case["ours"].get(name) != theirs:
                    mismatches.append((seen["topology"]["rank"], case["shape"], name))
    return {
        "backend": ranks[0]["backend"],
        "bound_device_id": [seen["bound_device_id"] for seen in ranks],
        "oracle_cases": [
            {"shape": c["shape"], "dist_opt_instances": c["instances"], "variant": c["variant"]}
            for c in ranks[0]["oracle"]
        ],
        "oracle_fields_compared": fields_checked,
        "oracle_mismatches": mismatches,
        "oracle_s": [seen["oracle_s"] for seen in ranks],
        "multi": {seen["topology"]["rank"]: seen["multi"] for seen in ranks},
        "setup": ranks[0]["setup"],
    }


# ----------------------------------------------------------------------------------- the run


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    smi = shutil.which("nvidia-smi")
    driver = None
    if smi:
        query = [smi, "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "gpus": torch.cuda.device_count(),
        "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "driver": driver,
        "cpu_cores": os.cpu_count(),
        "kernel": platform.release(),
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
    }


def versions() -> dict[str, Any]:
    nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        "megatron-core": _version("megatron-core"),
        "transformer-engine": _version("transformer-engine"),
        "liger-kernel": _version("liger-kernel"),
    }


PIECES = [
    "groups", "tp2", "dp2", "pp2", "checkpoint", "pp2_vpp2", "ep2_moe", "sp_grads", "sp", "reshard",
    "ckpt8b", "async_ckpt", "train8b", "profile8b",
]  # fmt: skip


# main() sets it: a piece of several cases reports each finished case, so a run cut off by a
# time limit keeps them in --output
ON_PARTIAL: Any = None


def partial(piece: str, results: dict[str, Any]) -> None:
    if ON_PARTIAL is not None:
        ON_PARTIAL(piece, results)


# Each piece's raw result (or the exception it raised) in this process. The benchmark fills it;
# tests/gpu/test_multigpu.py reads it, and with REUSE_ONLY skips pieces that did not run here.
RESULTS: dict[str, Any] = {}
REUSE_ONLY = False


def run_piece(piece: str) -> Any:
    """Run `piece` once per process; later calls return the stored result or raise again."""
    if piece not in RESULTS:
        try:
            if piece == "groups":
                RESULTS[piece] = groups_run()
            elif piece == "checkpoint":
                RESULTS[piece] = checkpoint_reshard()
            elif piece == "sp_grads":
                RESULTS[piece] = sp_grads_run()
            elif piece == "sp":
                RESULTS[piece] = sequence_parallel_runs()
            elif piece == "reshard":
                RESULTS[piece] = reshard_runs()
            elif piece == "ckpt8b":
                RESULTS[piece] = ckpt8b_run(os.environ.get("KUBETRON_CKPT8B_PROBE") == "1")
            elif piece == "async_ckpt":
                RESULTS[piece] = async_ckpt_runs()
            elif piece == "train8b":
                RESULTS[piece] = train8b_runs()
            elif piece == "profile8b":
                RESULTS[piece] = profile8b_runs()
            else:
                RESULTS[piece] = train_pair(piece)
        except Exception as err:
            RESULTS[piece] = err
    if isinstance(RESULTS[piece], Exception):
        raise RESULTS[piece]
    return RESULTS[piece]


def run_tests(report: dict[str, Any]) -> int:
    """tests/gpu/test_multigpu.py in this process: the tests read this process's results (a
    piece that failed fails its test; one skipped for the budget is skipped, not run)."""
    import pytest

    global REUSE_ONLY
    REUSE_ONLY = True
    args = ["-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), *map(str, TEST_FILES)]
    began = time.perf_counter()
    code = int(pytest.main(args))
    report["tests"] = {
        "command": "pytest " + shlex.join(args),
        "exit_code": code,
        "seconds": time.perf_counter() - began,
    }
    return code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, help="also write the JSON here")
    p.add_argument("--only", nargs="+", choices=PIECES, help="run only these pieces")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no piece after this")
    p.add_argument("--no-tests", action="store_true", help="skip the in-process pytest run")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--sp-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ckpt8b-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--no-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.reps, args.backend)
        return 0
    if args.sp_worker:
        sp_grads_worker(args.sp_worker)
        return 0
    if args.ckpt8b_worker:
        ckpt8b_worker(args.ckpt8b_worker, not args.no_probe)
        return 0
    if torch.cuda.device_count() != WORLD:
        print(f"multigpu needs exactly {WORLD} visible GPUs, found {torch.cuda.device_count()}")
        return 2
    began = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "multigpu",
        "command": "python " + shlex.join(sys.argv),
        "machine": machine(),
        "versions": versions(),
        "world_size": WORLD,
        "peak_flops": "989e12 (H100/H200 dense BF16), MFU per GPU",
        "results": {},
        "errors": {},
        "skipped_for_budget": [],
    }
    global ON_PARTIAL

    def on_partial(piece: str, results: dict[str, Any]) -> None:
        report["results"][piece] = results
        write(report, args.output)

    ON_PARTIAL = on_partial
    done = []
    for piece in args.only or PIECES:
        if time.perf_counter() - began > args.budget_s:
            report["skipped_for_budget"].append(piece)
            continue
        t0 = time.perf_counter()
        try:
            raw = run_piece(piece)
            report["results"][piece] = groups_report(raw) if piece == "groups" else raw
            done.append(piece)
        except Exception as err:  # record and go on: one broken shape must not hide the others
            report["errors"][piece] = f"{type(err).__name__}: {err}"[-8000:]
        report.setdefault("piece_s", {})[piece] = time.perf_counter() - t0
        print(f"[multigpu] {piece}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        write(report, args.output)
    code = run_tests(report) if done and not args.no_tests else 0
    report["wall_s"] = time.perf_counter() - began
    write(report, args.output)
    print(json.dumps(report, indent=1))
    return 1 if report["errors"] or code else 0


def write(report: dict[str, Any], output: Path | None) -> None:
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    # Run as the module `benchmarks.multigpu`, so the tests that pytest imports in this process
    # share its cached runs.
    from benchmarks import multigpu

    sys.exit(multigpu.main())
