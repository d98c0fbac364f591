"""Where an 8B model's step time goes on 2 GPUs: each shape profiled on every rank.

Each model x shape runs train_8b's config (fast path, micro-batch 1, global batch 16,
decentralized groups) for 6 steps, of which steps 4-5 run under torch.profiler on every rank
(the trainer's `--profile-steps 3:2`). Each rank's report: GPU time by kernel family, the top
kernels, and the timeline split into compute (some non-NCCL kernel running), exposed
communication (only NCCL kernels, waiting for the peer included) and idle (no kernel); PP2
also gets 1F1B's bubble share for comparison.

    python -m benchmarks.profile_8b --output benchmarks/results/profile_8b.json

Needs exactly 2 visible GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from benchmarks.report import add_common_args, new_report, run_pieces, write
from benchmarks.train_8b import GBS, MICRO, MODELS, SEQ, SHAPES, add_time_args
from devtools.training.gpu import finish, launch_trainer, summarize, trainer_config
from kubetron_api.config import PRESETS

STEPS, WINDOW = 6, "3:2"  # profiled: steps 4 and 5
PROFILED = (4, 5)


def pipeline_bubble(pp: int, micro_batches: int) -> float:
    """1F1B's idle share of a step without virtual stages: (pp - 1) / (m + pp - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


def profile_case(preset: str, shape: str, args: argparse.Namespace) -> dict[str, Any]:
    seq = args.seq
    cfg = trainer_config(
        f"prof-{preset}-{shape}", PRESETS[preset], preset, SHAPES[shape], steps=STEPS,
        seq=seq, micro_batch=MICRO, global_batch=GBS, fast_path="on",
    )  # fmt: skip
    workdir = args.workdir / "profile8b" / f"{preset}-{shape}-{seq}"
    out = workdir / "profiles"
    extra = ("--profile-steps", WINDOW, "--profile-out", str(out))
    t0 = time.monotonic()
    started = launch_trainer(cfg, workdir / "run", "decentralized", *extra)
    run = summarize(finish(started, f"profile {preset} {shape}", timeout=300), warmup=2)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("profile_rank*.json"))]
    case: dict[str, Any] = {
        "preset": preset, "shape": shape, "parallelism": SHAPES[shape],
        "seq_length": seq, "micro_batch": MICRO, "global_batch": GBS,
        "profiled_steps": ranks[0]["steps"] if ranks else None, "wall_s": time.monotonic() - t0,
        "unprofiled_step_s": [s for i, s in enumerate(run["step_s"]) if i + 3 not in PROFILED],
        "losses": run["losses"], "peak_memory_gib_rank0": run["peak_memory_gib_rank0"],
        "ranks": ranks,
    }  # fmt: skip
    if ranks and ranks[0].get("pp", 1) > 1:
        case["pipeline_bubble_1f1b"] = pipeline_bubble(
            ranks[0]["pp"], ranks[0]["micro_batches_per_step"]
        )
    return case


def profile_runs(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    report["results"]["profile8b"] = results
    for preset in args.models:
        for shape in args.shapes:
            key = f"{preset}_{shape}_seq{args.seq}"
            if time.time() + args.run_s > args.until:
                results.setdefault("not_run_for_time", []).append(key)
                continue
            try:
                results[key] = profile_case(preset, shape, args)
            except Exception as err:  # one shape's failure must not hide the others
                results[key] = {"error": f"{type(err).__name__}: {err}"[-3000:]}
            write(report, args.output)
            brief = [r.get("timeline_share") for r in results[key].get("ranks", [])]
            print(f"[profile_8b] {key}: {json.dumps(brief)}", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_8b",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=["qwen3-8b"])
    p.add_argument(
        "--shapes",
        nargs="+",
        choices=list(SHAPES),
        default=["tp2_sp", "pp2", "dp2"],
        help="in this order (default: %(default)s)",
    )
    p.add_argument("--seq", type=int, default=SEQ, help="sequence length (default: %(default)s)")
    add_time_args(p)
    add_common_args(p)
    args = p.parse_args(argv)
    report = new_report("benchmarks.profile_8b")
    return run_pieces(report, {"profile8b": lambda: profile_runs(args, report)}, args)


if __name__ == "__main__":
    sys.exit(main())
