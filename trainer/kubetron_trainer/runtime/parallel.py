"""Each trainer's own process groups: a Megatron-Core `ProcessGroupCollection` from HyperCommGrids.

Megatron's `parallel_state.initialize_model_parallel` keeps one set of groups in module globals,
so a process can hold only one parallel shape and every rank creates every group (plus Gloo
twins). kubetron builds the groups instead from two `HyperCommGrid`s per model, the dense grid
`[tp, cp, dp, pp]` and the expert grid `[etp, ep, edp, pp]` (tp fastest, Megatron's
`tp-cp-ep-dp-pp` order), and hands the collection to the model, DDP, optimizer and schedules.
A grid may cover a slice of the world (`rank_offset`), so two models of different shapes (an RL
policy and its reference) can live in one job.

Every field of Megatron-Core 0.19's `ProcessGroupCollection` is set, to a group, to an alias
where Megatron aliases too, or to None for features kubetron does not configure (0.19 checks
that fields were set). `setup_megatron_globals` does the little process-wide setup Megatron
still reads from globals: the memory buffer and the RNG seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.process_groups_config import ProcessGroupCollection

from kubetron_api.dims import ParallelDims, ParallelGroupsError
from kubetron_trainer.runtime.topology import Topology

DENSE_DIM_NAMES = ["tp", "cp", "dp", "pp"]
EXPERT_DIM_NAMES = ["etp", "ep", "edp", "pp"]

# Collection fields that are one combination of grid dimensions.
DENSE_GROUPS: dict[str, list[str]] = {
    "tp": ["tp"],
    "cp": ["cp"],
    "dp": ["dp"],
    "pp": ["pp"],
    "mp": ["tp", "pp"],
    "tp_cp": ["tp", "cp"],
    "dp_cp": ["cp", "dp"],
    "tp_dp_cp": ["tp", "cp", "dp"],
}
EXPERT_GROUPS: dict[str, list[str]] = {
    "ep": ["ep"],
    "expt_tp": ["etp"],
    "expt_dp": ["edp"],
    "tp_ep": ["etp", "ep"],
    "tp_ep_pp": ["etp", "ep", "pp"],
}
# Fields that hold the same group as another field while GTP weight rematerialisation is off
# (Megatron aliases the first two and builds a twin with the same members for the third).
ALIASES = {
    "dp_cp_gtp_remat": "dp_cp",
    "expt_dp_gtp_remat": "expt_dp",
    "tp_ep_pp_with_egtp_remat": "tp_ep_pp",
}
# Fields for features kubetron does not configure: hierarchical CP, GTP weight rematerialisation
# (None means "off" to Megatron), separate all-gather communicators for AG/RS overlap.
UNUSED = ("hcp", "gtp_remat", "expt_gtp_remat", "dp_cp_ag", "expt_dp_ag")


def default_backend() -> str:
    """NCCL where CUDA is, gloo on CPU (tests, the local sandbox)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def make_grids(
    dims: ParallelDims, rank_offset: int = 0, backend: str | None = None
) -> tuple[HyperCommGrid, HyperCommGrid]:
    """The dense and expert grids of one model, over ranks [rank_offset, rank_offset + world).

    HyperCommGrid reads the job's size from `WORLD_SIZE` or the initialised default group.
    """
    dense = HyperCommGrid(
        [dims.tp, dims.cp, dims.dp, dims.pp], DENSE_DIM_NAMES, rank_offset, backend
    )
    expert = HyperCommGrid(
        [dims.etp, dims.ep, dims.edp, dims.pp], EXPERT_DIM_NAMES, rank_offset, backend
    )
    return dense, expert


def rank_lists(
    dense: HyperCommGrid, expert: HyperCommGrid, dist_opt_instances: int = 1
) -> dict[str, list[list[int]]]:
    """Every group of every field that gets its own groups, as lists of global ranks.

    Pure rank arithmetic (no process groups are created), in the order the groups are built.
    """
    lists = {name: dense.get_rank_enum(d) for name, d in DENSE_GROUPS.items()}
    lists |= {name: expert.get_rank_enum(d) for name, d in EXPERT_GROUPS.items()}
    if lists["pp"] != expert.get_rank_enum("pp"):
        raise ParallelGroupsError("dense and expert grids disagree on the pipeline groups")
    # Word embeddings live on the first and last stage, position embeddings on the first,
    # as in parallel_state's default_embedding_ranks / default_position_embedding_ranks.
    lists["embd"] = [sorted({pp[0], pp[-1]}) for pp in lists["pp"]]
    lists["pos_embd"] = [[pp[0]] for pp in lists["pp"]]
    lists |= _dist_opt_lists(lists, dist_opt_instances)
    return lists


