"""FP8 GEMMs for the linear layers of the TE-free fast path (`recipe.precision: fp8`, Hopper).

Transformer Engine provides fp8 only to images that have it; the fast path runs without it. Here
the four linear layers of every dense transformer layer (attention's qkv and proj, the MLP's fc1
and fc2) run their three GEMMs (output, input gradient, weight gradient) in fp8 through
`torch._scaled_mm`. Why `_scaled_mm` and not torchao: torch ships it (cuBLASLt's fp8 GEMM), so
fp8 needs no new dependency; torchao would be another runtime dependency pinned to the torch
build of the image.

Recipe (torchao calls it "rowwise"): row-wise current scaling, e4m3 for activations, weights and
gradients. Each operand of each GEMM is scaled by the amax of its rows along the GEMM's
contraction dimension, taken from the tensor at hand (no amax history), so one outlier row does
not flatten the others' precision. The forward quantises the input along the features (for the
output GEMM) and along the tokens (kept for the weight-gradient GEMM, half the bytes of the bf16
input Megatron would keep); the backward quantises the output gradient both ways and the weight
along its output features. GEMMs accumulate in fp32 and write bf16.

Nothing else changes: parameters stay bf16 with fp32 main weights in the optimizer, so a
checkpoint has the same format in either precision and a job can switch at a resume. The layers
are Megatron's local-spec `ColumnParallelLinear`/`RowParallelLinear` with `_forward_impl`
replaced: their tensor-parallel and sequence-parallel communication (the input all-gather, the
input-gradient all-reduce or reduce-scatter) and Megatron's gradient-accumulation fusion
(`main_grad`) semantics are kept. The quantisers are compiled by `torch.compile` (one fused
reduction and cast per operand); `KUBETRON_FP8_EAGER=1` runs them eagerly.

A weight's two quantisations are made once per optimizer step, at its first use, and kept on the
parameter until the next step (a global torch optimizer step hook marks them stale): with
several micro-batches a step, quantising the weights for every micro-batch cost more than the
fp8 GEMMs saved (Qwen3-4B at micro-batch 1 ran at 0.97x bf16's tokens/s on an H100). The cache
holds 2 bytes per linear-layer parameter.

Where it cannot run is decided before the model is built (`models/fast_path.py`): the CPU,
GPUs below compute capability 9.0, dimensions that are not multiples of 16, MoE experts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    linear_with_grad_accumulation_and_async_allreduce,
)
from megatron.core.utils import get_tensor_model_parallel_group_if_none
from torch.optim.optimizer import register_optimizer_step_post_hook

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)
AMAX_FLOOR = 1e-12  # an all-zero row: any scale gives zeros; avoid dividing by zero
MIN_CAPABILITY = (9, 0)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (R, C) in e4m3, row-major, and the (R, 1) fp32 scales that give it back."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=AMAX_FLOOR)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def _columns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.T` (C, R) in e4m3, row-major (scaled along x's rows), and its (C, 1) scales."""
    q, scale = _rows(x.t())
    return q.contiguous(), scale


