"""Megatron-Core `GPTModel`s for a `TrainerConfig`, built on explicit process groups.

Every Megatron-Core object here takes the trainer's `ProcessGroupCollection`; nothing reads
`parallel_state`. The layer spec is Transformer Engine's when TE imports, otherwise Megatron's
local spec with `SdpaAttention` as core attention (or, on request, Megatron's unfused
`DotProductAttention`, which tests compare against) and `models/norm.py`'s `Norm` for every norm,
the final one included, so that it also runs with sequence parallelism. With virtual pipeline
stages a rank holds several model chunks; only the very first chunk embeds and only the very
last computes the loss.
The fast path (`models/fused.py`, `--fast-path`) swaps fused pieces into the local spec; it is
off under Transformer Engine and on the CPU, where it is a no-op.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from kubetron_api.config import ModelArch, Precision, TrainerConfig
from kubetron_api.dims import ParallelDims
from kubetron_trainer.models.attention import SdpaAttention
from kubetron_trainer.models.fused import OFF, FastPath, enable_wgrad_fusion
from kubetron_trainer.models.norm import use_norm

log = logging.getLogger(__name__)

AttentionBackend = Literal["auto", "te", "sdpa", "unfused"]
# Megatron pads the vocabulary to a multiple of this times the tensor-parallel degree.
VOCAB_DIVISIBLE_BY = 128


@dataclass(frozen=True)
class ModelChunks:
    """This rank's model chunks (one per virtual pipeline stage) and how they were built."""

    chunks: list[GPTModel]
    config: TransformerConfig
    attention: str
    padded_vocab_size: int
    fast: FastPath = OFF


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tp
    return -(-vocab_size // multiple) * multiple


def transformer_config(
    cfg: TrainerConfig, dims: ParallelDims, device: torch.device
) -> TransformerConfig:
    """Megatron's TransformerConfig for the resolved architecture, precision and shape."""
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
        # fp8 GEMMs through Transformer Engine (e4m3 forward, e5m2 gradients); the trainer
        # refuses fp8 before this point when TE's spec is not in use.
        fp8="hybrid" if cfg.recipe.precision == Precision.FP8 else None,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        masked_softmax_fusion=False,
        bias_activation_fusion=on_gpu and arch.swiglu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
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


def effective_fast_path(
    fast: FastPath, backend: AttentionBackend, device: torch.device
) -> FastPath:
    """The fast path that applies: none under TE, on the CPU, or with the unfused attention."""
    if not fast.enabled:
        return fast
    backend = resolve_backend(backend)
    if device.type != "cuda":  # a no-op on the CPU (the default is on)
        log.info("%s: not applied on %s", fast.describe(), device.type)
        return OFF
    if backend != "sdpa":
        log.warning("%s requested; not applied (%s, %s)", fast.describe(), device.type, backend)
        return OFF
    return fast


def pieces_for_model(fast: FastPath, arch: ModelArch, dims: ParallelDims) -> FastPath:
    """The pieces that apply to this model and shape; each one dropped is logged."""
    if fast.rope and arch.position_embedding_type != "rope":
        fast = replace(fast, rope=False)
    if fast.swiglu and (not arch.swiglu or arch.is_moe):
        # the experts' MLPs would need the module too; a GELU model has no SwiGLU to replace
        log.info("fast path: swiglu applies to dense SwiGLU models; not applied")
        fast = replace(fast, swiglu=False)
    if fast.ce and dims.tp_enabled:
        log.warning("fast path: ce needs tensor parallel size 1; ce not applied")
        fast = replace(fast, ce=False)
    if fast.wgrad and not (fast.ce or arch.untie_embeddings):
        log.warning("fast path: wgrad needs ce (or untied embeddings); wgrad not applied")
        fast = replace(fast, wgrad=False)
    return fast


def fast_layer_spec(spec: ModuleSpec, fast: FastPath) -> str:
    """Swap the fast path's attention and SwiGLU pieces into a local spec with SdpaAttention
    (its `norm` piece is `use_norm`'s); returns a description."""
    attention = spec.submodules.self_attention
    if fast.rope:
        from kubetron_trainer.models.rope import RopeSelfAttention

        attention.module = RopeSelfAttention
    attention.submodules.core_attention = partial(
        SdpaAttention, backend="cudnn" if fast.cudnn else "default", rope=fast.rope
    )
    if fast.swiglu:
        from kubetron_trainer.models.kernels import SwiGLU

        spec.submodules.mlp = with_activation(spec.submodules.mlp, SwiGLU)
    return fast.describe()


def with_activation(mlp: Any, module: type[torch.nn.Module]) -> Any:
    """The MLP slot of a layer spec with `module` as its activation (`MLPSubmodules`'
    `activation_func`, which the MLP calls when `config.use_te_activation_func` is set). The
    slot is a `ModuleSpec` or, in Megatron-Core 0.19's local spec, a partial of
    `MLP.as_mlp_submodule`."""
    if isinstance(mlp, partial):
        subs = replace(mlp.keywords["submodules"], activation_func=module)
        return partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": subs})
    mlp.submodules = replace(mlp.submodules, activation_func=module)
    return mlp


@dataclass(frozen=True)
class LayerSpec:
    """A transformer layer spec, a name for its attention path, and the decoder's final norm
    (None: the spec's own default, TE's norm under Transformer Engine)."""

    layer: ModuleSpec
    name: str
    final_norm: Any = None

    def decoder(
        self, config: TransformerConfig, pp_rank: int, vp_stage: int | None
    ) -> ModuleSpec | TransformerBlockSubmodules:
        """What `GPTModel` takes as its spec for one chunk: the layer spec, or with a final
        norm of ours, the chunk's layers and that norm (what Megatron would build, with
        `WrappedTorchNorm`, which refuses sequence parallelism, replaced)."""
        if self.final_norm is None:
            return self.layer
        layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        return TransformerBlockSubmodules(
            layer_specs=[self.layer] * layers, layer_norm=self.final_norm
        )


def resolve_backend(backend: AttentionBackend) -> AttentionBackend:
    if backend == "auto":
        return "te" if te_available() else "sdpa"
    return backend


def layer_spec(arch: ModelArch, backend: AttentionBackend, fast: FastPath = OFF) -> LayerSpec:
    """The transformer layer spec: TE's, or the local one with `Norm` in every norm slot (so it
    runs sequence-parallel) and SDPA or Megatron's unfused core attention."""
    backend = resolve_backend(backend)
    if backend == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=arch.num_experts, qk_layernorm=arch.qk_layernorm
        )
        return LayerSpec(spec, "transformer-engine")
    spec = get_gpt_layer_local_spec(
        num_experts=arch.num_experts,
        qk_layernorm=arch.qk_layernorm,
        normalization=arch.normalization,
    )
    norm = use_norm(spec, fused=fast.norm)
    attention = spec.submodules.self_attention.submodules
    if backend == "sdpa":
        attention.core_attention = SdpaAttention
        name = "local spec + torch SDPA core attention"
        if fast.enabled:
            name += ", " + fast_layer_spec(spec, fast)
        return LayerSpec(spec, name, norm)
    attention.core_attention = DotProductAttention
    return LayerSpec(spec, "local spec + Megatron unfused DotProductAttention", norm)


