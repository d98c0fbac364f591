"""recipe.recomputeLayers on one CUDA GPU: Megatron's full recompute (block method) trains the
same losses as keeping every activation, with less peak memory. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from devtools.training.launch import run
from tests.gpu.test_train_gpu import STEPS, qwen3_small_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _train(tmp_path: Path, layers: int) -> dict[str, Any]:
    cfg = qwen3_small_config()
    cfg["recipe"]["seqLength"] = 2048  # activations, not weights, dominate the peak
    cfg["recipe"]["recomputeLayers"] = layers
    started = run(cfg, tmp_path / f"recompute-{layers}", "--device", "cuda")
    return started.result()


def test_recomputing_every_layer_trains_the_same_losses_in_less_memory(tmp_path: Path) -> None:
    kept = _train(tmp_path, 0)
    recomputed = _train(tmp_path, 4)  # all 4 layers of the one stage
    losses = [[s["loss"] for s in r["steps"]] for r in (kept, recomputed)]
    assert len(losses[1]) == STEPS
    # the same kernels run again in the backward pass: equal up to their nondeterminism
    assert losses[1] == pytest.approx(losses[0], rel=2e-3), losses
    assert recomputed["peak_memory_gib"] < kept["peak_memory_gib"], (kept, recomputed)
