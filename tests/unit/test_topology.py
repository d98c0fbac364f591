"""Topology.from_env: torchrun's variables are read, checked, and every bad one is named."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubetron_trainer.runtime.topology import _MEANING, Topology, TopologyError


def torchrun_env(rank: int, local_world: int, world: int, **extra: str) -> dict[str, str]:
    """The variables torchrun sets for global rank `rank` (ranks laid out pod by pod)."""
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % local_world),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(local_world),
        "GROUP_RANK": str(rank // local_world),
        "GROUP_WORLD_SIZE": str(world // local_world),
        "MASTER_ADDR": "job-worker-0",
        "MASTER_PORT": "23456",
        "TORCHELASTIC_RUN_ID": "job",
    }
    env.update(extra)
    return env


def test_reads_torchrun_variables() -> None:
    topo = Topology.from_env(torchrun_env(rank=13, local_world=8, world=32))
    assert topo == Topology(
        rank=13,
        local_rank=5,
        world_size=32,
        local_world_size=8,
        node_rank=1,
        num_nodes=4,
        master_addr="job-worker-0",
        master_port=23456,
    )
    assert topo.init_method == "tcp://job-worker-0:23456"
    assert [topo.node_of(r) for r in (0, 7, 8, 31)] == [0, 0, 1, 3]


@given(
    nodes=st.integers(1, 64),
    local_world=st.sampled_from([1, 2, 4, 8]),
    data=st.data(),
)
def test_every_torchrun_rank_is_accepted(nodes: int, local_world: int, data: st.DataObject) -> None:
    world = nodes * local_world
    rank = data.draw(st.integers(0, world - 1))
    topo = Topology.from_env(torchrun_env(rank, local_world, world))
    assert (topo.node_rank, topo.local_rank) == divmod(rank, local_world)
    assert topo.num_nodes == nodes


def test_group_variables_are_derived_when_a_launcher_omits_them() -> None:
    env = torchrun_env(rank=5, local_world=4, world=8)
    del env["GROUP_RANK"], env["GROUP_WORLD_SIZE"]
    topo = Topology.from_env(env)
    assert (topo.node_rank, topo.num_nodes) == (1, 2)


def test_worlds_of_one_side_by_side_take_their_own_ports() -> None:
    """Two single processes on one machine (two exports, say) each bind a free port."""
    import subprocess
    import sys

    code = (
        "import time, torch.distributed as d; "
        "from kubetron_trainer.runtime.topology import Topology; "
        "d.init_process_group('gloo', init_method=Topology.single_process().init_method, "
        "rank=0, world_size=1); time.sleep(3); d.barrier(); print('ok')"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["ok\n", "ok\n"]


def test_no_variables_is_a_world_of_one() -> None:
    assert Topology.from_env({}) == Topology.single_process()
    assert Topology.from_env({"PATH": "/usr/bin"}).world_size == 1


@pytest.mark.parametrize("missing", ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"])
def test_missing_variable_is_named(missing: str) -> None:
    env = torchrun_env(rank=1, local_world=2, world=4)
    del env[missing]
    with pytest.raises(TopologyError) as err:
        Topology.from_env(env)
    assert err.value.problems == [
        f"{missing} is not set ({_MEANING[missing]}); torchrun sets it for every process it starts"
    ]


def test_missing_master_is_named_with_every_other_problem() -> None:
    env = torchrun_env(rank=1, local_world=2, world=4, MASTER_PORT="http")
    del env["MASTER_ADDR"]
    with pytest.raises(TopologyError) as err:
        Topology.from_env(env)
    message = str(err.value)
    assert "MASTER_PORT='http' is not an integer" in message
    assert "MASTER_ADDR is not set" in message
    assert len(err.value.problems) == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"RANK": "4"}, "RANK=4 must be in [0, WORLD_SIZE=4)"),
        ({"RANK": "-1"}, "RANK=-1 must be in [0, WORLD_SIZE=4)"),
        ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 must be in [0, LOCAL_WORLD_SIZE=2)"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 must be in [1, 65535]"),
        ({"GROUP_RANK": "2"}, "GROUP_RANK=2 must be in [0, number of pods=2)"),
        ({"RANK": "1", "WORLD_SIZE": "5", "GROUP_WORLD_SIZE": "3"}, "is not a multiple of"),
        ({"GROUP_WORLD_SIZE": "3"}, "GROUP_WORLD_SIZE=3 pods x LOCAL_WORLD_SIZE=2 != WORLD_SIZE=4"),
        ({"RANK": "2"}, "RANK=2 != GROUP_RANK=0 * LOCAL_WORLD_SIZE=2 + LOCAL_RANK=1 = 1"),
        ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
    ],
)
def test_inconsistent_variables_are_named(override: dict[str, str], expected: str) -> None:
    env = torchrun_env(rank=1, local_world=2, world=4) | override
    with pytest.raises(TopologyError) as err:
        Topology.from_env(env)
    assert expected in str(err.value)


def test_world_not_divisible_by_pod_size() -> None:
    env = torchrun_env(rank=1, local_world=2, world=4) | {"WORLD_SIZE": "5"}
    del env["GROUP_WORLD_SIZE"]
    with pytest.raises(TopologyError) as err:
        Topology.from_env(env)
    assert err.value.problems == [
        "WORLD_SIZE=5 is not a multiple of LOCAL_WORLD_SIZE=2; every pod must run the same "
        "number of processes"
    ]


def pytorchjob_env_without_torchrun(pod: int, nproc: int, pods: int) -> dict[str, str]:
    """What the training-operator gives a pod's main process; torchrun would turn it into ranks."""
    return {
        "RANK": str(pod),
        "WORLD_SIZE": str(pods * nproc),
        "MASTER_ADDR": "job-worker-0",
        "MASTER_PORT": "23456",
        "PET_NPROC_PER_NODE": str(nproc),
        "PET_NNODES": str(pods),
        "PET_NODE_RANK": str(pod),
        "PET_MASTER_ADDR": "job-worker-0",
        "PET_MASTER_PORT": "23456",
    }


def test_pytorchjob_without_torchrun_is_refused_with_the_fix() -> None:
    with pytest.raises(TopologyError) as err:
        Topology.from_env(pytorchjob_env_without_torchrun(pod=1, nproc=8, pods=2))
    message = str(err.value)
    assert "LOCAL_RANK is not set but PET_NPROC_PER_NODE=8" in message
    assert "RANK=1 is the pod index and WORLD_SIZE=16 the total process count" in message
    assert "torchrun --nproc-per-node=$PET_NPROC_PER_NODE" in message
    assert "-m kubetron_trainer" in message


def test_pytorchjob_with_one_process_per_pod_still_needs_local_rank() -> None:
    with pytest.raises(TopologyError) as err:
        Topology.from_env(pytorchjob_env_without_torchrun(pod=1, nproc=1, pods=2))
    assert [p.split(" ")[0] for p in err.value.problems] == ["LOCAL_RANK", "LOCAL_WORLD_SIZE"]


def test_torchrun_inside_a_pytorchjob_is_accepted() -> None:
    env = pytorchjob_env_without_torchrun(pod=1, nproc=4, pods=2)
    env |= torchrun_env(rank=6, local_world=4, world=8)
    topo = Topology.from_env(env)
    assert (topo.rank, topo.node_rank, topo.local_rank) == (6, 1, 2)


def test_check_rejects_a_hand_built_topology() -> None:
    with pytest.raises(TopologyError, match="RANK=3 != GROUP_RANK=0"):
        Topology(3, 0, 4, 2, 0, 2, "localhost", 1).check()