class CpuRotaryEmbedding(RotaryEmbedding):
    """Megatron's RoPE, minus the move of `inv_freq` to CUDA on the first forward."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]


def build_model(
    cfg: TrainerConfig,
    dims: ParallelDims,
    pg: ProcessGroupCollection,
    device: torch.device,
    backend: AttentionBackend = "auto",
    fast: FastPath = OFF,
) -> ModelChunks:
    """This rank's GPTModel chunks, on `device`, with pre/post-process from the pipeline rank.
    The degrees come from `dims`, this rank's place in them from `pg` (built from the same)."""
    arch = cfg.model
    config = transformer_config(cfg, dims, device)
    fast = pieces_for_model(effective_fast_path(fast, backend, device), arch, dims)
    if fast.swiglu:  # the MLP calls the spec's activation module instead of bias_swiglu_impl
        config.use_te_activation_func = True
        config.bias_activation_fusion = False
    if fast.wgrad:
        why_not = enable_wgrad_fusion(device)
        if why_not:
            log.warning("fast path: wgrad not applied: %s", why_not)
            fast = replace(fast, wgrad=False)
        else:
            config.gradient_accumulation_fusion = True
    spec = layer_spec(arch, backend, fast)
    pp_rank, pp_size, vpp = pg.pp.rank(), dims.pp, dims.vpp_size or 1
    vocab = padded_vocab_size(arch.vocab_size, dims.tp)
    chunks = []
    for stage in range(vpp):
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec.decoder(config, pp_rank, stage if vpp > 1 else None),
            vocab_size=vocab,
            max_sequence_length=cfg.recipe.seq_length,
            pre_process=pp_rank == 0 and stage == 0,
            post_process=pp_rank == pp_size - 1 and stage == vpp - 1,
            share_embeddings_and_output_weights=not arch.untie_embeddings,
            position_embedding_type=arch.position_embedding_type,
            rotary_base=arch.rotary_base,
            rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0,  # Megatron's default when unused
            pg_collection=pg,
            vp_stage=stage if vpp > 1 else None,
        )
        if device.type == "cpu" and arch.position_embedding_type == "rope":
            model.rotary_pos_emb.__class__ = CpuRotaryEmbedding
        chunks.append(model.to(device))
    log.info("attention path: %s (padded vocab %d)", spec.name, vocab)
    return ModelChunks(chunks, config, spec.name, vocab, fast)
