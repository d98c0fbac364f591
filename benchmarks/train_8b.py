"""8B-class models trained on 2 GPUs: MFU per GPU of each shape, decentralized vs global groups.

Each model x shape runs the real trainer with both kinds of process groups (or the ones
`--groups` names), one run after the other, each alone on the GPUs: bf16, distributed
optimizer, mock data, micro-batch 1 (2 fits DP2 too, but 1 is what every shape runs), global
batch 16 (DP2: 8 micro-batches a rank; TP2 and PP2: 16), the first 2 steps excluded from the
timings. Shapes: dp2, tp2_sp (TP2 with sequence parallelism), pp2 (1F1B). Per run: losses,
step times, tokens/s and MFU per GPU, peak memory.

    python -m benchmarks.train_8b --output benchmarks/results/train_8b.json
    python -m benchmarks.train_8b --models qwen3-8b --shapes dp2 --seq 8192 \\
        --recompute-layers 12 --groups decentralized --steps 6

Needs exactly 2 visible GPUs of about 140 GB each: a rank's peak memory reaches 115 GiB at seq
4096 and 130 GiB at 8192 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from benchmarks.report import add_common_args, new_report, run_pieces, write
from devtools.training.gpu import PRECISION, finish, launch_trainer, summarize, trainer_config
from kubetron_api.config import PRESETS

MODELS = ("qwen3-8b", "llama3-8b")
SHAPES: dict[str, dict[str, Any]] = {
    "dp2": {},
    "tp2_sp": {"tensor": 2, "sequenceParallel": True},
    "pp2": {"pipeline": 2},
}
SEQ, MICRO, GBS = 4096, 1, 16
GROUP_ORDERS = {
    "decentralized-first": ["decentralized", "global"],
    "global-first": ["global", "decentralized"],
    "decentralized": ["decentralized"],
    "global": ["global"],
}


def train_case(
    preset: str, shape: str, groups: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """One model x shape with each of `groups`, one run after the other."""
    cfg = trainer_config(
        f"{preset}-{shape}", PRESETS[preset], preset, SHAPES[shape], steps=args.steps,
        seq=args.seq, micro_batch=MICRO, global_batch=GBS, fast_path=args.fast_path,
    )  # fmt: skip
    cfg["recipe"]["recomputeLayers"] = args.recompute_layers
    runs: dict[str, Any] = {}
    for g in groups:
        try:
            workdir = args.workdir / "train8b" / f"{preset}-{shape}-{g}"
            started = launch_trainer(cfg, workdir, g)
            runs[g] = summarize(finish(started, f"{preset} {shape} {g}", timeout=300))
        except Exception as err:  # one shape's failure must not hide the others
            runs[g] = {"error": f"{type(err).__name__}: {err}"[-3000:]}
    out: dict[str, Any] = {
        "preset": preset, "shape": shape, "parallelism": SHAPES[shape],
        "recipe": {"steps": args.steps, "seq_length": args.seq, "micro_batch": MICRO,
                   "global_batch": GBS, "precision": PRECISION, "fast_path": args.fast_path,
                   "distributed_optimizer": True, "warmup_steps_excluded": 2,
                   "recompute_layers": args.recompute_layers},
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


def plan(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """Each model's shapes in order, with the group order `--groups` asks for (`alternate`:
    both kinds, which goes first alternating from case to case, so warm caches favour
    neither)."""
    cases = [(preset, shape) for preset in args.models for shape in args.shapes]
    if args.groups != "alternate":
        return [(preset, shape, GROUP_ORDERS[args.groups]) for preset, shape in cases]
    orders = [GROUP_ORDERS["decentralized-first"], GROUP_ORDERS["global-first"]]
    return [(preset, shape, orders[i % 2]) for i, (preset, shape) in enumerate(cases)]


def train_runs(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    """Every planned case, the report rewritten after each; a case that would end after
    `--until` is listed as not run."""
    results: dict[str, Any] = {}
    report["results"]["train8b"] = results
    for preset, shape, order in plan(args):
        key = f"{preset}_{shape}_seq{args.seq}"
        if time.time() + args.run_s * len(order) > args.until:
            results.setdefault("not_run_for_time", []).append(key)
            continue
        results[key] = train_case(preset, shape, order, args)
        write(report, args.output)
        brief = {g: r.get("mfu_per_gpu", r.get("error")) for g, r in results[key]["runs"].items()}
        print(f"[train_8b] {key}: {json.dumps(brief)}", file=sys.stderr, flush=True)
    return results


def add_time_args(p: argparse.ArgumentParser) -> None:
    """--until and --run-s: how a run cut short by a time limit keeps whole cases."""
    p.add_argument(
        "--until",
        type=float,
        default=float("inf"),
        help="epoch seconds: start no case that would end after this (default: no limit)",
    )
    p.add_argument(
        "--run-s",
        type=float,
        default=100.0,
        help="expected seconds a run takes, for --until (default: %(default)s)",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_8b",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument(
        "--groups",
        choices=["alternate", *GROUP_ORDERS],
        default="alternate",
        help="which process groups run, in which order (default: %(default)s)",
    )
    p.add_argument("--seq", type=int, default=SEQ, help="sequence length (default: %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="steps a run (default: %(default)s)")
    p.add_argument(
        "--fast-path",
        default="on",
        help="recipe.fastPath: on, off or pieces such as ce,norm,rope (default: %(default)s)",
    )
    p.add_argument(
        "--recompute-layers",
        type=int,
        default=0,
        help="recipe.recomputeLayers: layers of each model chunk recomputed (default: 0)",
    )
    add_time_args(p)
    add_common_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = new_report("benchmarks.train_8b")
    return run_pieces(report, {"train8b": lambda: train_runs(args, report)}, args)


if __name__ == "__main__":
    sys.exit(main())
