"""Trainer throughput on this machine's GPU: baseline and fast path side by side, JSON out.

Runs the real trainer (`python -m kubetron_trainer`, one process on one GPU, mock data, no
checkpoints, distributed optimizer, Megatron's LR schedule and loss) several times in one
invocation on the same machine:

- `baseline`: the local spec + torch SDPA core attention, decentralized process groups, and the
  same with Megatron's global `parallel_state`;
- `optimised`: the same with `--fast-path` (fused pieces, `models/fused.py`) and
  `--fast-micro-batch`, decentralized and global (the step-time ratio between them);
- optional ablations (`--variants ce,rope:2 ...`: fast-path pieces and micro-batch, fewer steps);
- optional `--profile-variants` (and `--profile`, the baseline and the optimised run): runs
  with the trainer's `--profile-steps 3:2`, whose report
  (`kubetron_trainer.observe.profiling`) gives the top GPU kernels, time by kernel family
  and the step's compute/communication/idle split.

The first two steps are warmup and excluded from tokens/s, MFU and the step times. Losses of
all steps are recorded, so baseline and optimised can be compared step by step.

    python benchmarks/trainer_throughput.py --fast-path on --fast-micro-batch 4 --profile \
        --steps 20 --output benchmarks/results/trainer_fast_path.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "trainer"), str(ROOT / "operator")]

from benchmarks.report import versions  # noqa: E402
from devtools.training.launch import launch  # noqa: E402
from kubetron_api.config import PRESETS, RecipeSpec, TrainerConfig  # noqa: E402

WARMUP = 2


def config(
    args: argparse.Namespace, micro_batch: int, steps: int, global_batch: int | None = None
) -> dict[str, Any]:
    recipe = RecipeSpec.model_validate(
        {
            "trainIters": steps,
            "globalBatchSize": global_batch or args.global_batch,
            "microBatchSize": micro_batch,
            "seqLength": args.seq,
            "precision": "bf16",
            "optimizer": {"distributed": True},
            "logInterval": 1,
        }
    )
    cfg = TrainerConfig(
        job_name="bench", model=PRESETS[args.preset], preset=args.preset, recipe=recipe
    ).model_dump(mode="json", by_alias=True)
    cfg["metrics"]["enabled"] = False
    return cfg


def measure(
    args: argparse.Namespace,
    name: str,
    groups: str,
    fast: str,
    micro_batch: int,
    steps: int | None = None,
    global_batch: int | None = None,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One trainer run; a failed run (say, out of memory) is recorded, not raised."""
    workdir = Path(args.workdir) / f"{name}-{groups}"
    cli = ["--attention", args.attention, "--fast-path", fast, *extra]
    steps = steps or args.steps
    t0 = time.monotonic()
    cfg = config(args, micro_batch, steps, global_batch)
    started = launch(cfg, workdir, *cli, groups=groups)
    entry: dict[str, Any] = {
        "path": name, "groups": groups, "fast_path": fast, "micro_batch": micro_batch,
        "global_batch": global_batch or args.global_batch,
    }  # fmt: skip
    codes = started.wait(timeout=args.run_timeout)
    entry["wall_s"] = round(time.monotonic() - t0, 1)
    if codes != [0] * len(codes):
        tail = started.output()[-1500:]
        print(f"run {name}/{groups} failed: {codes}\n{tail}", file=sys.stderr)
        return entry | {"ok": False, "exit_codes": codes, "log_tail": tail}
    result = started.result()
    timed = [s["duration_s"] for s in result["steps"][WARMUP:]]
    return entry | {
        "ok": True,
        "attention": result["attention"],
        "tokens_per_s": round(result["tokens_per_s"]),
        "mfu": round(result["mfu"], 4) if result["mfu"] is not None else None,
        "median_step_s": round(statistics.median(timed), 4),
        "peak_memory_gib": result.get("peak_memory_gib"),
        "step_s": [round(s, 4) for s in timed],
        "losses": [round(s["loss"], 5) for s in result["steps"]],
    }