def _rows_and_columns(
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both quantisations of `x` from one read: `_rows(x)` and `_columns(x)`."""
    q, s = _rows(x)
    qt, st = _columns(x)
    return q, s, qt, st


def _weight_rows_and_columns(
    w: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_rows_and_columns` for weights: a function of its own, so that torch.compile keeps the
    weights' shapes apart from the activations' (each function recompiles at most 8 shapes)."""
    return _rows_and_columns(w)


_compiled: dict[str, Callable[..., Any]] = {}


def _quantiser(name: str) -> Callable[..., Any]:
    """The quantiser `name`, compiled once per process (eager under KUBETRON_FP8_EAGER=1)."""
    fn = {"rows": _rows, "both": _rows_and_columns, "weight": _weight_rows_and_columns}[name]
    if os.environ.get("KUBETRON_FP8_EAGER") == "1":
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _compiled[name]


def _gemm(
    a: torch.Tensor, scale_a: torch.Tensor, b_rows: torch.Tensor, scale_b: torch.Tensor
) -> torch.Tensor:
    """`a @ b_rows.T` in fp8 with bf16 output: `a` (M, K) and `b_rows` (N, K) are row-major
    e4m3 scaled along K, with (M, 1) and (N, 1) scales."""
    return torch._scaled_mm(
        a, b_rows.t(), scale_a=scale_a, scale_b=scale_b.t(), out_dtype=torch.bfloat16
    )


_generation = [0]  # optimizer steps seen: a weight quantised at an older one is stale


def _new_weights(*_: Any) -> None:
    _generation[0] += 1


register_optimizer_step_post_hook(_new_weights)


def _weight(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The weight quantised along its rows and along its columns, made once per optimizer step
    (the parameter keeps them until the next one)."""
    key = (_generation[0], weight._version)  # the version too: a load writes in place
    cached = getattr(weight, "_kubetron_fp8", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, *_quantiser("weight")(weight.detach()))
        weight._kubetron_fp8 = cached  # type: ignore[attr-defined]
    return cached[1:]


def fp8_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w.T` with both operands quantised row-wise to e4m3 (2-D, bf16 output)."""
    qx, sx = _quantiser("rows")(x)
    qw, sw = _quantiser("rows")(w)
    return _gemm(qx, sx, qw, sw)


class Fp8Linear(torch.autograd.Function):
    """Megatron's `LinearWithGradAccumulationAndAsyncCommunication` with fp8 GEMMs.

    Same arguments and communication: with sequence parallelism the input is all-gathered
    before the GEMM and the input gradient reduce-scattered; otherwise, with `allreduce_dgrad`,
    the input gradient is all-reduced. With `gradient_accumulation_fusion` the weight gradient
    goes into `weight.main_grad` (fp32) and a dummy gradient is returned the way Megatron does.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        inp: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        gradient_accumulation_fusion: bool,
        allreduce_dgrad: bool,
        sequence_parallel: bool,
        tp_group: Any,
    ) -> torch.Tensor:
        total = _gather(inp, tp_group) if sequence_parallel else inp
        x = total.reshape(-1, total.shape[-1])
        qx, sx, qxt, sxt = _quantiser("both")(x)
        qw, sw, _, _ = _weight(weight)
        out = _gemm(qx, sx, qw, sw)
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(qxt, sxt, weight)
        fused = gradient_accumulation_fusion and hasattr(weight, "main_grad")
        ctx.main_grad = getattr(weight, "main_grad", None) if fused else None
        ctx.fused, ctx.use_bias = fused, bias is not None
        ctx.allreduce_dgrad, ctx.sequence_parallel = allreduce_dgrad, sequence_parallel
        ctx.tp_group, ctx.input_shape, ctx.input_dtype = tp_group, inp.shape, inp.dtype
        return out.view(*total.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        qxt, sxt, weight = ctx.saved_tensors
        g = grad_output.reshape(-1, grad_output.shape[-1]).contiguous()
        qg, sg, qgt, sgt = _quantiser("both")(g)
        _, _, qwt, swt = _weight(weight)
        grad_input = _gemm(qg, sg, qwt, swt).view(*grad_output.shape[:-1], weight.shape[1])
        handle, grad_input = _reduce_input_grad(ctx, grad_input)
        grad_weight: torch.Tensor | None = _gemm(qgt, sgt, qxt, sxt)  # (N, M) x (K, M)^T
        if ctx.fused:
            ctx.main_grad.add_(grad_weight)
            weight.main_grad = ctx.main_grad
            grad_weight = _dummy_weight_grad(weight, ctx.main_grad, ctx.input_dtype)
        grad_bias = g.sum(dim=0) if ctx.use_bias else None
        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _gather(inp: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """The sequence-parallel input gathered over the tensor-parallel group (dimension 0)."""
    out = torch.empty(
        (inp.shape[0] * tp_group.size(), *inp.shape[1:]), dtype=inp.dtype, device=inp.device
    )
    torch.distributed.all_gather_into_tensor(out, inp.contiguous(), group=tp_group)
    return out


def _reduce_input_grad(ctx: Any, grad_input: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Start the input gradient's all-reduce (tensor parallel) or reduce-scatter (sequence
    parallel), overlapped with the weight-gradient GEMM; returns the handle and the tensor
    that holds the result once it is waited on."""
    if ctx.sequence_parallel:
        sub = torch.empty(ctx.input_shape, dtype=grad_input.dtype, device=grad_input.device)
        handle = torch.distributed.reduce_scatter_tensor(
            sub, grad_input.contiguous(), group=ctx.tp_group, async_op=True
        )
        return handle, sub
    if ctx.allreduce_dgrad:
        handle = torch.distributed.all_reduce(grad_input, group=ctx.tp_group, async_op=True)
        return handle, grad_input
    return None, grad_input


def _dummy_weight_grad(
    weight: torch.Tensor, main_grad: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """What Megatron returns as the weight gradient once it went into `main_grad`: a dummy
    tensor (so DDP's hooks run on the backward thread) where the parameter asks for it."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True  # type: ignore[attr-defined]
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(main_grad.shape, dtype=dtype, device=main_grad.device)


def fp8_linear(
    input: torch.Tensor,  # Megatron passes it by this name
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gradient_accumulation_fusion: bool,
    allreduce_dgrad: bool,
    sequence_parallel: bool,
    grad_output_buffer: list[torch.Tensor] | None = None,
    wgrad_deferral_limit: int | None = 0,
    tp_group: Any = None,
    gtp_remat_size: int = 1,
) -> torch.Tensor:
    """`linear_with_grad_accumulation_and_async_allreduce` with fp8 GEMMs. The options these
    layers never use in kubetron's configs (deferred embedding weight gradients, sharded
    weight re-materialisation) run Megatron's bf16 function."""
    if grad_output_buffer is not None or gtp_remat_size > 1:
        return linear_with_grad_accumulation_and_async_allreduce(
            input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
            sequence_parallel, grad_output_buffer, wgrad_deferral_limit, tp_group,
            gtp_remat_size,
        )  # fmt: skip
    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    out: torch.Tensor = Fp8Linear.apply(
        input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
        tp_group,
    )  # fmt: skip
    return out


class _Fp8Forward:
    """The GEMMs of a Megatron parallel linear layer in fp8; a frozen weight keeps bf16."""

    def _forward_impl(
        self, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kw: Any
    ) -> Any:
        if not weight.requires_grad:
            return super()._forward_impl(input, weight, *args, **kw)  # type: ignore[misc]
        return fp8_linear(input, weight, *args, **kw)


class Fp8ColumnParallelLinear(_Fp8Forward, ColumnParallelLinear):
    """Megatron's `ColumnParallelLinear` whose GEMMs run in fp8 (frozen weights: bf16)."""


class Fp8RowParallelLinear(_Fp8Forward, RowParallelLinear):
    """Megatron's `RowParallelLinear` whose GEMMs run in fp8 (frozen weights: bf16)."""


def fp8_device_refusal(device: torch.device) -> str | None:
    """Why this device cannot run the fp8 GEMMs, or None."""
    if device.type != "cuda":
        return f"kubetron's fp8 GEMMs need an NVIDIA GPU (Hopper or newer); this is {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (
            f"kubetron's fp8 GEMMs need compute capability 9.0 (Hopper) or newer; "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
        )
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    return None
