"""Hugging Face weights in and out of kubetron's Megatron `GPTModel` (Qwen3, Qwen3 MoE, Llama).

Import works for any tensor and pipeline shape without special cases: every entry of a model
chunk's sharded state dict (a `ShardedTensor`, or the SwiGLU factory's two) names its key in
Megatron's TP1 layout, the layer (and expert) it belongs to by its prepended offsets, its global
shape and this rank's slice; its data is a view of the parameter. So each rank builds the full
Megatron-layout tensor of a key from the Hugging Face tensors and copies its slice in:

- QKV fused per query group, `[q heads of the group, k, v]` (Megatron's order);
- MLP `linear_fc1` = `[gate; up]` (the SwiGLU factory shards each half over tensor ranks);
- input/post-attention norms under the keys `linear_qkv.layer_norm_weight` and
  `linear_fc1.layer_norm_weight` (the local spec maps its norms to TE's keys), q/k norms;
- embeddings and output layer padded with zero rows to Megatron's padded vocabulary, the output
  layer from the embeddings when they are tied (also on the last stage of a pipeline).

Export runs the same table backwards on a TP1/PP1 model (`kubetron_trainer.tools.export`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule

from kubetron_api.config import ModelArch
from kubetron_api.exitcodes import ConfigError
from kubetron_api.hf_config import WEIGHTS_FIELD
from kubetron_trainer.runtime.checkpoint import sharded_model_state

log = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"
LAYER = "decoder.layers."
_EXPERTS = re.compile(r"^mlp\.experts\.(local_experts|experts)\.(linear_fc1|linear_fc2)\.weight$")


class HfWeights:
    """The tensors of a safetensors checkpoint directory, read lazily one tensor at a time."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = directory
        self._open = safe_open
        index = directory / INDEX
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(directory.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    self.files |= dict.fromkeys(f.keys(), path)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ConfigError(
                WEIGHTS_FIELD,
                f"{self.directory} has no tensor {name}; is it a checkpoint of this model?",
            )
        with self._open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


# --------------------------------------------------------------------------- layouts


def fuse_qkv(arch: ModelArch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Megatron's fused QKV rows: per query group its query heads, then its key and value."""
    groups, d = arch.num_query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // groups
    h = q.shape[-1]
    fused = torch.cat(
        [q.reshape(groups, per_group * d, h), k.reshape(groups, d, h), v.reshape(groups, d, h)],
        dim=1,
    )
    return fused.reshape(groups * (per_group + 2) * d, h)


def split_qkv(arch: ModelArch, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inverse of `fuse_qkv`: q, k, v in Hugging Face's layout."""
    groups, d = arch.num_query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // groups
    h = qkv.shape[-1]
    q, k, v = qkv.reshape(groups, (per_group + 2) * d, h).split([per_group * d, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended up to `rows` (Megatron's padded vocabulary)."""
    if t.shape[0] > rows:
        raise ValueError(f"{t.shape[0]} rows do not fit in {rows}")
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t


# Per-layer keys: Megatron's key under `decoder.layers.` -> the Hugging Face names under
# `model.layers.<i>.`, in the order `to_megatron` concatenates them.
LAYER_KEYS: dict[str, tuple[str, ...]] = {
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    ),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
    "mlp.router.weight": ("mlp.gate.weight",),
}  # fmt: skip
EXPERT_KEYS = {
    "linear_fc1": ("gate_proj.weight", "up_proj.weight"),
    "linear_fc2": ("down_proj.weight",),
}


def hf_names(key: str, index: tuple[int, ...], untie: bool) -> tuple[str, ...]:
    """The Hugging Face tensors one Megatron key (at layer/expert `index`) is made of."""
    if key == "embedding.word_embeddings.weight":
        return ("model.embed_tokens.weight",)
    if key == "output_layer.weight":
        return ("lm_head.weight",) if untie else ("model.embed_tokens.weight",)
    if key == "decoder.final_layernorm.weight":
        return ("model.norm.weight",)
    if key.startswith(LAYER):
        rest = key.removeprefix(LAYER)
        prefix = f"model.layers.{index[0]}."
        if rest in LAYER_KEYS:
            return tuple(prefix + n for n in LAYER_KEYS[rest])
        if match := _EXPERTS.match(rest):
            expert = f"{prefix}mlp.experts.{index[1]}."
            return tuple(expert + n for n in EXPERT_KEYS[match.group(2)])
    raise KeyError(f"no Hugging Face counterpart for Megatron key {key}")


def to_megatron(
    arch: ModelArch, key: str, parts: list[torch.Tensor], padded_vocab: int
) -> torch.Tensor:
    """The full Megatron-layout tensor of `key` from its Hugging Face tensors."""
    if key.endswith("linear_qkv.weight"):
        return fuse_qkv(arch, *parts)
    if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return pad_rows(parts[0], padded_vocab)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def to_hf(arch: ModelArch, key: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of `to_megatron`: the Hugging Face tensors of one Megatron tensor."""
    if key.endswith("linear_qkv.weight"):
        return list(split_qkv(arch, tensor))
    if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return [tensor[: arch.vocab_size]]
    if key.endswith("linear_fc1.weight") and arch.swiglu:
        return list(tensor.chunk(2))
    return [tensor]


# --------------------------------------------------------------------------- sharded entries


def sharded_tensors(state: dict[str, Any]) -> Iterator[tuple[str, ShardedTensor]]:
    """(local name, ShardedTensor) of a chunk's sharded state dict, the SwiGLU factories built
    into their halves; the tensors' data are views of the parameters."""
    for name, value in state.items():
        if isinstance(value, ShardedTensorFactory):
            for built in nested_values(value.build()):
                yield name, built
        elif isinstance(value, ShardedTensor):
            yield name, value


def local_region(sh: ShardedTensor) -> tuple[slice, ...]:
    """This rank's slice of the full (per layer/expert) tensor."""
    offsets = sh.global_offset[sh.prepend_axis_num :]
    return tuple(slice(o, o + n) for o, n in zip(offsets, sh.local_shape, strict=True))


def copy_slice(sh: ShardedTensor, full: torch.Tensor, field: str, what: str) -> None:
    """Copy this rank's slice of `full` (the whole tensor of `sh`'s key) into the parameter
    behind `sh`; a tensor of another shape is refused (ConfigError on `field`, naming `what`)."""
    expected = tuple(sh.global_shape[sh.prepend_axis_num :])
    if tuple(full.shape) != expected:
        raise ConfigError(
            field, f"{what} has shape {tuple(full.shape)}, the model needs {expected}"
        )
    sh.data.copy_(full[local_region(sh)])


@torch.no_grad()
def load_hf_weights(
    chunks: list[MegatronModule],
    pg: ProcessGroupCollection,
    arch: ModelArch,
    directory: Path,
    padded_vocab: int,
) -> int:
    """Fill this rank's parameters of every chunk from a Hugging Face checkpoint; returns the
    number of parameter slices filled. Each rank reads the tensors its slices come from."""
    weights = HfWeights(directory)
    cache: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    filled = 0
    for chunk in chunks:
        for _, sh in sharded_tensors(sharded_model_state(chunk, pg)):
            index = tuple(sh.global_offset[: sh.prepend_axis_num])
            full = cache.get((sh.key, index))
            if full is None:
                names = hf_names(sh.key, index, arch.untie_embeddings)
                full = to_megatron(arch, sh.key, [weights.get(n) for n in names], padded_vocab)
                cache = {(sh.key, index): full}  # the SwiGLU halves share one full tensor
            copy_slice(sh, full, WEIGHTS_FIELD, f"{directory}: {sh.key} (layer/expert {index})")
            filled += 1
    log.info("loaded Hugging Face weights from %s (%d parameter slices)", directory, filled)
    return filled


@torch.no_grad()
def hf_state_dict(
    chunk: MegatronModule, pg: ProcessGroupCollection, arch: ModelArch
) -> dict[str, torch.Tensor]:
    """A TP1/PP1 model's weights under Hugging Face names and layouts (for export)."""
    out: dict[str, torch.Tensor] = {}
    state = sharded_model_state(chunk, pg)
    for name, value in state.items():
        sh = value if isinstance(value, ShardedTensor) else None
        if isinstance(value, ShardedTensorFactory):
            sh = next(iter(nested_values(value.build())))
            tensor = value.data  # the whole [gate; up] at TP1
        elif sh is not None:
            tensor = sh.data
        else:
            continue
        if sh.global_shape[sh.prepend_axis_num :] != tuple(tensor.shape):
            raise ValueError(f"{name} is sharded ({sh.global_shape}); export needs TP1/PP1")
        index = tuple(sh.global_offset[: sh.prepend_axis_num])
        if sh.key == "output_layer.weight" and not arch.untie_embeddings:
            continue
        names = hf_names(sh.key, index, arch.untie_embeddings)
        for hf_name, part in zip(names, to_hf(arch, sh.key, tensor), strict=True):
            out[hf_name] = part.detach().contiguous().clone()
    return out
