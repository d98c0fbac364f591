"""Supervised fine-tuning on GPUs: the CPU test's recipe (a tiny transformers
Qwen3, conversations packed with a block-diagonal attention mask, loss on the assistant's
tokens) through Megatron's GPU path: DDP, the distributed optimizer, SDPA's masked kernel on
CUDA, and pipeline parallelism, where every stage reads the chat batches for their masks.

Skipped without two CUDA GPUs (never faked).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from devtools.training.launch import run
from tests.distributed.test_sft_cpu import first_step_loss, prepare_sft, sft_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


@pytest.mark.parametrize(
    ("parallelism", "precision", "tol"),
    [({"pipeline": 2}, "fp32", 1e-3), ({"tensor": 2}, "bf16", 3e-2)],
    ids=["PP2-fp32", "TP2-bf16"],
)
def test_chat_finetune_on_gpus(
    tmp_path: Path, parallelism: dict[str, int], precision: str, tol: float
) -> None:
    tok, weights, prefix, original = prepare_sft(tmp_path)
    cfg = sft_config(weights, prefix, tok, parallelism={"tensor": 1, **parallelism})
    cfg["recipe"]["precision"] = precision
    started = run(cfg, tmp_path / "run", "--device", "cuda")
    losses = [s["loss"] for s in started.result()["steps"]]
    assert all(math.isfinite(x) for x in losses), losses
    assert "chat data: 160 conversations" in started.output()
    assert losses[0] == pytest.approx(first_step_loss(original, cfg, prefix, tok), rel=tol)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
