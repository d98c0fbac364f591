"""The process-group oracle: one torchrun worker that builds groups both ways and writes what
it saw (tests/distributed, and the 2-GPU runs with NCCL).

Run as `torchrun --standalone --nproc-per-node=N pg_oracle.py MODES OUT_DIR [STRIDE]`; each
rank writes OUT_DIR/rank<r>.json and the test process compares. MODES, comma-separated:
  oracle  every (STRIDE-th) shape that fits the world: our groups vs parallel_state's, by field
  multi   several grids in one world, vs parallel_state with rank_offset / local_world_size
  rng     RNG state after setup_megatron_globals vs Megatron training's _set_random_seed
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from kubetron_api.dims import ParallelConfigError, ParallelDims
from kubetron_trainer.runtime.parallel import (
    GridSpec,
    GroupOptions,
    build_process_groups,
    build_process_groups_multi,
    init_distributed,
    setup_megatron_globals,
)
from kubetron_trainer.runtime.topology import Topology

VARIANTS = [GroupOptions(), GroupOptions(share_identical=True), GroupOptions(local_sync=True)]
BACKEND = "gloo"  # also on a GPU: several workers may share one device
FIELDS = [f.name for f in fields(ProcessGroupCollection)]


def all_shapes(world: int) -> list[dict[str, int]]:
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    shapes = []
    for tp, pp, cp, ep, etp in itertools.product(divisors, repeat=5):
        try:
            ParallelDims.from_degrees(world, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp)
        except ParallelConfigError:
            continue
        shapes.append({"tp": tp, "pp": pp, "cp": cp, "ep": ep, "etp": etp})
    return shapes


def describe(pg: ProcessGroupCollection | None) -> dict[str, Any]:
    """Field -> sorted global ranks of this rank's group (None when unset or None)."""
    if pg is None:
        return {}
    out: dict[str, Any] = {}
    for name in FIELDS:
        group = getattr(pg, name)
        if isinstance(group, list):
            out[name] = [dist.get_process_group_ranks(g) for g in group]
        elif isinstance(group, dist.ProcessGroup):
            out[name] = sorted(dist.get_process_group_ranks(group))
        else:
            out[name] = None
    out["_set"] = sorted(vars(pg))
    out["_alias_ok"] = pg.dp_cp_gtp_remat is pg.dp_cp and pg.tp_ep_pp_with_egtp_remat is pg.tp_ep_pp
    return out


def megatron_groups(shape: dict[str, int], **kwargs: Any) -> dict[str, Any]:
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=shape["tp"],
        pipeline_model_parallel_size=shape["pp"],
        context_parallel_size=shape["cp"],
        expert_model_parallel_size=shape["ep"],
        expert_tensor_parallel_size=shape["etp"],
        order="tp-cp-ep-dp-pp",
        create_gloo_process_groups=False,
        **kwargs,
    )
    member = parallel_state._TENSOR_MODEL_PARALLEL_GROUP is not None
    seen = describe(ProcessGroupCollection.use_mpu_process_groups()) if member else {}
    destroy_megatron()
    return seen


def destroy_megatron() -> None:
    # parallel_state forgets its groups without destroying them; free the sockets ourselves.
    for group in parallel_state._global_process_group_list or []:
        if group is not None:
            dist.destroy_process_group(group)
    parallel_state.destroy_model_parallel()
    parallel_state._global_process_group_list = None
    dist.barrier()


def run_oracle(topo: Topology, stride: int = 1) -> list[dict[str, Any]]:
    results = []
    cases = [(s, 1) for s in all_shapes(topo.world_size)[::stride]]
    if parallel_state.HAVE_EINOPS:  # Megatron needs einops for several optimizer instances
        cases += [(s, 2) for s, _ in cases if _instances_fit(s, topo.world_size, 2)][:6]
    for index, (shape, instances) in enumerate(cases):
        dims = ParallelDims.from_degrees(topo.world_size, **shape)
        theirs = megatron_groups(shape, num_distributed_optimizer_instances=instances)
        # each way of building, in turn: Megatron's communicators, shared ones, local sync
        variant = VARIANTS[index % len(VARIANTS)]
        options = replace(variant, dist_opt_instances=instances)
        groups = build_process_groups(dims, topo, BACKEND, options=options)
        ours = describe(groups.pg)
        members = {name: groups.members(name) for name in FIELDS}
        groups.destroy()
        dist.barrier()  # every rank has torn the shape down before the next one starts
        results.append(
            {"shape": shape, "instances": instances, "ours": ours, "megatron": theirs}
            | {"members": members, "variant": _named(variant)}
        )
    return results


def _named(options: GroupOptions) -> dict[str, bool]:
    """The variant's switches that are on, as the report names them."""
    return {name: True for name in ("share_identical", "local_sync") if getattr(options, name)}


def _instances_fit(shape: dict[str, int], world: int, n: int) -> bool:
    dims = ParallelDims.from_degrees(world, **shape)
    return dims.dp * dims.cp % n == 0 and dims.edp % n == 0


