"""Model FLOPs per token (Megatron's formula) and the peak FLOP/s of the GPU, for MFU.

MFU is only meaningful against a known peak, so `peak_flops` returns None for devices it does
not know (CPUs, unlisted GPUs, non-bf16 precisions) and the trainer then leaves MFU unset
rather than inventing a number.
"""

from __future__ import annotations

from kubetron_api.config import ModelArch

# Dense BF16 tensor-core peaks (no sparsity), from the vendors' datasheets (SXM parts).
BF16_PEAK_FLOPS: dict[str, float] = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
}


def flops_per_token(
    arch: ModelArch, seq_length: int, padded_vocab: int, weight_gradients: bool = True
) -> float:
    """Training FLOPs (forward + backward) per token, as Megatron counts them.

    `6*[L*(h*ffn*(3 if SwiGLU else 2) + h*(q+k+v) + q*h) + h*V] + 6*q*s*L` with
    q = kv_channels*heads and k = v = kv_channels*query_groups; for MoE layers the MLP term is
    the routed experts' (`topk * h * moe_ffn * ...`) plus the router (`h * experts`).

    `weight_gradients=False` counts a model whose weights are frozen but whose backward pass
    runs (LoRA): its weight matrices cost the forward and the input gradient, 4 instead of 6
    FLOPs per weight, while attention's score and value products, whose operands are both
    activations, keep all 6 (the adapters' own FLOPs are under 1% at the ranks used, and left out).
    """
    h, layers = arch.hidden_size, arch.num_layers
    q = arch.kv_channels * arch.num_attention_heads
    kv = arch.kv_channels * arch.num_query_groups
    gate = 3 if arch.swiglu else 2
    if arch.num_experts is not None:
        expert_ffn = arch.moe_ffn_hidden_size or arch.ffn_hidden_size
        mlp = arch.moe_router_topk * h * expert_ffn * gate + h * arch.num_experts
    else:
        mlp = h * arch.ffn_hidden_size * gate
    per_layer = mlp + h * (q + 2 * kv) + q * h
    per_weight = 6.0 if weight_gradients else 4.0
    return per_weight * (layers * per_layer + h * padded_vocab) + 6.0 * q * seq_length * layers


def forward_flops_per_token(arch: ModelArch, seq_length: int, padded_vocab: int) -> float:
    """Forward-only FLOPs per token (a frozen model): a third of the training count, whose
    backward pass costs twice the forward."""
    return flops_per_token(arch, seq_length, padded_vocab) / 3


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Peak dense FLOP/s of the named GPU at `precision`, or None when unknown."""
    if device_name is None or precision not in ("bf16", "fp8"):
        return None
    for model, peak in BF16_PEAK_FLOPS.items():
        if model in device_name:
            return peak
    return None
