"""What every GPU benchmark's JSON records, and how its pieces run.

A report names the command that made it, the machine (GPUs, driver, cores, kernel, NCCL
settings) and the versions of what ran; each piece's result, error or skip follows. The report
is rewritten after every piece (and by pieces of several cases after every case), so a run cut
off by a time limit keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from devtools.training.gpu import WORLD, default_workdir

PEAK_FLOPS = "989e12 (H100/H200 dense BF16), MFU per GPU"


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Python, torch, CUDA, cuDNN, NCCL and the packages the trainer's fast paths use."""
    nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()),
        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        "megatron-core": _version("megatron-core"),
        "transformer-engine": _version("transformer-engine"),
        "liger-kernel": _version("liger-kernel"),
        "triton": _version("triton"),
    }


def machine() -> dict[str, Any]:
    """The GPUs and host this ran on; the card's name stays in the report, not the file name."""
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


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--output, --workdir and --budget-s, which every multi-GPU benchmark takes."""
    parser.add_argument("--output", type=Path, help="also write the JSON report here")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=default_workdir(),
        help="where the runs write (checkpoints, logs); default: %(default)s",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=float("inf"),
        help="start no piece after this many seconds (the rest are listed as skipped)",
    )


def new_report(module: str) -> dict[str, Any]:
    """The head of a report: `module` (e.g. benchmarks.reshard), its command line, machine."""
    return {
        "benchmark": module.rpartition(".")[2],
        "command": f"python -m {module} " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "versions": versions(),
        "world_size": WORLD,
        "peak_flops": PEAK_FLOPS,
        "results": {},
        "errors": {},
        "skipped_for_budget": [],
    }


def write(report: dict[str, Any], output: Path | None) -> None:
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1) + "\n")


def run_pieces(
    report: dict[str, Any],
    pieces: dict[str, Callable[[], Any]],
    args: argparse.Namespace,
) -> int:
    """Run each piece in order until `args.budget_s` is spent; record its result, or its error
    (one broken shape must not hide the others); print the report. Exit code 1 on any error,
    2 without exactly WORLD GPUs."""
    if torch.cuda.device_count() != WORLD:
        print(f"{report['benchmark']} needs exactly {WORLD} visible GPUs, "
              f"found {torch.cuda.device_count()}", file=sys.stderr)  # fmt: skip
        return 2
    began = time.perf_counter()
    for name, piece in pieces.items():
        if time.perf_counter() - began > args.budget_s:
            report["skipped_for_budget"].append(name)
            continue
        t0 = time.perf_counter()
        try:
            report["results"][name] = piece()
        except Exception as err:
            report["errors"][name] = f"{type(err).__name__}: {err}"[-8000:]
        report.setdefault("piece_s", {})[name] = time.perf_counter() - t0
        print(f"[{report['benchmark']}] {name}: {time.perf_counter() - t0:.1f}s",
              file=sys.stderr, flush=True)  # fmt: skip
        write(report, args.output)
    report["wall_s"] = time.perf_counter() - began
    write(report, args.output)
    print(json.dumps(report, indent=1))
    return 1 if report["errors"] else 0
