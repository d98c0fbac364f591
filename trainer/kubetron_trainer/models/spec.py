"""The transformer layer spec: Transformer Engine's, or Megatron's local one with our modules.

Under Transformer Engine the spec is TE's. Otherwise it is Megatron's local spec with
`SdpaAttention` as core attention (or, on request, Megatron's unfused `DotProductAttention`,
which tests compare against) and `models/norm.py`'s `Norm` in every norm slot, the decoder's
final norm included, so that it also runs with sequence parallelism. The fast-path pieces that
are modules (`models/fused.py`: norm, rope, cudnn, swiglu) and the fp8 linear layers
(`models/fp8.py`) are swapped into the local spec here; which apply was decided before
(`models/fast_path.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from kubetron_api.config import FastPath, ModelArch
from kubetron_trainer.models.attention import SdpaAttention
from kubetron_trainer.models.fast_path import OFF, Attention
from kubetron_trainer.models.norm import use_norm


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


def layer_spec(
    arch: ModelArch, backend: Attention, fast: FastPath = OFF, fp8: bool = False
) -> LayerSpec:
    """The transformer layer spec: TE's, or the local one with `Norm` in every norm slot (so it
    runs sequence-parallel) and SDPA or Megatron's unfused core attention; `fp8`: the linear
    layers run kubetron's fp8 GEMMs (`models/fp8.py`, decided by `decide_fast_path`)."""
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
    attention = spec.submodules.self_attention.submodules
    if backend == "sdpa":
        attention.core_attention = SdpaAttention
        name = "local spec + torch SDPA core attention"
        if fast.enabled:
            name += ", " + fast_layer_spec(spec, fast)
        if fp8:
            name += ", " + fp8_layer_spec(spec)
    else:
        attention.core_attention = DotProductAttention
        name = "local spec + Megatron unfused DotProductAttention"
    return LayerSpec(spec, name, use_norm(spec, fused=fast.norm))


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


def fp8_layer_spec(spec: ModuleSpec) -> str:
    """Swap the fp8 linear layers into a dense local spec: attention's qkv and proj, the MLP's
    fc1 and fc2 (the same Megatron layers with fp8 GEMMs); returns a description."""
    from kubetron_trainer.models.fp8 import Fp8ColumnParallelLinear, Fp8RowParallelLinear

    attention = spec.submodules.self_attention.submodules
    attention.linear_qkv = Fp8ColumnParallelLinear
    attention.linear_proj = Fp8RowParallelLinear
    spec.submodules.mlp = with_mlp_submodules(
        spec.submodules.mlp, linear_fc1=Fp8ColumnParallelLinear, linear_fc2=Fp8RowParallelLinear
    )
    return "fp8 GEMMs (row-wise scaled e4m3)"


def with_activation(mlp: Any, module: type[torch.nn.Module]) -> Any:
    """The MLP slot of a layer spec with `module` as its activation (`MLPSubmodules`'
    `activation_func`, which the MLP calls when `config.use_te_activation_func` is set)."""
    return with_mlp_submodules(mlp, activation_func=module)


def with_mlp_submodules(mlp: Any, **changes: Any) -> Any:
    """The MLP slot of a layer spec with `changes` to its `MLPSubmodules`. The slot is a
    `ModuleSpec` or, in Megatron-Core 0.19's local spec, a partial of `MLP.as_mlp_submodule`."""
    if isinstance(mlp, partial):
        subs = replace(mlp.keywords["submodules"], **changes)
        return partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": subs})
    mlp.submodules = replace(mlp.submodules, **changes)
    return mlp
