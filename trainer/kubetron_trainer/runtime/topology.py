"""Where this trainer process sits in the job: the one place that reads the rank environment.

With `nprocPerNode > 1` the Kubeflow training-operator sets `RANK` to the pod index and
`WORLD_SIZE` to the total process count; only `torchrun`'s per-process `RANK`, `LOCAL_RANK`,
`WORLD_SIZE`, `LOCAL_WORLD_SIZE` and `GROUP_RANK` describe a trainer process. Reading them in one
function lets us check them against each other and refuse a launch that would train with wrong
ranks (a process started without `torchrun` inside such a pod) instead of hanging or silently
mixing up data shards.

A process started with none of these variables (a plain `python -m kubetron_trainer` on a laptop)
is a world of one: rank 0 on node 0, its store on any free port of 127.0.0.1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# Variables torchrun sets for every worker process; only these describe the process itself.
TORCHRUN_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
DEFAULT_MASTER_ADDR = "127.0.0.1"
# A world of one has no peer to meet: its store takes any free port, so that two such processes
# on one machine (two exports, an export beside a trainer) never contend for one.
SINGLE_PROCESS_PORT = 0
LAUNCH_HINT = (
    "start the trainer with torchrun, e.g. `torchrun --nproc-per-node=$PET_NPROC_PER_NODE "
    "--nnodes=$PET_NNODES --node-rank=$PET_NODE_RANK --master-addr=$PET_MASTER_ADDR "
    "--master-port=$PET_MASTER_PORT -m kubetron_trainer --config ...`"
)


class TopologyError(ValueError):
    """The rank environment is missing a variable or contradicts itself; `problems` lists all."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid rank environment:\n{lines}")