def _dist_opt_lists(lists: dict[str, list[list[int]]], n: int) -> dict[str, list[list[int]]]:
    """Groups of the distributed optimizer split into `n` instances, as Megatron lays them out.

    Each instance shards over a contiguous part of every dp-cp / expert-dp group; the
    inter-instance group joins the ranks at the same position of each part.
    """
    edp = len(lists["expt_dp"][0])
    dp_cp = len(lists["dp_cp"][0])
    if n < 1 or dp_cp % n or edp % n:
        raise ParallelGroupsError(
            f"distributed optimizer instances={n} must be >= 1 and divide data*context="
            f"{dp_cp} and the expert data-parallel degree {edp}; choose a divisor of both"
        )
    per_edp, per_dp = edp // n, dp_cp // n
    model_groups = lists["tp_ep_pp"]
    out = {
        "intra_dist_opt": [
            sorted(r for g in model_groups[i * per_edp : (i + 1) * per_edp] for r in g)
            for i in range(n)
        ]
    }
    if n > 1:
        out["intra_dp_cp"] = [
            g[i * per_dp : (i + 1) * per_dp] for g in lists["dp_cp"] for i in range(n)
        ]
        out["intra_expt_dp"] = [
            g[i * per_edp : (i + 1) * per_edp] for g in lists["expt_dp"] for i in range(n)
        ]
        out["inter_dist_opt"] = [g[j::per_edp] for g in lists["expt_dp"] for j in range(per_edp)]
    return out


def check_grid_fits(dims: ParallelDims, topology: Topology, rank_offset: int = 0) -> None:
    """Raise unless the grid's ranks exist and every (expert) TP group stays inside one pod.

    Tensor parallelism exchanges activations in every layer and needs NVLink, so a TP group that
    straddles two pods would run, slowly, over the network; we refuse it instead.
    """
    end = rank_offset + dims.world_size
    if rank_offset < 0 or end > topology.world_size:
        raise ParallelGroupsError(
            f"grid of {dims.world_size} ranks at rank_offset={rank_offset} needs ranks "
            f"[{rank_offset}, {end}) but the job has WORLD_SIZE={topology.world_size}; "
            "shrink the grid or the offset"
        )
    for degree, size in (("tensor", dims.tp), ("expertTensor", dims.etp)):
        for first in range(rank_offset, end, size):
            last = first + size - 1
            if topology.node_of(first) != topology.node_of(last):
                raise ParallelGroupsError(
                    f"{degree}={size} puts ranks {first}..{last} of one TP group on pods "
                    f"{topology.node_of(first)} and {topology.node_of(last)} "
                    f"(LOCAL_WORLD_SIZE={topology.local_world_size} processes per pod, "
                    f"rank_offset={rank_offset}); TP needs the GPUs of one node: make {degree} "
                    f"divide {topology.local_world_size} and rank_offset a multiple of it"
                )


def init_distributed(
    topology: Topology, backend: str | None = None, timeout: timedelta | None = None
) -> None:
    """Join the job's default process group (idempotent); binds the GPU first under NCCL.
    `timeout`: how long its collectives may wait (None: torch's default for the backend)."""
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(topology.local_rank)
        device_id = torch.device("cuda", topology.local_rank)
    dist.init_process_group(
        backend,
        init_method=topology.init_method,
        rank=topology.rank,
        world_size=topology.world_size,
        device_id=device_id,
        timeout=timeout,
    )


