"""kubetron's fp8 GEMMs (`models/fp8.py`) on one Hopper GPU, against bf16.

Skipped without CUDA or below compute capability 9.0 (never faked). Tolerances: e4m3 keeps 3
mantissa bits, so each quantised element is off by up to 1/16 of itself (about 2.5% RMS); a
GEMM output, which sums K such products, comes out about 3-4% off in relative norm. The linear
layer's output and both gradients are required within 6e-2 relative norm of bf16's. Training:
a 4-layer qwen3-0.6b-shaped model (the GPU tests' `qwen3_small_config`) in fp8 starts from the
same loss as bf16 (2%) and learns the same way (the last steps' losses within 5%); a bf16
checkpoint resumes in fp8 and the fp8 one back in bf16, the checkpoint format being the same.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from devtools.training.launch import run
from tests.gpu.test_train_gpu import STEPS, qwen3_small_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
        reason="fp8 GEMMs need compute capability 9.0 (Hopper)",
    ),
]
GEMM_TOL = 6e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def linear_grads(
    fp8: bool, x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, fused: bool = False
) -> tuple[torch.Tensor, ...]:
    """Output, input gradient and weight gradient (from `main_grad` when `fused`)."""
    from kubetron_trainer.models.fp8 import Fp8Linear

    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    if fused:
        wi.main_grad = torch.zeros(w.shape, device="cuda", dtype=torch.float32)  # type: ignore[attr-defined]
    if fp8:
        out = Fp8Linear.apply(xi, wi, None, fused, False, False, None)
    else:
        out = torch.matmul(xi, wi.t())
    out.backward(grad)
    wgrad = wi.main_grad if fused else wi.grad  # type: ignore[attr-defined]
    assert xi.grad is not None and wgrad is not None
    return out, xi.grad, wgrad


@pytest.mark.parametrize("fused", [False, True], ids=["grad", "main-grad"])
def test_fp8_linear_is_close_to_bf16(fused: bool) -> None:
    torch.manual_seed(0)
    s, b, k, n = 512, 2, 2048, 1536  # [sequence, batch, features] as Megatron's layers see it
    x = torch.randn(s, b, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
    w[:4] *= 50  # a few outlier rows: row-wise scales keep the others precise
    grad = torch.randn(s, b, n, device="cuda", dtype=torch.bfloat16)
    ref = linear_grads(False, x, w, grad)
    ours = linear_grads(True, x, w, grad, fused)
    for name, a, r in zip(("output", "input grad", "weight grad"), ours, ref, strict=True):
        assert a.shape == r.shape, name
        assert rel_err(a, r) < GEMM_TOL, (name, rel_err(a, r))
        assert rel_err(a, r) > 1e-4, name  # it really ran in fp8


def fp8_config(precision: str, checkpoint: Path | None = None, steps: int = STEPS) -> dict:
    cfg: dict[str, Any] = qwen3_small_config(checkpoint)
    cfg["recipe"] |= {"precision": precision, "fastPath": "on", "trainIters": steps}
    return cfg


@functools.cache
def training(precision: str) -> tuple[list[float], Path, str]:
    """One run per precision and pytest process (the bf16 one saves every 4 steps)."""
    tmp = Path(tempfile.mkdtemp(prefix="kubetron-fp8-"))
    ckpt = tmp / "ckpt"
    started = run(fp8_config(precision, ckpt), tmp / precision, "--device", "cuda")
    result = started.result()
    return [s["loss"] for s in result["steps"]], ckpt, result["attention"]


def test_training_in_fp8_follows_bf16() -> None:
    bf16, _, bf16_engine = training("bf16")
    fp8, _, fp8_engine = training("fp8")
    assert "fp8" in fp8_engine and "fp8" not in bf16_engine, (fp8_engine, bf16_engine)
    assert fp8[0] == pytest.approx(bf16[0], rel=2e-2)
    assert sum(fp8[-3:]) / 3 == pytest.approx(sum(bf16[-3:]) / 3, rel=5e-2), (fp8, bf16)
    assert sum(fp8[-3:]) / 3 < fp8[0] - 0.05, fp8  # it learns


def test_a_bf16_checkpoint_resumes_in_fp8_and_back(tmp_path: Path) -> None:
    bf16, bf16_ckpt, _ = training("bf16")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(bf16_ckpt, ckpt)
    shutil.rmtree(ckpt / f"iter_{STEPS:07d}")
    (ckpt / "latest").write_text("4\n")
    in_fp8 = run(fp8_config("fp8", ckpt), tmp_path / "fp8", "--device", "cuda").result()
    assert in_fp8["resumed_from"] == 4
    fp8_losses = [s["loss"] for s in in_fp8["steps"]]
    assert fp8_losses == pytest.approx(bf16[4:], rel=5e-2)
    back = run(fp8_config("bf16", ckpt, STEPS + 2), tmp_path / "back", "--device", "cuda")
    assert back.result()["resumed_from"] == STEPS
    after = [s["loss"] for s in back.result()["steps"]]
    assert len(after) == 2 and after[0] == pytest.approx(fp8_losses[-1], rel=1e-1), after
