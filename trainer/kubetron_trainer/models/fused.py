"""The fast path without Transformer Engine: fused kernels chosen in the layer spec.

Each piece is a spec choice or a Megatron option, asked for by `recipe.fastPath` (or
`--fast-path`): `on`, the default, asks for every piece; `models/fast_path.py` decides once which
of them apply (none when Transformer Engine builds the layers or the model runs on the CPU; some
need a model or shape, e.g. `ce` tensor parallel size 1):

- `ce`: the output layer and the cross-entropy in one chunked pass (Liger's fused linear
  cross-entropy, through `GPTModel`'s `output_processor` hook), so the `[tokens, vocab]` logits
  are never materialised in fp32; the loss is the same masked mean over the kept tokens.
- `norm`: every RMSNorm of the model (input, pre-MLP, q/k, final) as kubetron's Triton RMSNorm
  (`models/norm.py`'s `Norm` with `fused=True`, kernels in `models/kernels.py`).
- `rope`: RoPE applied by one Triton kernel inside core attention (`models/rope.py`) instead of
  Megatron's unfused `t*cos + rotate_half(t)*sin` (five passes over q and k).
- `cudnn`: torch SDPA's cuDNN attention first (flash as the fallback) instead of flash.
- `wgrad`: weight gradients accumulated straight into DDP's fp32 `main_grad` by one GEMM with
  an fp32 output (Megatron's `gradient_accumulation_fusion`, with `torch.addmm(...,
  out_dtype=float32)` standing in for APEX's `fused_weight_gradient_mlp_cuda` extension)
  instead of a bf16 weight gradient per micro-batch that a hook then adds to `main_grad`.
  Needs `ce` (or untied embeddings): Megatron's fused path would drop the embedding-lookup
  gradient of a tied output weight.
- `adam`: torch AdamW's single-kernel `fused=True` implementation for the distributed
  optimizer's fp32 master weights instead of the multi-kernel `foreach` one (same update rule).
- `swiglu`: the MLP's SwiGLU as kubetron's Triton kernels (`models/kernels.py`'s `SwiGLU` in the
  spec's activation-module slot) instead of Megatron's `bias_swiglu_impl`; dense models.
- `overlap`: the data-parallel gradient reduce-scatter overlapped with the backward pass
  (Megatron's `overlap_grad_reduce`, set up in `step_gpu.py`).

Liger (`pip install kubetron[fast]`) is imported only when `ce` is on.
Megatron-Core is not modified: the pieces replace submodules in the spec or set its options.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any

import torch

from kubetron_trainer.runtime.optimizer import torch_optimizers


def liger(module: str) -> ModuleType:
    """Import `liger_kernel.<module>`, or say how to install it."""
    try:
        return importlib.import_module(f"liger_kernel.{module}")
    except ImportError as err:
        raise RuntimeError(
            "--fast-path ce/norm needs liger-kernel (pip install 'kubetron[fast]' or "
            f"'liger-kernel>=0.5'); it did not import: {err}"
        ) from err


IGNORE_INDEX = -100
# Tokens per chunk of the fused cross-entropy, as a multiple of Liger's default budget (about
# `tokens x hidden` logits elements). Liger's default (1) gives 128-token chunks for a 152k
# vocabulary at hidden 2048, and every chunk then reads and writes the whole fp32 weight-gradient
# accumulator (1.2 GB): 64 passes per micro-batch. 16 gives 2048-token chunks (4 passes, about
# 0.6 GB of transient bf16 logits). Liger < 0.8.5 has no such knob and keeps its default.
CHUNK_MEM_CONST = 16


def _liger_flce(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy (mean over kept tokens), its arguments by name."""
    fn = liger("ops.fused_linear_cross_entropy").LigerFusedLinearCrossEntropyFunction
    params = list(inspect.signature(fn.forward).parameters.values())[1:]  # after ctx
    wanted: dict[str, Any] = {
        "_input": x, "weight": weight, "target": target, "ignore_index": IGNORE_INDEX,
        "reduction": "mean", "accum_dtype": torch.float32, "chunk_mem_const": CHUNK_MEM_CONST,
    }  # fmt: skip
    args = [wanted.get(p.name, p.default) for p in params]
    if any(a is inspect.Parameter.empty for a in args):
        raise RuntimeError(f"unexpected LigerFusedLinearCrossEntropyFunction signature {params}")
    return fn.apply(*args)[0]


