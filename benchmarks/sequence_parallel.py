"""Sequence parallelism without Transformer Engine on 2 GPUs: equal gradients, less memory.

Pieces (both by default; `--only` picks one):

  sp_grads  one fp32 step of a small TP2 model (qwen3-0.6b widths, 4 layers, a 4096-token
            vocabulary) with and without SP, on the local spec and with the fast path's norm,
            through Megatron's DDP and finalize_model_grads: losses and every parameter's
            gradient compared, the SP-marked norms' gradients on both tensor-parallel ranks
  sp        the trainer at TP2 (qwen3-0.6b) with and without SP, on the local spec and with
            `fastPath: on`, bf16, each run alone on the GPUs: losses, peak memory, step time;
            then SP with Megatron's global groups

    python -m benchmarks.sequence_parallel --output benchmarks/results/sequence_parallel.json

Needs exactly 2 visible GPUs. tests/gpu/test_multigpu.py asserts on the same runs
(devtools/training/sequence_parallel.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.report import add_common_args, new_report, run_pieces
from devtools.training.sequence_parallel import sequence_parallel_runs, sp_grads_run

PIECES = ["sp_grads", "sp"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sequence_parallel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", nargs="+", choices=PIECES, help="run only these pieces")
    add_common_args(p)
    args = p.parse_args(argv)
    runs: dict[str, Callable[[], Any]] = {
        "sp_grads": lambda: sp_grads_run(args.workdir),
        "sp": lambda: sequence_parallel_runs(args.workdir),
    }
    pieces = {name: runs[name] for name in args.only or PIECES}
    return run_pieces(new_report("benchmarks.sequence_parallel"), pieces, args)


if __name__ == "__main__":
    sys.exit(main())