def compare(base: dict[str, Any], fast: dict[str, Any], fast_global: dict[str, Any]) -> dict:
    """Speed-up, decentralized/global step-time ratio, and the per-step loss differences."""
    out: dict[str, Any] = {}
    if base.get("ok") and fast.get("ok"):
        out["speedup_tokens_per_s"] = round(fast["tokens_per_s"] / base["tokens_per_s"], 4)
        n = min(len(base["losses"]), len(fast["losses"]))
        diffs = [abs(a - b) for a, b in zip(base["losses"][:n], fast["losses"][:n], strict=True)]
        rel = [d / abs(a) for d, a in zip(diffs, base["losses"][:n], strict=True)]
        out["loss_steps_compared"] = n
        out["loss_max_abs_diff"] = round(max(diffs), 5)
        out["loss_max_rel_diff"] = round(max(rel), 5)
    if fast.get("ok") and fast_global.get("ok"):
        ratio = fast["median_step_s"] / fast_global["median_step_s"]
        out["decentralized_over_global_step_time"] = round(ratio, 4)
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-1.7b", choices=sorted(PRESETS))
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--attention", default="auto", choices=["auto", "te", "sdpa", "unfused"])
    p.add_argument("--fast-path", default="on", help="the optimised run's --fast-path")
    p.add_argument("--fast-micro-batch", type=int, help="the optimised run's micro-batch")
    p.add_argument(
        "--variants", nargs="*", default=[], help="ablations: FAST[:MICRO_BATCH[:GLOBAL_BATCH]]"
    )
    p.add_argument(
        "--profile-variants",
        nargs="*",
        default=[],
        help="FAST[:MICRO_BATCH[:GLOBAL_BATCH]] runs with the trainer's --profile-steps 3:2: "
        "GPU time by kernel family (kubetron_trainer.observe.profiling)",
    )
    p.add_argument("--variant-steps", type=int, default=8)
    p.add_argument(
        "--profile", action="store_true", help="profile baseline and optimised (as variants)"
    )
    p.add_argument("--skip-global-baseline", action="store_true")
    p.add_argument(
        "--skip-runs", action="store_true", help="no side-by-side runs: profiles/variants only"
    )
    p.add_argument("--run-timeout", type=float, default=400)
    p.add_argument("--workdir", default="/tmp/kubetron-bench")
    p.add_argument("--output", type=Path)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("trainer_throughput needs a CUDA GPU")
    mb, fast_mb = args.micro_batch, args.fast_micro_batch or args.micro_batch
    fast_spec = args.fast_path
    out: dict[str, Any] = {
        "benchmark": "trainer_throughput",
        "command": "python " + shlex.join(sys.argv),
        "shape": {
            "preset": args.preset, "seq_length": args.seq, "micro_batch": mb,
            "global_batch": args.global_batch, "precision": "bf16",
            "distributed_optimizer": True, "steps": args.steps, "warmup_steps_excluded": WARMUP,
        },
        "machine": {
            "gpu": torch.cuda.get_device_name(0), "gpus": 1, "cpu": platform.processor(),
        },
        "versions": versions(),
        "peak_flops": "989e12 (H100/H200 dense BF16)",
    }  # fmt: skip
    out |= {"runs": [], "comparison": {}, "ablations": [], "profiles": {}}
    if args.skip_runs:
        profile_and_variants(args, out, mb, fast_spec, fast_mb)
        return
    # Written after every run, so a run cut off by a time limit keeps what was measured.
    base = record(args, out, "runs", measure(args, "baseline", "decentralized", "off", mb))
    if not args.skip_global_baseline:
        record(args, out, "runs", measure(args, "baseline", "global", "off", mb))
    for groups in ("decentralized", "global"):
        record(args, out, "runs", measure(args, "optimised", groups, fast_spec, fast_mb))
    fast, fast_global = out["runs"][-2:]
    out["comparison"] = compare(base, fast, fast_global)
    record(args, out, None, out["comparison"])
    profile_and_variants(args, out, mb, fast_spec, fast_mb)


def profile_and_variants(
    args: argparse.Namespace, out: dict[str, Any], mb: int, fast_spec: str, fast_mb: int
) -> None:
    if args.profile:  # the baseline and the optimised run, as profile variants
        args.profile_variants = [f"off:{mb}", f"{fast_spec}:{fast_mb}", *args.profile_variants]
    for spec in args.variants:
        vfast, vmb, vgbs = variant(spec, mb, args.global_batch)
        name = f"variant-{vfast}-mb{vmb}-gbs{vgbs}".replace(",", "+")
        run = measure(args, name, "decentralized", vfast, vmb, args.variant_steps, vgbs)
        record(args, out, "ablations", {k: v for k, v in run.items() if k != "step_s"})
    for spec in args.profile_variants:
        vfast, vmb, vgbs = variant(spec, mb, args.global_batch)
        name = f"profile-{vfast}-mb{vmb}-gbs{vgbs}".replace(",", "+")
        prof_dir = Path(args.workdir) / name / "profiles"
        extra = ("--profile-steps", "3:2", "--profile-out", str(prof_dir))
        run = measure(args, name, "decentralized", vfast, vmb, 6, vgbs, extra)
        reports = [json.loads(p.read_text()) for p in sorted(prof_dir.glob("profile_rank*.json"))]
        run["profile"] = reports[0] if reports else None
        out["profiles"][name] = {k: v for k, v in run.items() if k not in ("step_s", "losses")}
        record(args, out, None, {"profiled": name, "ok": run.get("ok")})
    print(json.dumps(out, indent=1))


def variant(spec: str, micro_batch: int, global_batch: int) -> tuple[str, int, int]:
    """FAST[:MICRO_BATCH[:GLOBAL_BATCH]] with the defaults filled in."""
    fast, *rest = spec.split(":")
    mb = int(rest[0]) if rest and rest[0] else micro_batch
    gbs = int(rest[1]) if len(rest) > 1 and rest[1] else global_batch
    return fast, mb, gbs


def record(
    args: argparse.Namespace, out: dict[str, Any], key: str | None, entry: dict[str, Any]
) -> dict[str, Any]:
    """Add `entry` under `out[key]`, print a one-line summary, rewrite `--output`."""
    if key is not None:
        out[key].append(entry)
    brief = {k: v for k, v in entry.items() if k not in ("step_s", "losses", "log_tail")}
    print(json.dumps(brief), flush=True)
    if args.output:
        args.output.write_text(json.dumps(out, indent=1) + "\n")
    return entry


if __name__ == "__main__":
    main()
