"""Megatron-Core's `TransformerConfig` from a kubetron `TrainerConfig`: the one translation.

Every number of the resolved architecture, the precision, the parallel degrees, the recompute
setting and the fast-path pieces that are Megatron options rather than modules reach Megatron
here; the layer spec (`models/spec.py`) and the model chunks (`models/build.py`) read the result.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from kubetron_api.config import FastPath, Precision, TrainerConfig
from kubetron_api.dims import ParallelDims
from kubetron_trainer.models.fast_path import OFF

# Megatron pads the vocabulary to a multiple of this times the tensor-parallel degree.
VOCAB_DIVISIBLE_BY = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tp
    return -(-vocab_size // multiple) * multiple


def transformer_config(
    cfg: TrainerConfig,
    dims: ParallelDims,
    device: torch.device,
    fast: FastPath = OFF,
    own_fp8: bool = False,
) -> TransformerConfig:
    """Megatron's TransformerConfig for the resolved architecture, precision and shape, with
    the fast-path pieces that apply (`EngineChoice.fast`); `own_fp8`: fp8 runs in kubetron's
    linear layers (`EngineChoice.fp8`), so Megatron is not asked for Transformer Engine's."""
    arch = cfg.model
    bf16 = cfg.recipe.precision in (Precision.BF16, Precision.FP8)
    dtype = torch.bfloat16 if bf16 else torch.float32
    on_gpu = device.type == "cuda"
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        gated_linear_unit=arch.swiglu,
        activation_func=F.silu if arch.swiglu else F.gelu,
        normalization=arch.normalization,
        layernorm_epsilon=arch.norm_epsilon,
        qk_layernorm=arch.qk_layernorm,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        **dims.megatron_sizes(),  # type: ignore[arg-type]
        # Interleaved pipeline over two stages: the previous and the next stage are the same
        # peer, and one batch_isend_irecv to it matches sends and receives in issue order, so
        # a stage received the other's gradient as its activation (and the reverse; seen on 2
        # H200s: gradient norms 1e3 times too large). Individual isend/irecv order them per
        # direction (and use two communicators for a 2-rank group).
        batch_p2p_comm=not (dims.pp == 2 and dims.vpp_size is not None),
        sequence_parallel=cfg.parallelism.sequence_parallel,
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_router_topk if arch.is_moe else 2,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        # alltoall creates a CUDA stream when built; allgather builds (and runs) on the CPU
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        moe_aux_loss_coeff=1e-3 if arch.is_moe else 0.0,
        bf16=bf16,
        params_dtype=dtype,
        # fp8 GEMMs through Transformer Engine (e4m3 forward, e5m2 gradients) unless the fast
        # path's own run them; the trainer refuses fp8 before this point when neither can.
        fp8="hybrid" if cfg.recipe.precision == Precision.FP8 and not own_fp8 else None,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        masked_softmax_fusion=False,
        # swiglu: the MLP calls the spec's activation module instead of bias_swiglu_impl
        bias_activation_fusion=on_gpu and arch.swiglu and not fast.swiglu,
        use_te_activation_func=fast.swiglu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # wgrad: fp32 weight-gradient GEMMs (`fused.enable_wgrad_fusion` provides the kernel)
        gradient_accumulation_fusion=fast.wgrad,
        cross_entropy_loss_fusion=False,
        **recompute_options(cfg.recipe.recompute_layers),
    )


def recompute_options(layers: int) -> dict[str, Any]:
    """Megatron's full recompute of the first `layers` layers of each model chunk (block
    method): their inputs are kept and the rest recomputed in the backward pass."""
    if not layers:
        return {}
    return {
        "recompute_granularity": "full",
        "recompute_method": "block",
        "recompute_num_layers": layers,
    }