def fused_lm_loss(
    *,
    hidden_states: torch.Tensor,
    output_layer: torch.nn.Module,
    output_weight: torch.Tensor | None,
    labels: torch.Tensor | None,
    loss_mask: torch.Tensor | None,
    **_: Any,
) -> torch.Tensor:
    """`GPTModel` output processor: the masked-mean LM loss straight from the hidden states.

    Equal to `masked_mean(cross_entropy(hidden @ W.T, labels), loss_mask)` (the unfused path),
    computed by Liger's chunked fused linear cross-entropy: logits exist one chunk of tokens at
    a time in bf16, softmax and loss in fp32 inside the kernel, and the gradients of the hidden
    states and of W are formed in the same pass (W's accumulated in fp32). Returns a scalar.
    """
    if labels is None or loss_mask is None:
        raise RuntimeError("the fused loss needs labels and loss_mask on the last stage")
    tp: Any = getattr(output_layer, "tp_group", None)
    if tp is not None and tp.size() > 1:
        raise RuntimeError("--fast-path ce supports tensor parallel size 1 only")
    weight: torch.Tensor = output_weight if output_weight is not None else output_layer.weight  # type: ignore[assignment]
    s, b, h = hidden_states.shape
    x = hidden_states.reshape(s * b, h)  # [s, b] order, like the labels below
    target = labels.transpose(0, 1).reshape(-1)
    keep = loss_mask.transpose(0, 1).reshape(-1) > 0
    if not bool(keep.any()):  # nothing to learn from: a zero loss with zero gradients
        return hidden_states.float().sum() * 0.0 + weight.float().sum() * 0.0
    target = target.masked_fill(~keep, IGNORE_INDEX)
    loss = _liger_flce(x, weight, target)
    return loss.float()


class _WgradAccumulate:
    """What Megatron calls on APEX's `fused_weight_gradient_mlp_cuda`, on torch's GEMMs.

    `main_grad += grad_output.T @ total_input` with the product formed and accumulated in the
    GEMM's fp32 epilogue (no bf16 rounding of the per-micro-batch weight gradient, no extra
    pass over `main_grad`). Inputs are Megatron's 2-D `[tokens, features]` views.
    """

    @staticmethod
    def wgrad_gemm_accum_fp32(
        total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
    ) -> None:
        torch.addmm(main_grad, grad_output.t(), total_input, torch.float32, out=main_grad)

    @staticmethod
    def wgrad_gemm_accum_fp16(
        total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
    ) -> None:
        main_grad.addmm_(grad_output.t(), total_input)


def enable_wgrad_fusion(device: torch.device) -> str | None:
    """Let Megatron's linear layers use `gradient_accumulation_fusion` without APEX.

    Megatron-Core looks the extension up as a module global of `tensor_parallel.layers`; when
    APEX's is absent, this hands it `_WgradAccumulate` (its code is not modified). Returns why
    it cannot be used (torch without `addmm(..., out_dtype)`), or None when it is on.
    """
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "_grad_accum_fusion_available", False):
        return None  # APEX's own extension is installed
    try:  # probe the fp32-output GEMM once (torch >= 2.8 on CUDA)
        acc = torch.zeros(2, 2, device=device)
        x = torch.ones(3, 2, device=device, dtype=torch.bfloat16)
        _WgradAccumulate.wgrad_gemm_accum_fp32(x, x, acc)
        if not bool((acc == 3).all()):
            return f"torch.addmm(out_dtype=float32) gave {acc.tolist()}"
    except (RuntimeError, TypeError) as err:
        return f"torch.addmm(out_dtype=float32) is not available: {err}"
    layers.fused_weight_gradient_mlp_cuda = _WgradAccumulate  # type: ignore[attr-defined]
    layers._grad_accum_fusion_available = True
    return None


def _adams(optimizer: Any) -> list[torch.optim.Optimizer]:
    return [
        o
        for o in torch_optimizers(optimizer)
        if isinstance(o, torch.optim.Adam | torch.optim.AdamW)
    ]


def use_fused_adam(optimizer: Any) -> int:
    """Switch the torch Adam(W) inside Megatron's optimizer to `fused=True`; returns how many.

    The same update rule in one kernel per dtype group. Called again after a checkpoint load,
    which brings the saved param groups (and CPU `step`s) back; the fused kernel wants each
    `step` on the parameter's device.
    """
    found = _adams(optimizer)
    for opt in found:
        opt.defaults.update(fused=True, foreach=False)
        for group in opt.param_groups:
            group.update(fused=True, foreach=False)
            for param in group["params"]:
                state = opt.state.get(param, {})
                step = state.get("step")
                if isinstance(step, torch.Tensor) and step.device != param.device:
                    state["step"] = step.to(param.device, torch.float32)
    return len(found)
