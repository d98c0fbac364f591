"""Hugging Face weights into pipeline and expert-parallel shapes on GPUs.

The CPU tiers cover TP1, TP2 and TP2 x DP2 for Qwen3 and Llama; pipelines (the layer offset of
each stage, the tied output layer on the last stage) and Megatron's MoE need CUDA. Each case
runs `tests.hf_models` on the GPUs (NCCL), the stages passing hidden states by send/recv, and
compares the last stage's gathered logits with transformers' (fp32) on the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.hf_models import run_parity, save_hf_model

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
TOL = 1e-4

# id -> (kind, vocab, tp, pp, ep, GPUs)
CASES = {
    "qwen3-PP2-tied": ("qwen3", 500, 1, 2, 1, 2),
    "llama-PP2-untied": ("llama", 512, 1, 2, 1, 2),
    "qwen3-TP2": ("qwen3", 500, 2, 1, 1, 2),
    "qwen3-moe-TP1": ("qwen3_moe", 512, 1, 1, 1, 1),
    "qwen3-moe-EP2": ("qwen3_moe", 512, 1, 1, 2, 2),
    "qwen3-moe-PP2": ("qwen3_moe", 512, 1, 2, 1, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_shapes_load_hugging_face_weights_with_its_logits(tmp_path: Path, case: str) -> None:
    kind, vocab, tp, pp, ep, gpus = CASES[case]
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA GPUs, found {torch.cuda.device_count()}")
    directory = tmp_path / kind
    save_hf_model(kind, vocab, directory)
    result = run_parity(directory, kind, vocab, tp, gpus, str(pp), str(ep), "cuda")
    assert (result["tp"], result["pp"], result["ep"]) == (tp, pp, ep)
    assert result["max_logit"] > 0.5
    assert result["max_diff"] <= TOL, result