@dataclass
class ParallelGroups:
    """One model's process groups on this rank, with the rank lists and grids they came from.

    `pg` is None on ranks outside the grid's slice; they still took part in creating it.
    """

    dims: ParallelDims
    rank_offset: int
    rank: int
    rank_lists: dict[str, list[list[int]]]
    dense_grid: HyperCommGrid
    expert_grid: HyperCommGrid
    pg: ProcessGroupCollection | None
    aliases: dict[str, str] = field(default_factory=dict)
    _extra: list[dist.ProcessGroup] = field(default_factory=list, repr=False)

    @property
    def is_member(self) -> bool:
        return self.rank_offset <= self.rank < self.rank_offset + self.dims.world_size

    def members(self, name: str) -> list[int]:
        """Global ranks of this rank's group in collection field `name` ([] if in none)."""
        name = self.aliases.get(name, name)
        for ranks in self.rank_lists.get(name, []):
            if self.rank in ranks:
                return sorted(ranks)
        return []

    def destroy(self) -> None:
        """Destroy the groups this rank belongs to; every rank calls it, in the same order."""
        self.dense_grid.destroy()
        self.expert_grid.destroy()
        for group in self._extra:
            dist.destroy_process_group(group)
        self._extra.clear()
        self.pg = None


def aliases(dist_opt_instances: int) -> dict[str, str]:
    """Fields that share another field's group; with one optimizer instance the intra-instance
    groups are the whole data-parallel groups, as in Megatron."""
    if dist_opt_instances > 1:
        return dict(ALIASES)
    return ALIASES | {"intra_dp_cp": "dp_cp", "intra_expt_dp": "expt_dp"}


@dataclass(frozen=True)
class GroupOptions:
    """How to build a grid's groups; the defaults give exactly Megatron's set of communicators.

    dist_opt_instances: distributed-optimizer instances (Megatron's
        num_distributed_optimizer_instances); > 1 adds the intra/inter-instance groups.
    share_identical: fields whose groups have the same members share one communicator (with
        cp=1, tp_cp is tp, dp_cp is dp, ...). Fewer groups and a faster start, but collectives of
        those fields then queue on one communicator instead of overlapping, and the grids'
        `get_pg` knows only the first field of each identical set.
    local_sync: each rank creates only its own groups (`use_local_synchronization=True`); needs
        a grid over the whole world, and the grids' `get_pg` stays empty.
    timeout: how long a collective on these groups may wait before it fails.
    """

    dist_opt_instances: int = 1
    share_identical: bool = False
    local_sync: bool = False
    timeout: timedelta | None = None  # every group's (None: torch's default for the backend)


def build_process_groups(
    dims: ParallelDims,
    topology: Topology,
    backend: str | None = None,
    *,
    rank_offset: int = 0,
    options: GroupOptions = GroupOptions(),
) -> ParallelGroups:
    """Build one model's groups over ranks [rank_offset, rank_offset + dims.world_size).

    Every rank of the job must call this with the same arguments in the same order (group
    creation is collective); ranks outside the slice get `pg=None`.
    """
    _check_initialized(topology)
    check_grid_fits(dims, topology, rank_offset)
    if options.local_sync and dims.world_size != topology.world_size:
        raise ParallelGroupsError(
            f"local_sync needs a grid over all {topology.world_size} ranks, this one has "
            f"{dims.world_size} at rank_offset={rank_offset}; build it with local_sync=False"
        )
    backend = backend or default_backend()
    dense, expert = make_grids(dims, rank_offset, backend)
    lists = rank_lists(dense, expert, options.dist_opt_instances)
    result = ParallelGroups(
        dims,
        rank_offset,
        topology.rank,
        lists,
        dense,
        expert,
        None,
        aliases(options.dist_opt_instances),
    )
    groups = _create_groups(result, backend, options)
    if result.is_member:
        result.pg = _collection(groups, result.aliases)
    return result


def _check_initialized(topology: Topology) -> None:
    if not dist.is_initialized():
        raise ParallelGroupsError(
            "torch.distributed is not initialised; call init_distributed(topology) first"
        )
    if (dist.get_rank(), dist.get_world_size()) != (topology.rank, topology.world_size):
        raise ParallelGroupsError(
            f"default group has rank {dist.get_rank()} of {dist.get_world_size()} but the "
            f"topology says RANK={topology.rank} of WORLD_SIZE={topology.world_size}; "
            "initialise torch.distributed from the same Topology"
        )


Groups = dict[str, dist.ProcessGroup | None]


