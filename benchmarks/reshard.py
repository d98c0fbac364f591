"""Checkpoints resumed across pipeline, virtual-pipeline and expert degrees on 2 GPUs.

Per family (dense: PP2, PP2 x VPP2, DP2; MoE: EP2, EP1 x DP2; bf16, distributed optimizer
saved fully_reshardable, mock data) one base run trains to step 2, every shape continues that
checkpoint uninterrupted to step 8 saving at 4, and each pair resumes the old shape's step-4
checkpoint in the new shape: losses against both uninterrupted runs, gradient norms, the data
position, the RNG re-seed, save and load seconds (devtools/training/reshard.py).

    python -m benchmarks.reshard --output benchmarks/results/reshard.json

Needs exactly 2 visible GPUs. tests/gpu/test_reshard_gpu.py asserts on the same runs.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.report import add_common_args, new_report, run_pieces
from devtools.training.reshard import reshard_runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.reshard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    args = p.parse_args(argv)
    pieces = {"reshard": lambda: reshard_runs(args.workdir)}
    return run_pieces(new_report("benchmarks.reshard"), pieces, args)


if __name__ == "__main__":
    sys.exit(main())
