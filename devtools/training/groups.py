"""Process groups on 2 GPUs with NCCL, one torchrun process a GPU.

The worker (this module under torchrun) runs the process-group oracle (pg_oracle.py) with NCCL:
every shape of the world, each ProcessGroupCollection field's members against Megatron's global
parallel_state; two models of different shapes in one world (policy TP2, reference TP1 x DP2)
with an all-reduce on each grid's groups; and the seconds to build all groups, Megatron's
initialize_model_parallel against kubetron's collection and its variants.

    python -m torch.distributed.run --standalone --nproc-per-node=2 -m devtools.training.groups \
        OUT_DIR [--reps N] [--backend nccl|gloo]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from devtools.training.gpu import fresh_dir, torchrun_module

MULTI_GRIDS = [("policy", {"tp": 2}), ("reference", {"tp": 1})]  # both over all ranks


def full_shape(shape: dict[str, int]) -> dict[str, int]:
    return {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": 1} | shape


def worker(out_dir: Path, reps: int, backend: str = "nccl") -> None:
    """One torchrun process: oracle, two grids in one world, setup timing (gloo: a CPU check
    of this script)."""
    import torch.distributed as dist

    from devtools.training import pg_oracle as oracle
    from kubetron_trainer.runtime.parallel import init_distributed
    from kubetron_trainer.runtime.topology import Topology

    oracle.BACKEND = backend  # the oracle's own groups, built with NCCL like the trainer's
    topo = Topology.from_env()
    init_distributed(topo, backend=backend)
    default = dist.distributed_c10d._get_default_group()
    result: dict[str, Any] = {
        "topology": topo.__dict__,
        "backend": dist.get_backend(),
        "bound_device_id": str(getattr(default, "bound_device_id", None)),
    }
    begin = time.perf_counter()
    result["oracle"] = oracle.run_oracle(topo)
    result["oracle_s"] = time.perf_counter() - begin
    result["multi"] = run_multi(topo, oracle, backend)
    result["setup"] = time_setup(topo, reps, oracle, backend)
    (out_dir / f"rank{topo.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_multi(topo: Any, oracle: Any, backend: str) -> dict[str, Any]:
    """Policy TP2 and reference TP1 x DP2 on the same two ranks; a CUDA all-reduce (sum of
    rank + 1) over each grid's tp and dp groups proves the communicators work."""
    import torch.distributed as dist

    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.runtime.parallel import GridSpec, build_process_groups_multi

    specs = [
        GridSpec(name, ParallelDims.from_degrees(topo.world_size, **full_shape(shape)))
        for name, shape in MULTI_GRIDS
    ]
    built = build_process_groups_multi(specs, topo, backend)
    device = "cuda" if backend == "nccl" else "cpu"
    sums: dict[str, dict[str, float]] = {}
    for name, groups in built.items():
        assert groups.pg is not None
        sums[name] = {}
        for dim in ("tp", "dp"):
            value = torch.tensor([float(topo.rank + 1)], device=device)
            dist.all_reduce(value, group=getattr(groups.pg, dim))
            sums[name][dim] = value.item()
    ours = {name: oracle.describe(g.pg) for name, g in built.items()}
    for groups in built.values():
        groups.destroy()
    theirs = {name: oracle.megatron_groups(full_shape(shape)) for name, shape in MULTI_GRIDS}
    return {"ours": ours, "megatron": theirs, "sums": sums}


SETUP_SHAPES = [{"tp": 2}, {"pp": 2}]


def time_setup(topo: Any, reps: int, oracle: Any, backend: str) -> list[dict[str, Any]]:
    """Seconds from a barrier to the slowest rank's finish, per variant, `reps` times after one
    untimed round (NCCL's first communicator pays one-off costs)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.runtime.parallel import GroupOptions, build_process_groups

    nccl = backend == "nccl"
    out = []
    built: list[Any] = []
    for shape in SETUP_SHAPES:
        dims = ParallelDims.from_degrees(topo.world_size, **full_shape(shape))

        def megatron(gloo: bool, dims: ParallelDims = dims) -> None:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=dims.tp,
                pipeline_model_parallel_size=dims.pp,
                expert_tensor_parallel_size=dims.etp,
                create_gloo_process_groups=gloo,
            )

        def ours(options: GroupOptions, dims: ParallelDims = dims) -> None:
            built.append(build_process_groups(dims, topo, backend, options=options))

        variants = {
            "megatron": functools.partial(megatron, True),
            "megatron_no_gloo": functools.partial(megatron, False),
            "kubetron": functools.partial(ours, GroupOptions()),
            "kubetron_shared": functools.partial(ours, GroupOptions(share_identical=True)),
            "kubetron_local": functools.partial(ours, GroupOptions(local_sync=True)),
        }
        times: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(reps + 1):
            for variant, build in variants.items():
                dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)
                start = time.perf_counter()
                build()
                elapsed = torch.tensor(
                    [time.perf_counter() - start], device="cuda" if nccl else "cpu"
                )
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if rep:
                    times[variant].append(elapsed.item())
                if variant.startswith("megatron"):
                    oracle.destroy_megatron()
                while built:
                    built.pop().destroy()
        entry: dict[str, Any] = {"shape": shape, "reps": reps}
        for variant, values in times.items():
            entry[variant] = {"median_s": statistics.median(values), "runs_s": values}
        for variant in variants:
            entry[f"{variant}_over_megatron"] = (
                entry[variant]["median_s"] / entry["megatron"]["median_s"]
            )
        out.append(entry)
    return out


def groups_run(workdir: Path, reps: int = 2, backend: str = "nccl") -> list[dict[str, Any]]:
    """One torchrun of `worker` over all GPUs; every rank's JSON."""
    out = fresh_dir(workdir / "groups")
    args = [str(out), "--reps", str(reps), "--backend", backend]
    return torchrun_module(__name__, args, out)


def groups_report(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """What to record: shapes checked, per-rank agreement, the multi-grid sums, setup times."""
    fields_checked = 0
    mismatches = []
    for seen in ranks:
        for case in seen["oracle"]:
            for name, theirs in case["megatron"].items():
                if name.startswith("_") or name in ("gtp_remat", "expt_gtp_remat"):
                    continue
                fields_checked += 1
                if case["ours"].get(name) != theirs:
                    mismatches.append((seen["topology"]["rank"], case["shape"], name))
    return {
        "backend": ranks[0]["backend"],
        "bound_device_id": [seen["bound_device_id"] for seen in ranks],
        "oracle_cases": [
            {"shape": c["shape"], "dist_opt_instances": c["instances"], "variant": c["variant"]}
            for c in ranks[0]["oracle"]
        ],
        "oracle_fields_compared": fields_checked,
        "oracle_mismatches": mismatches,
        "oracle_s": [seen["oracle_s"] for seen in ranks],
        "multi": {seen["topology"]["rank"]: seen["multi"] for seen in ranks},
        "setup": ranks[0]["setup"],
    }


# ----------------------------------------------------------------------------------- the run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="each rank writes rank<r>.json here")
    p.add_argument("--reps", type=int, default=2, help="timed rounds of group setup")
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    args = p.parse_args()
    worker(args.out, args.reps, args.backend)


if __name__ == "__main__":
    main()