def _create_groups(built: ParallelGroups, backend: str, options: GroupOptions) -> Groups:
    """Create every field's groups, in the order of `rank_lists` (the same on every rank)."""
    groups: Groups = {}
    first_with: dict[frozenset[frozenset[int]], str] = {}
    for name, all_ranks in built.rank_lists.items():
        members = frozenset(frozenset(g) for g in all_ranks)
        if options.share_identical and members in first_with:
            groups[name] = groups[first_with[members]]
            continue
        first_with.setdefault(members, name)
        timeout = {"timeout": options.timeout} if options.timeout is not None else {}
        if options.local_sync:
            groups[name] = _create_own(all_ranks, built, backend, name, options.timeout)
        elif name in DENSE_GROUPS:  # registered in the grid, so grid.get_pg works
            groups[name] = built.dense_grid.create_pg(
                DENSE_GROUPS[name], group_desc=_desc(name), **timeout
            )
        elif name in EXPERT_GROUPS:
            groups[name] = built.expert_grid.create_pg(
                EXPERT_GROUPS[name], group_desc=_desc(name), **timeout
            )
        else:
            groups[name] = None
            for ranks in all_ranks:
                group = _new_group(ranks, backend, name, local=False, timeout=options.timeout)
                if group is not None:
                    groups[name] = group
                    built._extra.append(group)
    return groups


def _create_own(
    all_ranks: list[list[int]],
    built: ParallelGroups,
    backend: str,
    name: str,
    timeout: timedelta | None = None,
) -> dist.ProcessGroup | None:
    """Create only this rank's group, synchronising with its members alone.

    torch names such groups from a per-process counter that advances only on members, so every
    rank must create as many of them as every other, or later groups get different names on
    different ranks and hang: a rank in no group of this field (embeddings live on the first
    and last stage only) creates a group of itself instead.
    """
    own = next((ranks for ranks in all_ranks if built.rank in ranks), None)
    group = _new_group(own or [built.rank], backend, name, local=True, timeout=timeout)
    if group is not None:
        built._extra.append(group)
    return group if own else None


def _desc(name: str) -> str:
    return f"KUBETRON_{name.upper()}"


def _new_group(
    ranks: list[int], backend: str, name: str, *, local: bool, timeout: timedelta | None = None
) -> dist.ProcessGroup | None:
    """`dist.new_group`, with None instead of torch's non-member sentinel."""
    group = dist.new_group(
        ranks,
        backend=backend,
        use_local_synchronization=local,
        group_desc=_desc(name),
        timeout=timeout,
    )
    return group if isinstance(group, dist.ProcessGroup) else None


def _collection(groups: Groups, alias: dict[str, str]) -> ProcessGroupCollection:
    """The collection with every field set: own group, alias, or None for unused features."""
    values = dict(groups)
    values |= {name: values[target] for name, target in alias.items()}
    values |= dict.fromkeys(UNUSED)
    values.setdefault("inter_dist_opt", None)
    return ProcessGroupCollection(**values)


@dataclass(frozen=True)
class GridSpec:
    """One model's grid in a job that holds several: its name, shape and first rank."""

    name: str
    dims: ParallelDims
    rank_offset: int = 0
    options: GroupOptions = GroupOptions()


def build_process_groups_multi(
    specs: Sequence[GridSpec], topology: Topology, backend: str | None = None
) -> dict[str, ParallelGroups]:
    """Build several grids (e.g. an RL policy on ranks 0-3 and its reference on 4-7, or both on
    all ranks with different shapes). Every rank builds every grid, in the order given, because
    creating a group is collective over the world; each rank gets `pg=None` where it is outside.
    """
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ParallelGroupsError(f"grid names must be unique, got {names}")
    for spec in specs:  # check all before creating any group: nothing half-built
        check_grid_fits(spec.dims, topology, spec.rank_offset)
    return {
        spec.name: build_process_groups(
            spec.dims,
            topology,
            backend,
            rank_offset=spec.rank_offset,
            options=spec.options,
        )
        for spec in specs
    }


# Seeding lives in its own module; re-exported here for callers that import it from parallel.
from kubetron_trainer.runtime.seeding import RngSeeds, rng_seeds, setup_megatron_globals  # noqa: E402

__all__ = [
    "GridSpec",
    "GroupOptions",
    "ParallelGroups",
    "ParallelGroupsError",
    "RngSeeds",
    "build_process_groups",
    "build_process_groups_multi",
    "init_distributed",
    "rng_seeds",
    "setup_megatron_globals",
]
