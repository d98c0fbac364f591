"""Fixtures of the GPU tests: each multi-GPU run done once per pytest process.

Several tests check the numbers of one run (a trainer shape, the resharding waves, the 8B
checkpoint), so `piece(name)` runs it on the first request and hands the same result, or
raises the same error, to every later test. The runs are devtools/training's, the ones the GPU
benchmarks time; they write under the session's temp dir.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _runs() -> dict[str, Callable[[Path], Any]]:
    """Every run by name (imported here: collecting without a GPU imports no trainer code)."""
    from devtools.training.async_save import async_ckpt_runs
    from devtools.training.checkpoint_8b import ckpt8b_run
    from devtools.training.groups import groups_run
    from devtools.training.reshard import reshard_runs
    from devtools.training.sequence_parallel import sequence_parallel_runs, sp_grads_run
    from devtools.training.shapes import CASES, checkpoint_reshard, train_pair

    runs: dict[str, Callable[[Path], Any]] = {
        "groups": groups_run,
        "checkpoint": checkpoint_reshard,
        "sp_grads": sp_grads_run,
        "sp": sequence_parallel_runs,
        "reshard": reshard_runs,
        "ckpt8b": ckpt8b_run,
        "async_ckpt": async_ckpt_runs,
    }
    return runs | {case: functools.partial(train_pair, case) for case in CASES}


@pytest.fixture(scope="session")
def piece(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """piece(name) -> that run's result, run once per process (see the module docstring)."""
    workdir = tmp_path_factory.mktemp("gpu-runs")
    results: dict[str, Any] = {}

    def run(name: str) -> Any:
        if name not in results:
            try:
                results[name] = _runs()[name](workdir)
            except Exception as err:
                results[name] = err
        if isinstance(results[name], Exception):
            raise results[name]
        return results[name]

    return run
