"""On a GPU: Megatron's CUDA RNG tracker holds the same states after `setup_megatron_globals`
with decentralized groups as after Megatron training's `_set_random_seed` with global groups.

Four processes share one GPU and talk over gloo, so one GPU is enough; the worker is the one
tests/distributed uses (devtools/training/pg_oracle.py; its `rng` mode adds the CUDA and tracker
states when CUDA exists).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devtools.training import PG_ORACLE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

WORKER = PG_ORACLE


def test_cuda_rng_tracker_states_equal_the_global_path(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    cmd += [str(WORKER), "rng", str(tmp_path)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    trackers = set()
    for rank in range(4):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case in seen["rng"]:
            label = f"rank {rank} {case['shape']} dp_init={case['dp_init']}"
            assert case["ours"] == case["megatron"], label
            assert {"cuda", "tracker:model-parallel-rng"} <= case["ours"].keys(), label
            trackers.add(case["ours"]["tracker:model-parallel-rng"])
    assert len(trackers) > 1  # tensor-parallel ranks really got different states
