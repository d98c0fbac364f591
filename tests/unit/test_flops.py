"""Megatron's FLOPs formula and the MFU peak table."""

from __future__ import annotations

import pytest

from kubetron_api.config import PRESETS
from kubetron_trainer.observe.flops import flops_per_token, peak_flops


def test_qwen3_1_7b_flops_per_token_at_seq_4096() -> None:
    arch = PRESETS["qwen3-1.7b"]
    # Worked by hand: h=2048, ffn=6144, q=16*128=2048, k=v=8*128=1024, L=28, V=151936.
    per_layer = 2048 * 6144 * 3 + 2048 * (2048 + 1024 + 1024) + 2048 * 2048
    dense = 6 * (28 * per_layer + 2048 * 151936)
    attention = 6 * 2048 * 4096 * 28
    assert dense == 10_322_706_432
    assert attention == 1_409_286_144
    assert flops_per_token(arch, 4096, 151936) == pytest.approx(11_731_992_576)


def test_frozen_weights_count_forward_and_input_gradients_only() -> None:
    # LoRA: the same hand-worked Qwen3-1.7B at seq 4096, 4 FLOPs per weight instead of 6;
    # attention's activation-by-activation products keep their 6.
    dense = 4 * (28 * (2048 * 6144 * 3 + 2048 * 4096 + 2048 * 2048) + 2048 * 151936)
    expected = dense + 6 * 2048 * 4096 * 28
    assert expected == 8_291_090_432
    assert flops_per_token(PRESETS["qwen3-1.7b"], 4096, 151936, weight_gradients=False) == expected


def test_24k_tokens_per_s_of_qwen3_1_7b_on_an_h100_is_29_percent_mfu() -> None:
    # 24.4k tokens/s at seq 4096 against the H100's 989 TFLOP/s dense bf16 peak: 29% MFU.
    achieved = 24_400 * flops_per_token(PRESETS["qwen3-1.7b"], 4096, 151936)
    assert achieved / 989e12 == pytest.approx(0.289, abs=0.002)


def test_attention_term_grows_linearly_with_sequence() -> None:
    arch = PRESETS["gpt-tiny"]
    short, long = flops_per_token(arch, 64, 512), flops_per_token(arch, 128, 512)
    q = arch.kv_channels * arch.num_attention_heads
    assert long - short == 6 * q * 64 * arch.num_layers


def test_gelu_mlp_counts_two_matmuls() -> None:
    swiglu = PRESETS["gpt-tiny"]
    gelu = swiglu.model_copy(update={"swiglu": False})
    diff = flops_per_token(swiglu, 64, 512) - flops_per_token(gelu, 64, 512)
    assert diff == 6 * swiglu.num_layers * swiglu.hidden_size * swiglu.ffn_hidden_size


def test_moe_counts_routed_experts_and_router() -> None:
    arch = PRESETS["gpt-tiny-moe"]
    dense = arch.model_copy(update={"num_experts": None})
    h, layers = arch.hidden_size, arch.num_layers
    moe_mlp = 2 * h * 128 * 3 + h * 4
    dense_mlp = h * 256 * 3
    expected = 6 * layers * (moe_mlp - dense_mlp)
    assert flops_per_token(arch, 64, 512) - flops_per_token(dense, 64, 512) == expected


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA H100 80GB HBM3", "fp32", None),
        ("NVIDIA GeForce RTX 3090", "bf16", None),
        (None, "bf16", None),
    ],
)
def test_peak_known_only_for_listed_gpus(
    name: str | None, precision: str, peak: float | None
) -> None:
    assert peak_flops(name, precision) == peak
