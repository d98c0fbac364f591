"""How long building the process groups takes: Megatron's global setup vs kubetron's collection.

Every trainer builds its groups at start-up, so the setup time is paid on every (re)start of
every pod. This measures, in one run and per world size, with gloo on CPU and shape TP2 x PP2:
  megatron        parallel_state.initialize_model_parallel (defaults, so with its Gloo twins)
  kubetron        build_process_groups: the full ProcessGroupCollection from HyperCommGrids
  kubetron_shared the same, fields with identical members sharing one communicator
  kubetron_local  the same as kubetron with local_sync=True (each rank creates only its own)
Imports and init_process_group stay outside the timer; each repetition runs the three variants
in turn, timed from a barrier to the slowest rank's finish.

    .venv/bin/python benchmarks/pg_setup.py --worlds 8 16 32 --reps 3
prints JSON and writes benchmarks/results/pg_setup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

RESULT = Path(__file__).with_name("results") / "pg_setup.json"
VARIANTS = ("megatron", "kubetron", "kubetron_shared", "kubetron_local")
SHAPE = {"tp": 2, "pp": 2}


def worker(out: Path, reps: int) -> None:
    """One torchrun process: time every variant `reps` times, rank 0 writes the timings."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.runtime.parallel import (
        GroupOptions,
        build_process_groups,
        init_distributed,
    )
    from kubetron_trainer.runtime.topology import Topology

    topo = Topology.from_env()
    init_distributed(topo, backend="gloo")
    dims = ParallelDims.from_degrees(topo.world_size, **SHAPE)

    def megatron() -> None:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=dims.tp,
            pipeline_model_parallel_size=dims.pp,
            expert_tensor_parallel_size=dims.etp,
        )

    def megatron_teardown() -> None:
        for group in parallel_state._global_process_group_list or []:
            if group is not None:
                dist.destroy_process_group(group)
        parallel_state.destroy_model_parallel()
        parallel_state._global_process_group_list = None

    built: list[Any] = []

    def kubetron(options: GroupOptions) -> tuple[Any, None]:
        return lambda: built.append(build_process_groups(dims, topo, options=options)), None

    run = {
        "megatron": (megatron, megatron_teardown),
        "kubetron": kubetron(GroupOptions()),
        "kubetron_shared": kubetron(GroupOptions(share_identical=True)),
        "kubetron_local": kubetron(GroupOptions(local_sync=True)),
    }
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(reps):
        for variant in VARIANTS:
            build, teardown = run[variant]
            dist.barrier()
            start = time.perf_counter()
            build()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[variant].append(elapsed.item())
            if teardown is not None:
                teardown()
            while built:
                built.pop().destroy()
    if topo.rank == 0:
        out.write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={world}", __file__, "--worker", str(out), "--reps", str(reps)]
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"world {world} failed:\n{proc.stderr[-4000:]}")
        times = json.loads(out.read_text())
    summary: dict[str, Any] = {"world_size": world}
    for variant, values in times.items():
        summary[variant] = {
            "median_s": round(statistics.median(values), 4),
            "min_s": round(min(values), 4),
            "runs_s": [round(v, 4) for v in values],
        }
    for variant in VARIANTS[1:]:
        ratio = summary[variant]["median_s"] / summary["megatron"]["median_s"]
        summary[f"{variant}_over_megatron"] = round(ratio, 3)
    return summary


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "megatron_core": version("megatron-core"),
        "backend": "gloo (CPU)",
        "shape": SHAPE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.reps)
        return
    load_before = os.getloadavg()
    results = [run_world(w, args.reps) for w in args.worlds]
    # other work on the machine inflates the absolute times; the variants of one repetition run
    # back to back, so their ratios suffer less
    load = {"before": load_before, "after": os.getloadavg()}
    report = {"machine": machine() | {"load_average_1m_5m_15m": load}, "results": results}
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
