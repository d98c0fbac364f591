"""The fast path's Triton kernels (`kubetron_trainer.models.kernels`) on the CPU, run by
Triton's interpreter: the same kernel source the GPU compiles, checked against fp64 references.

Triton decides at import whether its `@jit` functions (its own library's too) are interpreted,
so these cases run in a process started with `TRITON_INTERPRET=1`: test_kernels.py starts it.
tests/gpu/test_fast_path.py checks the kernels compiled, on CUDA."""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("run by tests/unit/test_kernels.py, with TRITON_INTERPRET=1 from the start")
    from kubetron_trainer.models import kernels

    return kernels


def reference_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize(
    "shape",
    [(3, 5, 128), (37, 2048), (9, 100), (2, 3, 4096)],
    ids=["qk-heads", "hidden-2048", "odd-width", "hidden-4096"],
)
def test_rms_norm_forward_and_gradients_match_fp64(kernels: ModuleType, shape: tuple) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_()
    y = kernels.rms_norm(x, w, 1e-6)
    grad = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), grad)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference_rms_norm(xd, wd, 1e-6)
    rdx, rdw = torch.autograd.grad(ref, (xd, wd), grad.double())
    assert y.shape == x.shape and dx.shape == x.shape and dw.shape == w.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-4, atol=1e-5)
    # the weight gradient sums over every row, across several programs' partial rows
    torch.testing.assert_close(dw.double(), rdw, rtol=1e-4, atol=1e-4)


def test_rms_norm_takes_a_strided_view(kernels: ModuleType) -> None:
    """q/k norms see a slice of the fused QKV projection: not contiguous."""
    torch.manual_seed(1)
    base = torch.randn(6, 4, 3 * 64)
    x = base[..., 64:128].requires_grad_(False)
    assert not x.is_contiguous()
    w = torch.ones(64)
    torch.testing.assert_close(
        kernels.rms_norm(x, w, 1e-6).double(), reference_rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("shape", [(4, 3, 2 * 96), (5, 2 * 3000)], ids=["small", "multi-block"])
def test_swiglu_matches_megatrons_definition(kernels: ModuleType, shape: tuple) -> None:
    from megatron.core.fusions.fused_bias_swiglu import swiglu

    torch.manual_seed(3)
    xy = torch.randn(*shape, requires_grad=True)
    out = kernels.SwiGLU()(xy)
    grad = torch.randn_like(out)
    (dxy,) = torch.autograd.grad(out, xy, grad)
    xd = xy.detach().double().requires_grad_()
    ref = swiglu(xd)  # Megatron's: silu of the first half times the second
    (rdxy,) = torch.autograd.grad(ref, xd, grad.double())
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dxy.double(), rdxy, rtol=1e-5, atol=1e-6)


def test_rms_norm_refuses_rows_wider_than_a_tile(kernels: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"leave norm out of spec\.recipe\.fastPath"):
        kernels.rms_norm(
            torch.randn(1, kernels.MAX_COLS + 1), torch.ones(kernels.MAX_COLS + 1), 1e-6
        )


def test_swiglu_refuses_an_odd_width(kernels: ModuleType) -> None:
    with pytest.raises(ValueError, match="even last dimension"):
        kernels.SwiGLU()(torch.randn(2, 7))


def test_swiglu_piece_puts_the_module_into_the_mlp(kernels: ModuleType) -> None:
    from kubetron_api.config import PRESETS, FastPath
    from kubetron_trainer.models.spec import layer_spec

    arch = PRESETS["qwen3-0.6b"]
    spec = layer_spec(arch, "sdpa", FastPath.parse("swiglu"))
    assert spec.layer.submodules.mlp.keywords["submodules"].activation_func is kernels.SwiGLU
    assert "swiglu" in spec.name
    plain = layer_spec(arch, "sdpa", FastPath.parse("norm"))
    assert plain.layer.submodules.mlp.keywords["submodules"].activation_func is None
