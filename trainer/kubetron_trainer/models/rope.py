"""RoPE in one Triton kernel, applied inside core attention (the fast path's `rope` piece).

Megatron-Core's RoPE without Transformer Engine is `t*cos + rotate_half(t)*sin` in bf16 plus
two concatenations: about five passes over q and k each way. Here one kernel reads a row of
`[s, b, heads, head_dim]` once and writes it once (forward: rotate by +angle; backward: by
-angle), with the rotation done in fp32. Same math as Megatron's non-interleaved RoPE
(`emb = cat(freqs, freqs)`, first half cos, `rotate_half(x) = cat(-x2, x1)`).

`RopeSelfAttention` (a `SelfAttention` subclass for the spec) hands the rotary frequencies to
its core attention instead of letting `SelfAttention` apply them; the core attention
(`SdpaAttention` with `rope=True`) calls `apply_rope` on q and k before SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from megatron.core.transformer.attention import SelfAttention


@triton.jit
def _rope_kernel(
    x_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    batch,
    heads,
    stride_s,
    stride_b,
    stride_h,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SIGN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row = position * batch + sample
    pos = row // batch
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < heads
    base = row * heads * 2 * HALF + h * 2 * HALF + d  # the contiguous output
    src = pos * stride_s + (row % batch) * stride_b + h * stride_h + d  # any strided input
    x1 = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + src + HALF, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + pos * HALF + d)
    s = tl.load(sin_ptr + pos * HALF + d) * SIGN
    tl.store(out_ptr + base, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + base + HALF, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """`x` rotated into a new contiguous tensor; `x` may be any strided view whose last
    (head_dim) axis is contiguous, like the gradient SDPA hands back, so no copy is made first."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    s, b, heads, dim = x.shape
    out = torch.empty((s, b, heads, dim), dtype=x.dtype, device=x.device)
    _rope_kernel[(s * b,)](
        x, out, cos, sin, b, heads, x.stride(0), x.stride(1), x.stride(2),
        HALF=dim // 2, BLOCK_H=triton.next_power_of_2(heads), SIGN=sign,
    )  # fmt: skip
    return out


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def cos_sin(freqs: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `[s, head_dim/2]` cos and sin from Megatron's `[s, 1, 1, head_dim]` frequencies."""
    half = freqs.shape[-1] // 2
    f = freqs[:seq_len].reshape(seq_len, -1)[:, :half].float()
    return torch.cos(f).contiguous(), torch.sin(f).contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (`[s, b, heads, head_dim]`) by the angles whose cos/sin are `[s, head_dim/2]`."""
    if x.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError("fused RoPE rotates the whole head dimension (rotary_percent 1.0)")
    return _RopeFunction.apply(x, cos, sin)


class RopeSelfAttention(SelfAttention):
    """`SelfAttention` that leaves RoPE to its core attention (one fused kernel there)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rotary = kwargs.pop("rotary_pos_emb", None)
        if rotary is not None and not isinstance(rotary, tuple):
            rotary = (rotary, rotary)
        self.core_attention.pending_rope = rotary
        try:
            return super().forward(hidden_states, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self.core_attention.pending_rope = None
