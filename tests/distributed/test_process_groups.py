"""Decentralized groups against Megatron's global parallel_state, in real gloo worlds on CPU.

Each world size is one `torchrun --standalone` run of devtools/training/pg_oracle.py (so
`Topology.from_env` reads real torchrun variables); the workers build groups both ways and write
what every rank saw, and these tests compare. Every shape is checked for worlds 1, 2 and 4;
world 8 checks every 6th of its 146 shapes (tests/unit/test_rank_math.py covers all of them, and
4096-rank worlds, as rank arithmetic).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devtools.training import PG_ORACLE

pytestmark = pytest.mark.distributed

WORKER = PG_ORACLE
# Megatron builds singleton GTP groups even with GTP off; we leave them None, which Megatron
# reads as "GTP off" (ProcessGroupCollection.is_gtp_remat_active, get_pg_rank).
GTP_FIELDS = ("gtp_remat", "expt_gtp_remat")
RUNS = {1: ("oracle", 1), 2: ("oracle", 1), 4: ("oracle,rng", 1), 8: ("oracle,multi", 6)}


def run_world(world: int, out: Path) -> list[dict[str, Any]]:
    modes, stride = RUNS[world]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--log-dir={out / 'logs'}", "--redirects=3"]  # one log file per rank
    cmd += [f"--nproc-per-node={world}", str(WORKER), modes, str(out), str(stride)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        logs = sorted((out / "logs").rglob("stderr.log"))
        tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs)
        pytest.fail(f"workers failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{tails}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


_CACHE: dict[int, list[dict[str, Any]]] = {}


def results(size: int, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One torchrun run per world size, shared by the tests that read it."""
    if size not in _CACHE:
        _CACHE[size] = run_world(size, tmp_path_factory.mktemp(f"world{size}"))
    return _CACHE[size]


@pytest.fixture(params=sorted(RUNS))
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return request.param, results(request.param, tmp_path_factory)


def test_every_group_equals_parallel_state(world: tuple[int, list[dict[str, Any]]]) -> None:
    size, ranks = world
    for seen in ranks:
        rank = seen["topology"]["rank"]
        assert seen["topology"]["world_size"] == size
        for case in seen["oracle"]:
            ours, theirs = case["ours"], case["megatron"]
            label = f"rank {rank} {case['shape']} {case['instances']} {case['variant']}"
            assert ours["_set"] == sorted(f for f in theirs if not f.startswith("_")), label
            assert ours["_alias_ok"], label
            for name, ranks_theirs in theirs.items():
                if name.startswith("_"):
                    continue
                if name in GTP_FIELDS:
                    assert (ours[name], ranks_theirs) == (None, [rank]), f"{label} {name}"
                else:
                    assert ours[name] == ranks_theirs, f"{label} {name}"
                    assert case["members"][name] == (ranks_theirs or []), f"{label} {name}"


def test_every_shape_was_checked(world: tuple[int, list[dict[str, Any]]]) -> None:
    size, ranks = world
    shapes = {json.dumps(case["shape"]) for case in ranks[0]["oracle"]}
    stride = RUNS[size][1]
    assert len(shapes) == len(range(0, {1: 1, 2: 10, 4: 46, 8: 146}[size], stride))
    if size > 1:  # each way of building the groups met the oracle
        assert len({json.dumps(case["variant"]) for case in ranks[0]["oracle"]}) == 3


def test_rng_state_equals_megatron_training(tmp_path_factory: pytest.TempPathFactory) -> None:
    ranks = results(4, tmp_path_factory)
    for seen in ranks:
        for case in seen["rng"]:
            label = f"rank {seen['topology']['rank']} {case['shape']} dp_init={case['dp_init']}"
            assert case["ours"] == case["megatron"], label
            assert case["buffer_set"], label
            assert case["seeds"]["base"] == int(case["ours"]["torch"]), label
    # the seed really differs per pipeline stage, so the comparison is not vacuous
    assert len({case["ours"]["digest"] for seen in ranks for case in seen["rng"][:1]}) == 2


def test_two_grids_in_one_world(tmp_path_factory: pytest.TempPathFactory) -> None:
    ranks = results(8, tmp_path_factory)
    for seen in ranks:
        rank = seen["topology"]["rank"]
        split, shared = seen["multi"]["split"], seen["multi"]["shared"]
        # policy TP2 on ranks 0-3, reference TP1 on ranks 4-7: each rank in exactly one
        assert (split["ours"]["policy"] == {}) == (rank >= 4)
        assert (split["ours"]["reference"] == {}) == (rank < 4)
        for case in (split, shared):
            for name, ours in case["ours"].items():
                theirs = case["megatron"][name]
                expected = {k: (None if k in GTP_FIELDS else v) for k, v in theirs.items()}
                assert public(ours) == public(expected), f"rank {rank} {name}"
        # an all-reduce over each grid's TP group sums exactly that group's ranks
        if rank < 4:
            assert split["tp_sums"] == {"policy": float(sum(split["ours"]["policy"]["tp"]))}
        else:
            assert split["tp_sums"] == {"reference": float(rank)}
        assert shared["ours"]["policy"]["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert shared["ours"]["reference"]["tp"] == list(
            range(rank - rank % 4, rank - rank % 4 + 4)
        )


def public(seen: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in seen.items() if not k.startswith("_")}
