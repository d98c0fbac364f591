"""Checkpoints resumed across pipeline, virtual-pipeline and expert degrees on 2 GPUs.

Each pair (old shape -> new shape) on 2 GPUs, bf16, distributed optimizer, mock data:
  base       one run of the family's base shape trains steps 1..K0 and saves step K0
  reference  every shape of the family resumes that step-K0 checkpoint and trains K0+1..N
             without interruption, saving at K and N (the "uninterrupted run" of that shape)
  resumed    a copy of the old shape's step-K checkpoint, resumed in the new shape, K+1..N
On GPUs Megatron initialises each rank's shards from seeds offset by pipeline stage and by
expert-parallel rank (seeding.rng_seeds), so runs of two shapes started at step 0 hold other
weights; from the common step-K0 checkpoint every shape starts from the same ones, and the
resumed run must follow both the new shape's reference and the old shape's continuation.
Dense: the checkpoint piece's model (qwen3-0.6b widths, 4 layers, 4096-token vocabulary;
PP2 x VPP2 holds one layer a chunk). MoE: the ep2_moe case's qwen3-30b-a3b widths, 4 layers,
16 experts top-4, with the same small vocabulary so that the loss moves within a few steps.

tests/gpu/test_reshard_gpu.py checks the runs; benchmarks/reshard.py records them.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from devtools.training.gpu import PRECISION, launch_trainer, trainer_config
from devtools.training.launch import Launch
from kubetron_api.config import PRESETS

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


def failure(started: Launch, codes: list[int] | None, err: str | None = None) -> dict[str, Any]:
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


def reshard_record(started: Launch, ckpt: Path | None) -> dict[str, Any]:
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


def wait_job(started: Launch, deadline: float, grace_s: float = 15.0) -> list[int] | None:
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


@dataclass
class _Waves:
    """One reshard piece's runs: each wave's jobs start at once under `base`; the report grows
    with every wave and is rewritten to `base/partial.json`, so a cut-off piece keeps it."""

    base: Path
    report: dict[str, Any]
    began: float = field(default_factory=time.monotonic)

    def run(self, label: str, jobs: dict[str, Job]) -> dict[str, Any]:
        t0 = time.monotonic()
        deadline = min(t0 + RESHARD_TIMEOUT_S, self.began + RESHARD_TOTAL_S)
        out = run_wave(jobs, self.base, deadline) if jobs else {}
        self.report["wave_s"][label] = time.monotonic() - t0
        self.report["runs"][label] = out
        self.save()
        return out

    def job(self, name: str, shape: str, steps: int, interval: int, save: bool = True) -> Job:
        ckpt = self.base / name / "ckpt" if save else None
        groups = "global" if name.endswith("_global") else "decentralized"
        return reshard_config(name, shape, ckpt, steps, interval), ckpt, groups

    def save(self) -> None:
        (self.base / "partial.json").write_text(json.dumps(self.report, indent=1))


def _report() -> dict[str, Any]:
    """What every reshard report starts with: the steps, recipe, models and shapes."""
    n = RESHARD_N
    return {
        "steps": {"base_to": RESHARD_K0, "resume_at": RESHARD_K, "to": n},
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


def _base_wave(waves: _Waves) -> dict[str, Any]:
    """Each family's base run to K0, beside the init checks and the fresh VPP runs."""
    k0 = RESHARD_K0
    jobs: dict[str, Job] = {
        f"base_{f}": waves.job(f"base_{f}", shape, k0, k0) for f, shape in RESHARD_BASE.items()
    }
    jobs |= {
        f"init_{s}": waves.job(f"init_{s}", s, k0, k0, False) for s in RESHARD_INIT_CHECK.values()
    }
    for shape, groups in RESHARD_FRESH:
        name = f"fresh0_{shape}" + ("_global" if groups == "global" else "")
        jobs[name] = waves.job(name, shape, k0, k0, False)
    bases = waves.run("base", jobs)
    waves.report["init_check"] = {
        f: {
            "shapes": [RESHARD_BASE[f], other],
            "losses": [bases[f"base_{f}"].get("losses"), bases[f"init_{other}"].get("losses")],
            "max_rel_diff": max_rel(
                bases[f"base_{f}"].get("losses"), bases[f"init_{other}"].get("losses")
            ),
        }
        for f, other in RESHARD_INIT_CHECK.items()
    }
    return bases