MULTI_CASES = {
    "split": [("policy", {"tp": 2}, 0, 4), ("reference", {"tp": 1}, 4, 4)],
    "shared": [("policy", {"tp": 2, "pp": 2}, 0, 8), ("reference", {"tp": 4, "ep": 2}, 0, 8)],
}


def run_multi(topo: Topology) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case, grids in MULTI_CASES.items():
        full = {name: _full_shape(shape) for name, shape, _, _ in grids}
        specs = [
            GridSpec(name, ParallelDims.from_degrees(size, **full[name]), offset)
            for name, _, offset, size in grids
        ]
        built = build_process_groups_multi(specs, topo, BACKEND)
        sums = {}
        for name, groups in built.items():
            if groups.pg is not None:  # a collective on each grid proves the groups work
                value = torch.tensor([float(topo.rank)])
                dist.all_reduce(value, group=groups.pg.tp)
                sums[name] = value.item()
        ours = {name: describe(g.pg) for name, g in built.items()}
        for groups in built.values():
            groups.destroy()
        theirs = {
            name: megatron_groups(full[name], rank_offset=offset, local_world_size=size)
            for name, _, offset, size in grids
        }
        out[case] = {"ours": ours, "megatron": theirs, "tp_sums": sums}
    return out


def _full_shape(shape: dict[str, int]) -> dict[str, int]:
    """Every degree spelled out; expert TP defaults to TP, as in Megatron."""
    return {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": shape.get("tp", 1)} | shape


def rng_state() -> dict[str, str]:
    """Digests of every generator Megatron seeds: Python, NumPy, torch CPU, and on a GPU the CUDA
    generator and each state of Megatron's CUDA RNG tracker."""
    digest = hashlib.sha256()
    digest.update(torch.get_rng_state().numpy().tobytes())
    digest.update(np.random.get_state()[1].tobytes())
    digest.update(repr(random.getstate()).encode())
    out = {"torch": str(torch.initial_seed()), "digest": digest.hexdigest()}
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        out["cuda"] = hashlib.sha256(torch.cuda.get_rng_state().numpy().tobytes()).hexdigest()
        for name, state in sorted(get_cuda_rng_tracker().get_states().items()):
            out[f"tracker:{name}"] = hashlib.sha256(state.numpy().tobytes()).hexdigest()
    return out


def run_rng(topo: Topology) -> list[dict[str, Any]]:
    from megatron.training.initialize import _set_random_seed

    results = []
    for shape in [{"tp": 2, "pp": 2}, {"pp": 4}, {"tp": 2, "ep": 2, "etp": 1}, {"cp": 2}]:
        for dp_init in (False, True):
            full = _full_shape(shape)
            parallel_state.initialize_model_parallel(
                **_megatron_sizes(full), order="tp-cp-ep-dp-pp", create_gloo_process_groups=False
            )
            _set_random_seed(1234, data_parallel_random_init=dp_init)
            theirs = rng_state() | _megatron_ranks()
            destroy_megatron()
            groups = build_process_groups(
                ParallelDims.from_degrees(topo.world_size, **full), topo, BACKEND
            )
            seeds = setup_megatron_globals(groups.pg, 1234, data_parallel_random_init=dp_init)
            ours = rng_state() | _our_ranks(groups.pg)
            buffer_set = parallel_state.get_global_memory_buffer() is not None
            groups.destroy()
            parallel_state.destroy_model_parallel()
            results.append(
                {"shape": full, "dp_init": dp_init, "ours": ours, "megatron": theirs}
                | {"seeds": seeds.__dict__, "buffer_set": buffer_set}
            )
    return results


def _megatron_sizes(shape: dict[str, int]) -> dict[str, int]:
    return {
        "tensor_model_parallel_size": shape["tp"],
        "pipeline_model_parallel_size": shape["pp"],
        "context_parallel_size": shape["cp"],
        "expert_model_parallel_size": shape["ep"],
        "expert_tensor_parallel_size": shape["etp"],
    }


def _megatron_ranks() -> dict[str, int]:
    ps = parallel_state
    return {
        "tp": ps.get_tensor_model_parallel_rank(),
        "pp": ps.get_pipeline_model_parallel_rank(),
        "ep": ps.get_expert_model_parallel_rank(),
        "etp": ps.get_expert_tensor_parallel_rank(),
    }


def _our_ranks(pg: Any) -> dict[str, int]:
    return {"tp": pg.tp.rank(), "pp": pg.pp.rank(), "ep": pg.ep.rank(), "etp": pg.expt_tp.rank()}


def main() -> None:
    """argv: MODES (comma-separated) OUT_DIR [ORACLE_STRIDE]."""
    modes, out_dir = sys.argv[1].split(","), Path(sys.argv[2])
    stride = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    topo = Topology.from_env()
    init_distributed(topo, backend="gloo")
    result: dict[str, Any] = {"topology": topo.__dict__}
    for mode in modes:
        if mode == "oracle":
            result[mode] = run_oracle(topo, stride)
        else:
            result[mode] = {"multi": run_multi, "rng": run_rng}[mode](topo)
    (out_dir / f"rank{topo.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
