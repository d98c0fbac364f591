"""LoRA on GPUs: the CPU test's tiny Qwen3 and random peft adapters through Megatron's GPU path
(DDP and the distributed optimizer holding the adapters only, frozen base weights).

One GPU: in fp32 the first loss is peft's; in bf16 on the fast path (fused kernels, fp32
weight-gradient accumulation, fused Adam) the adapters train and their checkpoint holds them
alone. Two GPUs: pipeline parallelism (PP2, each stage's layers with their adapters), the
first loss peft's, a resumed run's peft's with the exported adapters.

Skipped without CUDA (the PP2 test without two GPUs), never faked.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from devtools.training.launch import run
from kubetron_api.ckpt_meta import step_dir
from tests.distributed.test_lora_cpu import GBS, lora_config, loss_of, peft_model, weights
from tests.hf_models import export

__all__ = ["weights"]  # the module-scoped fixture of the CPU test
pytestmark = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# fp32 against peft: the local spec's unfused attention (SDPA's fused kernels take no fp32)
FP32 = {"precision": "fp32", "fastPath": "off"}
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def adapter_keys(ckpt: Path, step: int) -> list[str]:
    from megatron.core import dist_checkpointing

    return list(dist_checkpointing.load_tensors_metadata(str(step_dir(ckpt, step))))


@needs_gpu
def test_lora_on_one_gpu(weights: tuple[Path, Path, float], tmp_path: Path) -> None:
    base, adapters, expected = weights
    cfg = lora_config(base, adapters, tmp_path / "fp32", 1, world=1, parallelism={"tensor": 1})
    cfg["recipe"] |= FP32
    first = run(cfg, tmp_path / "fp32-run", "--device", "cuda").result()["steps"][0]["loss"]
    assert first == pytest.approx(expected, rel=1e-4)

    # The tiny random base learns the mock data slowly, and each step's samples differ: the
    # adapters' training shows against the same run with a learning rate too small to move
    # them (same samples a step), the gap growing to about 0.02 by step 20 (fp32 on the CPU).
    steps, ckpt, losses = 20, tmp_path / "bf16", {}
    for lr in (1e-12, 1e-2):
        cfg = lora_config(base, None, ckpt / str(lr), steps, world=1, parallelism={"tensor": 1})
        cfg["recipe"] |= {"precision": "bf16", "fastPath": "on"}
        cfg["recipe"]["optimizer"]["lr"] = lr
        started = run(cfg, tmp_path / f"bf16-run-{lr}", "--device", "cuda")
        losses[lr] = [s["loss"] for s in started.result()["steps"]]
        assert all(math.isfinite(x) for x in losses[lr]), losses
        assert "fast path: " in started.result()["attention"]  # the fused pieces ran
    gaps = [a - b for a, b in zip(losses[1e-12], losses[1e-2], strict=True)]
    assert sum(gaps[-5:]) / 5 > 0.005, (gaps, losses)
    keys = adapter_keys(ckpt / "0.01", steps)
    assert keys and all(".lora_" in k for k in keys), keys


@needs_2_gpus
def test_lora_with_pipeline_parallelism(weights: tuple[Path, Path, float], tmp_path: Path) -> None:
    base, adapters, expected = weights
    ckpt, pp2 = tmp_path / "ckpt", {"tensor": 1, "pipeline": 2}
    cfg = lora_config(base, adapters, ckpt, 2, world=2, parallelism=pp2)
    cfg["recipe"] |= FP32
    losses = [s["loss"] for s in run(cfg, tmp_path / "run", "--device", "cuda").result()["steps"]]
    assert losses[0] == pytest.approx(expected, rel=1e-4)
    done = export(ckpt, tmp_path / "peft", "--peft")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exported = peft_model(base, tmp_path / "peft")
    cfg = lora_config(base, adapters, ckpt, 3, world=2, parallelism=pp2)
    cfg["recipe"] |= FP32
    resumed = run(cfg, tmp_path / "resumed", "--device", "cuda").result()
    assert resumed["resumed_from"] == 2
    assert resumed["steps"][0]["loss"] == pytest.approx(loss_of(exported, 2 * GBS, GBS), rel=1e-4)