def _reference_wave(waves: _Waves, bases: dict[str, Any]) -> dict[str, Any]:
    """Every shape from its family's step-K0 checkpoint to N, saving at K."""
    jobs: dict[str, Job] = {}
    refs: dict[str, Any] = {}
    for shape, (family, _) in RESHARD_SHAPES.items():
        name = f"ref_{shape}"
        if bases[f"base_{family}"]["status"] != "ok":
            refs[name] = {"status": "not run", "error": f"base_{family} failed"}
            continue
        jobs[name] = waves.job(name, shape, RESHARD_N, RESHARD_K)
        copy_step(waves.base / f"base_{family}" / "ckpt", RESHARD_K0, jobs[name][1])
    refs |= waves.run("reference", jobs)
    waves.report["runs"]["reference"] = refs
    return refs


def _sources(waves: _Waves, refs: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Which run saved each old shape's step K: its reference, or, where that failed, a run
    from step 0 (`fresh_<shape>`, while time is left); and every run that may be one."""
    olds = {old for old, _ in RESHARD_PAIRS}
    sources = {old: f"ref_{old}" for old in olds if refs[f"ref_{old}"]["status"] == "ok"}
    missing = sorted(olds - set(sources))
    fresh: dict[str, Any] = {}
    if missing and time.monotonic() - waves.began < RESHARD_FALLBACK_AFTER_S:
        n, k = RESHARD_N, RESHARD_K
        fresh = waves.run(
            "fresh", {f"fresh_{s}": waves.job(f"fresh_{s}", s, n, k) for s in missing}
        )
        sources |= {s: f"fresh_{s}" for s in missing if fresh[f"fresh_{s}"]["status"] == "ok"}
    return sources, refs | fresh


def _resume_wave(waves: _Waves, sources: dict[str, str]) -> dict[str, Any]:
    """Each pair: the old shape's step-K checkpoint resumed in the new shape to N."""
    jobs: dict[str, Job] = {}
    resumed: dict[str, Any] = {}
    for old, new in RESHARD_PAIRS:
        name = pair_key(old, new)
        if old not in sources:
            resumed[name] = {
                "status": "not run",
                "error": f"no run of {old} saved step {RESHARD_K}",
            }
            continue
        jobs[name] = waves.job(name, new, RESHARD_N, RESHARD_K)
        copy_step(waves.base / sources[old] / "ckpt", RESHARD_K, jobs[name][1])
    resumed |= waves.run("resumed", jobs)
    waves.report["runs"]["resumed"] = resumed
    return resumed


def _pair(
    old: str, new: str, run: dict[str, Any], source: str | None, done: dict[str, Any],
    refs: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """One pair's record: the resumed run against the new shape's and the old shape's runs."""
    k, n = RESHARD_K, RESHARD_N
    after = range(k + 1, n + 1)
    ref_old: dict[str, Any] = done.get(source or "", {"status": "not run"})
    ref_new: dict[str, Any] = (
        refs[f"ref_{new}"] if source == f"ref_{old}" else {"status": "not comparable"}
    )
    got, want, cont = by_step(run, after), by_step(ref_new, after), by_step(ref_old, after)
    return {
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


def reshard_runs(workdir: Path) -> dict[str, Any]:
    """Three waves: each family's base run to K0; every shape from K0 to N (saving at K);
    each pair's resume of the old shape's step K in the new shape. A failed run is recorded
    (its error and log tails) and only the runs that need it are left out; an old shape whose
    reference failed is trained from step 0 instead (`fresh_<shape>`, its own initial weights,
    so that pair is compared with the old shape's continuation only)."""
    base = workdir / "reshard"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    waves = _Waves(base, _report())
    refs = _reference_wave(waves, _base_wave(waves))
    sources, done = _sources(waves, refs)
    resumed = _resume_wave(waves, sources)
    waves.report["pairs"] = {
        pair_key(old, new): _pair(
            old, new, resumed[pair_key(old, new)], sources.get(old), done, refs
        )
        for old, new in RESHARD_PAIRS
    }
    waves.save()
    return waves.report
