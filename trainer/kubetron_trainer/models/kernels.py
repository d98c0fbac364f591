"""The fast path's own Triton kernels: RMSNorm and SwiGLU, forward and backward.

Why not Liger's: the profile of Qwen3-1.7B (benchmarks/results/qwen3_1p7b_h200.json) showed
Liger's RMSNorm backward at about a quarter of the H200's memory bandwidth (140 ms a step for
452 calls that move 0.4 GB each): it runs one program per SM, each walking its rows one at a
time. Here each program takes a tile of rows (`_tile`), and the backward runs several programs
per SM, each summing its rows' weight gradient in fp32 registers and writing one partial row;
the partials are summed once at the end. Megatron's SwiGLU backward (an Inductor kernel that
concatenates the two halves) ran at about half the bandwidth; `_swiglu_bwd` writes both halves
of the gradient in place. Measured in the same profile afterwards: 51 and 54 ms a step instead
of 140 and 97 (Qwen3-1.7B 53.6% -> 55.8% MFU, benchmarks/RESULTS.md).

Numerics:
- RMSNorm: the inverse RMS in fp32; the normalised input is rounded to the input's dtype and
  then scaled by the weight (Hugging Face's Llama/Qwen order, Liger's "llama" casting). The
  gradients are formed in fp32; the weight's is summed over every row in fp32.
- SwiGLU: `silu(a) * b` over the halves `[a, b]` of the last dimension (Megatron's layout), in
  fp32, rounded once.

Triton is imported with this module: only the GPU fast path imports it. Under
`TRITON_INTERPRET=1` the kernels run on CPU tensors (the unit tests check the math that way).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 4096  # elements a program holds per tile (rows x padded columns)
BWD_PROGRAMS_PER_SM = 8  # backward programs per SM, each writing one fp32 weight-gradient row
MAX_COLS = 32768  # a whole row is held in registers: hidden sizes of today's models fit


def _tile(n_cols: int) -> tuple[int, int, int]:
    """(rows a tile, padded columns, warps) for rows of `n_cols`."""
    if n_cols > MAX_COLS:
        raise ValueError(
            f"the fast path's RMSNorm takes rows of at most {MAX_COLS} elements, not {n_cols}; "
            "leave norm out of spec.recipe.fastPath for this model"
        )
    block_n = triton.next_power_of_2(n_cols)
    block_r = max(1, TILE_ELEMENTS // block_n)
    warps = 4 if block_n * block_r <= 4096 else 8 if block_n <= 8192 else 16
    return block_r, block_n, warps


def _programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return int(sms) * BWD_PROGRAMS_PER_SM


@triton.jit
def _rms_norm_fwd(
    X, W, Y, RSTD, n_rows, n_cols, eps, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    x_hat = (x * rstd[:, None]).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + offs, (x_hat * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd(
    DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, n_blocks, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block in range(pid, n_blocks, programs):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        dw += tl.sum(dy * x_hat.to(DX.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]
        mean_gx = tl.sum(g * x_hat, axis=1) / n_cols
        dx = (g - x_hat * mean_gx[:, None]) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as a contiguous [rows, last dim] matrix (a copy only when the view needs one)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


class RMSNormFunction(torch.autograd.Function):
    """`weight * cast(x * rsqrt(mean(x^2) + eps))` over the last dimension."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)
        n_rows, n_cols = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_r, block_n, warps = _tile(n_cols)
        grid = (triton.cdiv(n_rows, block_r),)
        _rms_norm_fwd[grid](
            x2, weight, y, rstd, n_rows, n_cols, eps, BLOCK_R=block_r, BLOCK_N=block_n,
            num_warps=warps,
        )  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty_like(x2)
        block_r, block_n, warps = _tile(n_cols)
        n_blocks = triton.cdiv(n_rows, block_r)
        programs = max(1, min(n_blocks, _programs(x2.device)))
        partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x2.device)
        _rms_norm_bwd[(programs,)](
            dy2, x2, weight, rstd, dx, partial, n_rows, n_cols, n_blocks, BLOCK_R=block_r,
            BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
        return dx.view(dy.shape), partial.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


SWIGLU_BLOCK = 1024  # columns a program takes


@triton.jit
def _swiglu_fwd(XY, OUT, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    a = tl.load(XY + row * 2 * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(XY + row * 2 * n_cols + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    out = a / (1.0 + tl.exp(-a)) * b
    tl.store(OUT + row * n_cols + cols, out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd(G, XY, DXY, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(G + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(XY + row * 2 * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(XY + row * 2 * n_cols + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-a))
    da = g * b * s * (1.0 + a * (1.0 - s))
    db = g * a * s
    tl.store(DXY + row * 2 * n_cols + cols, da.to(DXY.dtype.element_ty), mask=ok)
    tl.store(DXY + row * 2 * n_cols + n_cols + cols, db.to(DXY.dtype.element_ty), mask=ok)


class SwiGLUFunction(torch.autograd.Function):
    """`silu(a) * b` for `[a, b]` = the two halves of the last dimension."""

    @staticmethod
    def forward(ctx: Any, xy: torch.Tensor) -> torch.Tensor:
        xy2 = _rows(xy)
        n_rows, n_cols = xy2.shape[0], xy2.shape[1] // 2
        out = torch.empty(n_rows, n_cols, dtype=xy.dtype, device=xy.device)
        _swiglu_fwd[(n_rows, triton.cdiv(n_cols, SWIGLU_BLOCK))](
            xy2, out, n_cols, BLOCK=SWIGLU_BLOCK, num_warps=4
        )
        ctx.save_for_backward(xy2)
        return out.view(*xy.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (xy2,) = ctx.saved_tensors
        n_rows, n_cols = xy2.shape[0], xy2.shape[1] // 2
        dxy = torch.empty_like(xy2)
        _swiglu_bwd[(n_rows, triton.cdiv(n_cols, SWIGLU_BLOCK))](
            _rows(g), xy2, dxy, n_cols, BLOCK=SWIGLU_BLOCK, num_warps=4
        )
        return dxy.view(*g.shape[:-1], 2 * n_cols)


class SwiGLU(torch.nn.Module):
    """An MLP's activation module (Megatron's `MLPSubmodules.activation_func` slot)."""

    def __init__(self, config: Any = None, **_: Any) -> None:
        super().__init__()

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        if xy.shape[-1] % 2:
            raise ValueError(f"SwiGLU needs an even last dimension, got {tuple(xy.shape)}")
        return SwiGLUFunction.apply(xy)
