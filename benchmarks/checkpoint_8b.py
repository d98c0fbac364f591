"""Checkpoints at 8B on 2 GPUs, and asynchronous saves in the trainer.

Pieces (both by default; `--only` picks one):

  ckpt8b      Qwen3-8B as published, DP2, bf16, distributed optimizer: a synchronous save,
              the state wiped and loaded back, an asynchronous save while two steps train,
              loaded back: seconds, GB/s, each rank's peak host memory, every tensor compared
              (`--megatron-probe` also builds Megatron's own gathered state, not written, to
              record the host memory it takes)
  async_ckpt  the trainer with `checkpoint.asyncSave` (qwen3-0.6b widths, 4 layers, DP2),
              resumed, against an uninterrupted run

    python -m benchmarks.checkpoint_8b --output benchmarks/results/checkpoint_8b.json

Needs exactly 2 visible GPUs and about 120 GB of free disk (with less, the 8B model keeps
fewer layers, recorded). tests/gpu/test_checkpoint_8b.py asserts on the same runs
(devtools/training/checkpoint_8b.py, async_save.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.report import add_common_args, new_report, run_pieces
from devtools.training.async_save import async_ckpt_runs
from devtools.training.checkpoint_8b import ckpt8b_run

PIECES = ["ckpt8b", "async_ckpt"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.checkpoint_8b",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", nargs="+", choices=PIECES, help="run only these pieces")
    p.add_argument(
        "--megatron-probe",
        action="store_true",
        help="also build Megatron's gathered fully_reshardable state (host memory)",
    )
    add_common_args(p)
    args = p.parse_args(argv)
    runs: dict[str, Callable[[], Any]] = {
        "ckpt8b": lambda: ckpt8b_run(args.workdir, args.megatron_probe),
        "async_ckpt": lambda: async_ckpt_runs(args.workdir),
    }
    pieces = {name: runs[name] for name in args.only or PIECES}
    return run_pieces(new_report("benchmarks.checkpoint_8b"), pieces, args)


if __name__ == "__main__":
    sys.exit(main())