@dataclass(frozen=True)
class Topology:
    """This process's place in the job, as torchrun describes it.

    Ranks are laid out node by node: `rank == node_rank * local_world_size + local_rank`, so the
    node of any global rank `r` is `r // local_world_size` (see `node_of`).
    """

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    @classmethod
    def single_process(cls) -> Topology:
        """A world of one, for a process started without any launcher."""
        return cls(0, 0, 1, 1, 0, 1, DEFAULT_MASTER_ADDR, SINGLE_PROCESS_PORT)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Topology:
        """Read and check torchrun's variables; raise `TopologyError` naming every bad one."""
        _reject_operator_ranks(env)
        if not any(name in env for name in (*TORCHRUN_VARS, "GROUP_RANK")):
            return cls.single_process()
        problems: list[str] = []
        value = {name: _read_int(env, name, problems) for name in TORCHRUN_VARS[:4]}
        port = _read_int(env, "MASTER_PORT", problems)
        master_addr = env.get("MASTER_ADDR", "").strip()
        if not master_addr:
            problems.append(_missing("MASTER_ADDR"))
        local_world = max(value["LOCAL_WORLD_SIZE"], 1)
        # GROUP_RANK / GROUP_WORLD_SIZE are torchrun's too, but other launchers omit them.
        node_rank = _read_int(env, "GROUP_RANK", problems, default=value["RANK"] // local_world)
        num_nodes = _read_int(
            env, "GROUP_WORLD_SIZE", problems, default=value["WORLD_SIZE"] // local_world
        )
        if problems:
            raise TopologyError(problems)
        topo = cls(
            rank=value["RANK"],
            local_rank=value["LOCAL_RANK"],
            world_size=value["WORLD_SIZE"],
            local_world_size=value["LOCAL_WORLD_SIZE"],
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=master_addr,
            master_port=port,
        )
        topo.check()
        return topo

    def check(self) -> None:
        """Raise `TopologyError` listing every range or consistency rule this topology breaks."""
        problems = _range_problems(self)
        if not problems:
            problems = _layout_problems(self)
        if problems:
            raise TopologyError(problems)

    def node_of(self, rank: int) -> int:
        """The node (pod) that holds global rank `rank`."""
        return rank // self.local_world_size

    @property
    def init_method(self) -> str:
        """The `init_method` for `torch.distributed.init_process_group`."""
        return f"tcp://{self.master_addr}:{self.master_port}"

    def describe(self) -> str:
        return (
            f"rank={self.rank}/{self.world_size} local_rank={self.local_rank}/"
            f"{self.local_world_size} node={self.node_rank}/{self.num_nodes} "
            f"master={self.master_addr}:{self.master_port}"
        )


_MEANING = {
    "RANK": "this process's global rank",
    "LOCAL_RANK": "this process's rank inside its pod",
    "WORLD_SIZE": "the number of trainer processes in the job",
    "LOCAL_WORLD_SIZE": "the number of trainer processes per pod",
    "GROUP_RANK": "the index of this pod",
    "GROUP_WORLD_SIZE": "the number of pods",
    "MASTER_ADDR": "the host of rank 0, where processes meet",
    "MASTER_PORT": "the rendezvous port on MASTER_ADDR",
}


def _missing(name: str) -> str:
    return f"{name} is not set ({_MEANING[name]}); torchrun sets it for every process it starts"


def _read_int(
    env: Mapping[str, str], name: str, problems: list[str], default: int | None = None
) -> int:
    """The integer in `env[name]` (or `default`); problems are recorded, -1 stands in."""
    raw = env.get(name)
    if raw is None:
        if default is None:
            problems.append(_missing(name))
            return -1
        return default
    try:
        return int(raw.strip())
    except ValueError:
        problems.append(f"{name}={raw!r} is not an integer ({_MEANING[name]})")
        return -1


def _reject_operator_ranks(env: Mapping[str, str]) -> None:
    """Refuse a process that sees the training-operator's pod-level RANK instead of torchrun's."""
    if "LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env:
        return
    nproc = env.get("PET_NPROC_PER_NODE")
    if nproc is None or nproc.strip() == "1":
        return
    raise TopologyError(
        [
            f"LOCAL_RANK is not set but PET_NPROC_PER_NODE={nproc}: this process was started "
            f"without torchrun in a PyTorchJob with nprocPerNode={nproc}, where "
            f"RANK={env.get('RANK', '<unset>')} is the pod index and "
            f"WORLD_SIZE={env.get('WORLD_SIZE', '<unset>')} the total process count, so it "
            f"would train with wrong ranks; {LAUNCH_HINT}"
        ]
    )


def _range_problems(t: Topology) -> list[str]:
    problems = []
    if t.world_size < 1:
        problems.append(f"WORLD_SIZE={t.world_size} must be >= 1")
    if t.local_world_size < 1:
        problems.append(f"LOCAL_WORLD_SIZE={t.local_world_size} must be >= 1")
    if t.num_nodes < 1:
        problems.append(f"GROUP_WORLD_SIZE={t.num_nodes} (number of pods) must be >= 1")
    if not 0 <= t.rank < max(t.world_size, 1):
        problems.append(f"RANK={t.rank} must be in [0, WORLD_SIZE={t.world_size})")
    if not 0 <= t.local_rank < max(t.local_world_size, 1):
        problems.append(
            f"LOCAL_RANK={t.local_rank} must be in [0, LOCAL_WORLD_SIZE={t.local_world_size})"
        )
    if not 0 <= t.node_rank < max(t.num_nodes, 1):
        problems.append(f"GROUP_RANK={t.node_rank} must be in [0, number of pods={t.num_nodes})")
    if not 1 <= t.master_port <= 65535:
        problems.append(f"MASTER_PORT={t.master_port} must be in [1, 65535]")
    return problems


def _layout_problems(t: Topology) -> list[str]:
    """Rules that tie the ranks together: equal pods, ranks laid out pod by pod."""
    problems = []
    if t.world_size % t.local_world_size:
        problems.append(
            f"WORLD_SIZE={t.world_size} is not a multiple of LOCAL_WORLD_SIZE="
            f"{t.local_world_size}; every pod must run the same number of processes"
        )
    elif t.num_nodes * t.local_world_size != t.world_size:
        problems.append(
            f"GROUP_WORLD_SIZE={t.num_nodes} pods x LOCAL_WORLD_SIZE={t.local_world_size} "
            f"!= WORLD_SIZE={t.world_size}"
        )
    expected = t.node_rank * t.local_world_size + t.local_rank
    if t.rank != expected:
        problems.append(
            f"RANK={t.rank} != GROUP_RANK={t.node_rank} * LOCAL_WORLD_SIZE="
            f"{t.local_world_size} + LOCAL_RANK={t.local_rank} = {expected}; ranks must be laid "
            "out pod by pod, as torchrun does"
        )
    return problems
