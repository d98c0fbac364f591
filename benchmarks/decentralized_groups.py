"""Decentralized process groups on 2 GPUs with NCCL, one process a GPU: are they Megatron's, and
what do they cost?

Pieces (all by default, in this order; `--only` picks some):

  groups      the process-group oracle with NCCL: every shape of the 2-rank world, each
              ProcessGroupCollection field's members vs Megatron's global parallel_state; two
              models of different shapes in one world (policy TP2, reference TP1 x DP2) with an
              all-reduce on each grid's groups; seconds to build all groups, Megatron's
              initialize_model_parallel vs kubetron's collection (and its variants)
  tp2 dp2 pp2 pp2_vpp2 ep2_moe
              the real trainer per shape with `--groups decentralized` and `--groups global`:
              losses, step times, tokens/s and MFU per GPU (qwen3-0.6b; ep2_moe: qwen3-30b-a3b
              widths with 4 layers and 16 experts)
  checkpoint  a TP2 checkpoint resumed as PP2 and as TP1 x DP2: losses vs the uninterrupted run

    python -m benchmarks.decentralized_groups --output benchmarks/results/decentralized_groups.json

Needs exactly 2 visible GPUs. tests/gpu/test_multigpu.py asserts on the same runs
(devtools/training/shapes.py, groups.py).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.report import add_common_args, new_report, run_pieces
from devtools.training.groups import groups_report, groups_run
from devtools.training.shapes import CASES, checkpoint_reshard, train_pair

PIECES = ["groups", *CASES, "checkpoint"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.decentralized_groups",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", nargs="+", choices=PIECES, help="run only these pieces")
    p.add_argument("--reps", type=int, default=2, help="timed rounds of group setup")
    add_common_args(p)
    args = p.parse_args(argv)
    work = args.workdir
    runs: dict[str, Callable[[], Any]] = {
        "groups": lambda: groups_report(groups_run(work, args.reps)),
        "checkpoint": lambda: checkpoint_reshard(work),
    }
    runs |= {case: functools.partial(train_pair, case, work) for case in CASES}
    pieces = {name: runs[name] for name in args.only or PIECES}
    return run_pieces(new_report("benchmarks.decentralized_groups"), pieces, args)


if __name__ == "__main__":
    sys.exit(main())
