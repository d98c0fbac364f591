"""Rank arithmetic of kubetron's grids against Megatron's own RankGenerator, no processes needed.

`rank_lists` must produce, for every ProcessGroupCollection field, the groups that
`parallel_state.initialize_model_parallel(order="tp-cp-ep-dp-pp")` would create, for worlds up
to 4096 ranks and for grids over a slice of the world.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from megatron.core.parallel_state import (
    RankGenerator,
    _inject_gtp_remat_axis,
    default_embedding_ranks,
    default_position_embedding_ranks,
)

from kubetron_api.dims import ParallelConfigError, ParallelDims
from kubetron_trainer.runtime.parallel import (
    ParallelGroupsError,
    check_grid_fits,
    make_grids,
    rank_lists,
    rng_seeds,
)
from kubetron_trainer.runtime.topology import Topology

ORDER = "tp-cp-ep-dp-pp"


def megatron_rank_lists(dims: ParallelDims, offset: int) -> dict[str, list[list[int]]]:
    """The groups initialize_model_parallel creates, from its own RankGenerator calls."""
    dense = RankGenerator(
        tp=dims.tp,
        ep=1,
        dp=dims.dp,
        pp=dims.pp,
        cp=dims.cp,
        order=_inject_gtp_remat_axis(ORDER, after="tp"),
        rank_offset=offset,
    )
    expert = RankGenerator(
        tp=dims.etp,
        ep=dims.ep,
        dp=dims.edp,
        pp=dims.pp,
        cp=1,
        order=_inject_gtp_remat_axis(ORDER, after="ep"),
        rank_offset=offset,
    )
    pp = dense.get_ranks("pp")
    model_groups = expert.get_ranks("tp-ep-pp")
    return {
        "tp": dense.get_ranks("tp"),
        "cp": dense.get_ranks("cp"),
        "dp": dense.get_ranks("dp"),
        "pp": pp,
        "mp": dense.get_ranks("tp-gtp_remat-pp"),
        "tp_cp": dense.get_ranks("tp-cp"),
        "dp_cp": dense.get_ranks("dp-cp"),
        "tp_dp_cp": dense.get_ranks("tp-gtp_remat-dp-cp"),
        "ep": expert.get_ranks("ep"),
        "expt_tp": expert.get_ranks("tp"),
        "expt_dp": expert.get_ranks("dp"),
        "tp_ep": expert.get_ranks("tp-ep"),
        "tp_ep_pp": model_groups,
        "embd": [default_embedding_ranks(r) for r in pp],
        "pos_embd": [default_position_embedding_ranks(r) for r in pp],
        # one optimizer instance: all expert model-parallel groups together
        "intra_dist_opt": [sorted(r for g in model_groups for r in g)],
    }


def ours(
    dims: ParallelDims, offset: int, world: int, monkeypatch: pytest.MonkeyPatch
) -> dict[str, list[list[int]]]:
    monkeypatch.setenv("WORLD_SIZE", str(world))  # how HyperCommGrid learns the job size
    return rank_lists(*make_grids(dims, offset))


def dims_for(world: int, draw: st.DrawFn) -> ParallelDims:
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    while True:
        degrees = {k: draw(st.sampled_from(divisors)) for k in ("tp", "pp", "cp", "ep", "etp")}
        try:
            return ParallelDims.from_degrees(world, **degrees)
        except ParallelConfigError:
            continue


@st.composite
def shapes(draw: st.DrawFn) -> ParallelDims:
    world = draw(st.sampled_from([1, 2, 4, 6, 8, 12, 16, 24, 32, 64, 96, 128, 256, 1024, 4096]))
    return dims_for(world, draw)


@settings(max_examples=150, deadline=None)
@given(dims=shapes())
def test_every_group_equals_megatrons(dims: ParallelDims) -> None:
    with pytest.MonkeyPatch.context() as mp:
        assert ours(dims, 0, dims.world_size, mp) == megatron_rank_lists(dims, 0)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_shape_of_small_worlds(world: int, monkeypatch: pytest.MonkeyPatch) -> None:
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    checked = 0
    for tp in divisors:
        for pp in divisors:
            for cp in divisors:
                for ep in divisors:
                    for etp in divisors:
                        try:
                            dims = ParallelDims.from_degrees(
                                world, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp
                            )
                        except ParallelConfigError:
                            continue
                        assert ours(dims, 0, world, monkeypatch) == megatron_rank_lists(dims, 0)
                        checked += 1
    assert checked == {1: 1, 2: 10, 4: 46, 8: 146}[world]


@pytest.mark.parametrize(
    "degrees",
    [
        {"tp": 8, "pp": 8, "cp": 2, "ep": 8, "etp": 1},
        {"tp": 4, "pp": 16, "cp": 4, "ep": 64, "etp": 1},
        {"tp": 2, "pp": 4, "cp": 1, "ep": 32, "etp": 2},
    ],
)
def test_4096_ranks(degrees: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    dims = ParallelDims.from_degrees(4096, **degrees)
    assert ours(dims, 0, 4096, monkeypatch) == megatron_rank_lists(dims, 0)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_grid_over_a_slice_equals_megatrons_rank_offset(data: st.DataObject) -> None:
    world = data.draw(st.sampled_from([2, 4, 8, 16]))
    dims = dims_for(world, data.draw)
    offset = data.draw(st.integers(0, 3)) * world
    with pytest.MonkeyPatch.context() as mp:
        lists = ours(dims, offset, offset + world, mp)
    assert lists == megatron_rank_lists(dims, offset)
    assert {r for g in lists["tp"] for r in g} == set(range(offset, offset + world))


def topology(world: int, per_pod: int) -> Topology:
    return Topology(0, 0, world, per_pod, 0, world // per_pod, "localhost", 29500)


def test_tp_inside_a_pod_is_accepted() -> None:
    check_grid_fits(ParallelDims.from_degrees(16, tp=8, pp=2), topology(16, 8))
    check_grid_fits(ParallelDims.from_degrees(4, tp=2), topology(8, 4), rank_offset=2)


def test_tp_spanning_pods_is_refused() -> None:
    with pytest.raises(ParallelGroupsError) as err:
        check_grid_fits(ParallelDims.from_degrees(16, tp=8, pp=2), topology(16, 4))
    assert str(err.value) == (
        "tensor=8 puts ranks 0..7 of one TP group on pods 0 and 1 (LOCAL_WORLD_SIZE=4 processes "
        "per pod, rank_offset=0); TP needs the GPUs of one node: make tensor divide 4 and "
        "rank_offset a multiple of it"
    )


def test_tp_spanning_pods_through_the_offset_is_refused() -> None:
    with pytest.raises(ParallelGroupsError, match=r"tensor=2 puts ranks 3\.\.4 of one TP group"):
        check_grid_fits(ParallelDims.from_degrees(4, tp=2), topology(8, 4), rank_offset=3)


def test_expert_tp_spanning_pods_is_refused() -> None:
    dims = ParallelDims.from_degrees(16, tp=2, ep=1, etp=8)
    with pytest.raises(ParallelGroupsError, match=r"expertTensor=8 puts ranks 0\.\.7"):
        check_grid_fits(dims, topology(16, 4))


def test_grid_larger_than_the_world_is_refused() -> None:
    with pytest.raises(ParallelGroupsError) as err:
        check_grid_fits(ParallelDims.from_degrees(8, tp=2), topology(8, 8), rank_offset=4)
    assert str(err.value) == (
        "grid of 8 ranks at rank_offset=4 needs ranks [4, 12) but the job has WORLD_SIZE=8; "
        "shrink the grid or the offset"
    )


def test_world_not_divisible_by_the_model_degrees() -> None:
    with pytest.raises(ParallelConfigError, match="world size=6 is not divisible by"):
        ParallelDims.from_degrees(6, tp=4)


def test_seeds_follow_megatrons_arithmetic() -> None:
    # _set_random_seed: seed + 100 * pp_rank (+ 10 * dp_rank); model_parallel_cuda_manual_seed:
    # tensor-parallel = seed + 2718 + tp_rank, expert = seed + 1024 + 100 * ep_rank + etp_rank.
    seeds = rng_seeds(1234, pp_rank=3, tp_rank=1, ep_rank=2, etp_rank=1, dp_rank=5)
    assert (seeds.base, seeds.tensor_model_parallel, seeds.expert_parallel) == (1534, 4253, 2759)
    seeds = rng_seeds(
        1234, pp_rank=3, tp_rank=1, ep_rank=2, etp_rank=1, dp_rank=5, data_parallel_random_init=True
    )
    assert seeds.base == 1584


def test_seed_must_be_positive() -> None:
    with pytest.raises(ParallelGroupsError, match="seed=0 must be > 0"):
        rng_seeds(0, pp_rank=0, tp_rank=0, ep_rank=0, etp_rank=0)
