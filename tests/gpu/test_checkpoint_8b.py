"""Checkpoints at 8B on 2 GPUs, and asynchronous saves in the trainer (skipped without 2 GPUs).

The runs are devtools/training's (once per process, the `piece` fixture): `ckpt8b`
(checkpoint_8b.py: Qwen3-8B, DP2, distributed optimizer: a synchronous save, the state wiped and
loaded back, an asynchronous save while two steps train, loaded back) and `async_ckpt`
(async_save.py: the trainer with `checkpoint.asyncSave`, resumed). No speed is asserted here:
`python -m benchmarks.checkpoint_8b` times the same runs (benchmarks/results/checkpoint_8b.json).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from devtools.training.async_save import ASYNC_EVERY, ASYNC_STEPS, ASYNC_TO
from devtools.training.gpu import WORLD

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        torch.cuda.device_count() < WORLD,
        reason=f"needs {WORLD} CUDA GPUs, found {torch.cuda.device_count()}",
    ),
]


Piece = Callable[[str], Any]


def _phases(report: dict[str, Any], name: str) -> list[dict[str, Any]]:
    found = [r["phases"].get(name) for r in report["ranks"]]
    assert all(found), f"{name} missing on some rank: {report.get('error')}"
    return found


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_8b_checkpoint_loads_back_every_tensor(kind: str, piece: Piece) -> None:
    """Every model weight, fp32 main weight and Adam moment of each rank was zeroed, then the
    load restored it: each tensor's float64 sum equals the one taken before the save."""
    loads = _phases(piece("ckpt8b"), f"{kind}_load")
    for load in loads:
        assert load["tensors_compared"] > 0
        assert load["tensors_differing"] == 0


def test_8b_save_writes_latest_only_when_complete(piece: Piece) -> None:
    report = piece("ckpt8b")
    for sync in _phases(report, "sync_save"):
        assert sync["latest"] == 1
    for asy in _phases(report, "async_save"):
        assert asy["latest"] == 2  # set by the finalization, after every rank's files
        assert asy["rank_bytes"] > 0


def test_8b_save_needs_no_gathered_optimizer_state_in_host_memory(piece: Piece) -> None:
    """Megatron's fully_reshardable state gathers 12 bytes a parameter of the model on every
    rank (DP2: each rank holds the whole model); the synchronous save and its load stay far
    under that (a quarter, the CUDA context and the largest tensor in flight included). The
    asynchronous save copies the rank's share to pinned host memory, which PyTorch's host
    allocator keeps for the next save: the phases after it are not compared."""
    report = piece("ckpt8b")
    params = report["ranks"][0]["params"]
    gathered_gib = 12 * params / 2**30
    for name in ("sync_save", "sync_load"):
        for phase in _phases(report, name):
            assert phase["peak_rss_gib"] < gathered_gib / 4, (name, phase)


def test_async_save_trains_on_and_resumes_like_uninterrupted(piece: Piece) -> None:
    result = piece("async_ckpt")
    every, first = ASYNC_EVERY, ASYNC_STEPS
    background = list(range(every, first, every))  # the last step's save is synchronous
    assert result["background_saves"] == background
    assert [f["step"] for f in result["finalized_background"]] == background
    assert [s["step"] for s in result["synchronous_saves"]] == [first]
    assert result["latest_after_first_run"] == str(first)
    # read after the resumed run, which saved its last step too
    assert result["steps_with_kubetron_json"] == [*background, first, ASYNC_TO]
    assert result["resumed_from"] == first
    # bf16, the same shape and order of reductions: the resumed steps are the uninterrupted ones
    assert result["max_abs_loss_diff_resumed_vs_uninterrupted"] < 1e-3
