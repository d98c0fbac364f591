"""LoRA adapters on Megatron-Core's parallel linear layers (`recipe.peft`), without Transformer
Engine: fine-tuning that trains a few million adapter numbers on top of frozen base weights.

Each target layer (`LORA_TARGETS`: qkv, proj, fc1, fc2 -> Megatron's `linear_qkv`,
`linear_proj`, `linear_fc1`, `linear_fc2`) computes `y = W x + (alpha / r) B A dropout(x)`
with W frozen and A, B trained, as peft's LoRA does. The layer keeps its class's forward, its
parameters and their checkpoint keys; `apply_lora` changes its class to one with the adapter
added (`lora_class`: Megatron's `ColumnParallelLinear`/`RowParallelLinear`, or the fast path's
fp8 subclasses of them), after the base weights were loaded.

Fused layers. Megatron fuses q, k and v into `linear_qkv` (rows interleaved per query group: the
group's query heads, then its key and its value head) and the SwiGLU gate and up projections
into `linear_fc1` (`[gate; up]`); peft adapts `q_proj`, `k_proj`, `v_proj` (`gate_proj`,
`up_proj`) separately, each with its own rank-r pair. One rank-r adapter on the fused layer
would not be the same model (its A is shared by q, k and v), so a fused layer with n parts has
A = [A_1; ...; A_n] (n r x in) and a block-diagonal B: each output row of part i reads only the
r columns of A_i. B is stored compact, `[out, r]` (row j holds the r numbers of its own part's
block), and expanded to `[out, n r]` with a fixed part mask in the forward pass, so the other
blocks stay exactly zero through training (their gradient is masked to zero). The rows of B
follow W's rows, so the fused layout of B is W's: `hf_weights.fuse_qkv` / `split_qkv` map q, k
and v's B to it and back, fc1's is `[B_gate; B_up]`. Export reverses the mapping exactly.

Tensor parallelism (every shape of W's sharding):

- Column-parallel (qkv, fc1; W split along its output rows): A is replicated (the full input
  dimension to n r), B is split along the output rows like W. `h = A x` is the same on every
  tensor rank; it enters B through Megatron's copy-to-tensor-parallel region (identity forward,
  all-reduce backward), so A's gradient and the input gradient sum every rank's rows of B.
  With sequence parallelism x is first gathered along the sequence (backward: each rank keeps
  its part, the input gradient being complete on every rank already).
- Row-parallel (proj, fc2; W split along its input columns): A is split along the input like W,
  B replicated. Each rank's `A_t x_t` is a partial sum, all-reduced (Megatron's reduce-from
  region; identity backward) before B: r numbers a token, not the layer's output width. The
  adapter's output is complete on every rank and added after W's reduction (with sequence
  parallelism: this rank's part of the sequence).

Pipeline parallelism needs nothing: adapters live in the layers of each stage's chunks.
Initialisation as peft's: A Kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B
zero, drawn from a generator seeded by (seed, layer, peft module) as the full tensor and sliced
to this rank, so every parallel shape starts from the same adapters. `recipe.peft.adapters`
starts from a peft adapter directory instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from kubetron_api.config import ModelArch, PeftSpec
from kubetron_api.exitcodes import ConfigError
from kubetron_trainer.models.hf_weights import fuse_qkv, split_qkv

log = logging.getLogger(__name__)
FIELD = "spec.recipe.peft"
ADAPTERS_FIELD = "spec.recipe.peft.adapters"
PARAMS = ("lora_A", "lora_B")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers."
# Each target of recipe.peft: its Megatron-Core layer under a transformer layer, and the
# Hugging Face (peft) modules under `model.layers.<i>.` it stands for, in Megatron's order.
LORA_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkv": (
        "self_attention.linear_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    "proj": ("self_attention.linear_proj", ("self_attn.o_proj",)),
    "fc1": ("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj")),
    "fc2": ("mlp.linear_fc2", ("mlp.down_proj",)),
}  # fmt: skip


# --------------------------------------------------------------------------- layout


def target_of(key: str) -> str | None:
    """The LoRA target whose layer a Megatron key (`...layers.<module path>.<param>`) is in."""
    for target, (path, _) in LORA_TARGETS.items():
        if f".{path}." in f".{key}":
            return target
    return None


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict or checkpoint key is an adapter's (`...linear_qkv.lora_A`)."""
    return key.rsplit(".", 1)[-1] in PARAMS


def parts(arch: ModelArch, target: str) -> int:
    """peft modules in the target's Megatron layer: q, k, v; gate, up; or one."""
    return len(LORA_TARGETS[target][1]) if target != "fc1" or arch.swiglu else 1


def peft_modules(arch: ModelArch, target: str) -> tuple[str, ...]:
    """peft's module paths under `model.layers.<i>.` of one target (a GELU fc1 is `up_proj`)."""
    modules = LORA_TARGETS[target][1]
    return modules if parts(arch, target) == len(modules) else modules[-1:]


def rows_per_part(arch: ModelArch, target: str, rows: int) -> list[int]:
    """The output rows of each peft module of the target's layer (`rows`: the layer's, full)."""
    if target == "qkv":
        kv = arch.num_query_groups * arch.kv_channels
        return [arch.num_attention_heads * arch.kv_channels, kv, kv]
    n = parts(arch, target)
    return [rows // n] * n


def local_parts(arch: ModelArch, target: str, rows: int, tp: int, tp_rank: int) -> torch.Tensor:
    """Which peft module each of this rank's `rows` output rows belongs to: q, k and v
    interleaved per query group as W's rows (a rank holds whole groups), a SwiGLU fc1's rank
    holds its gate rows, then its up rows."""
    if target != "qkv":
        n = parts(arch, target)
        return torch.arange(n).repeat_interleave(rows // n)
    index = [torch.full((n, 1), float(i)) for i, n in enumerate(rows_per_part(arch, "qkv", 0))]
    full = fuse_qkv(arch, *index).view(-1).long()
    return full.view(tp, -1)[tp_rank]


def fuse(arch: ModelArch, target: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """peft's (A_i, B_i) of one target's modules -> the Megatron layer's full A (n r x in) and
    compact B (out x r)."""
    a = torch.cat([p[0] for p in pairs])
    bs = [p[1] for p in pairs]
    b = fuse_qkv(arch, *bs) if target == "qkv" else torch.cat(bs)
    return a, b


def unfuse(
    arch: ModelArch, target: str, a: torch.Tensor, b: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of `fuse`: the (A_i, B_i) of peft's modules, in `peft_modules` order."""
    n = parts(arch, target)
    bs = split_qkv(arch, b) if target == "qkv" else b.chunk(n)
    return list(zip(a.chunk(n), bs, strict=True))


def init_part(seed: int, layer: int, module: str, rank: int, fan_in: int) -> torch.Tensor:
    """peft's A of one module (Kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), drawn
    from a generator seeded by (seed, layer, module): the same in every parallel shape."""
    digest = hashlib.sha256(f"kubetron-lora:{seed}:{layer}:{module}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") % 2**63)
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(rank, fan_in).uniform_(-bound, bound, generator=generator)


def initial_pairs(
    arch: ModelArch, peft: PeftSpec, seed: int, layer: int, target: str, shape: tuple[int, int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """peft's initial (A, B = 0) of each module of `target` in `layer` (0-based, global);
    `shape` is the layer's full (out, in)."""
    rows = rows_per_part(arch, target, shape[0])
    return [
        (init_part(seed, layer, m, peft.rank, shape[1]), torch.zeros(n, peft.rank))
        for m, n in zip(peft_modules(arch, target), rows, strict=True)
    ]


# --------------------------------------------------------------------------- the layers


class LoraLayer:
    """The adapter of a Megatron parallel linear layer; mixed in ahead of the layer's class."""

    lora_A: torch.nn.Parameter
    lora_B: torch.nn.Parameter
    lora_part: torch.Tensor  # this rank's output rows -> their module (column-parallel)
    lora_parts: int
    lora_scale: float
    lora_dropout: float
    lora_gated: bool  # fc1 of a SwiGLU model: B's checkpoint halves like W's
    tp_group: Any
    sequence_parallel: bool
    weight: torch.nn.Parameter

    column: bool = True

    def forward(self, input_: torch.Tensor, *args: Any, **kw: Any) -> tuple[Any, Any]:
        out, bias = super().forward(input_, *args, **kw)  # type: ignore[misc]
        return out + self.lora_scale * self.adapter(input_), bias

    def _dropout(self, x: torch.Tensor, sharded: bool) -> torch.Tensor:
        if not self.lora_dropout or not self.training:  # type: ignore[attr-defined]
            return x
        if sharded and x.is_cuda:  # a shard of the features: a mask of this tensor rank's own
            with get_cuda_rng_tracker().fork():
                return torch.nn.functional.dropout(x, self.lora_dropout, True)
        return torch.nn.functional.dropout(x, self.lora_dropout, True)

    def blocks(self) -> torch.Tensor:
        """B as the block matrix `[out, n r]`: row j holds its r numbers in its module's block."""
        if self.lora_parts == 1:
            return self.lora_B
        return torch.cat(
            [self.lora_B * (self.lora_part == i)[:, None].to(self.lora_B.dtype)
             for i in range(self.lora_parts)], dim=1,
        )  # fmt: skip

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """B A dropout(x) on this rank: this rank's output columns (column-parallel) or the
        whole output (row-parallel), as W's output is before its reduction."""
        group = self.tp_group
        if self.column:
            if self.sequence_parallel:  # the whole sequence; backward keeps this rank's part
                x = gather_from_sequence_parallel_region(
                    x, tensor_parallel_output_grad=False, group=group
                )
            h = torch.nn.functional.linear(self._dropout(x, sharded=False), self.lora_A)
            h = copy_to_tensor_model_parallel_region(h, group=group)
            return torch.nn.functional.linear(h, self.blocks())
        h = torch.nn.functional.linear(self._dropout(x, sharded=True), self.lora_A)
        h = reduce_from_tensor_model_parallel_region(h, group=group)
        out = torch.nn.functional.linear(h, self.lora_B)
        if self.sequence_parallel:
            out = scatter_to_sequence_parallel_region(out, group=group)
        return out

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        """W's entries as the layer writes them, and the adapters sharded like W on the axis
        they split: B's rows (column-parallel; SwiGLU halves as fc1's weight) or A's columns
        (row-parallel); the replicated one once."""
        state: dict[str, Any] = super().sharded_state_dict(  # type: ignore[misc]
            prefix, sharded_offsets, metadata
        )
        for name in PARAMS:
            state.pop(f"{prefix}{name}", None)
        assert metadata is not None
        axis = {"lora_B": 0} if self.column else {"lora_A": 1}
        own = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        adapters = make_sharded_tensors_for_checkpoint(
            own, prefix, axis, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )  # fmt: skip
        if self.lora_gated:
            key = f"{prefix}lora_B"
            adapters[key] = apply_swiglu_sharded_factory(
                adapters[key], sharded_offsets, tp_group=self.tp_group,
                dp_group=metadata["dp_cp_group"],
            )  # fmt: skip
        return {**state, **adapters}


_classes: dict[type, type] = {}


def lora_class(base: type) -> type:
    """`base` (a Megatron column- or row-parallel linear layer class) with the adapter."""
    if base not in _classes:
        if issubclass(base, ColumnParallelLinear):
            column = True
        elif issubclass(base, RowParallelLinear):
            column = False
        else:
            raise ConfigError(
                FIELD,
                f"LoRA adapts Megatron-Core's local-spec linear layers; this model's are "
                f"{base.__name__} (Transformer Engine's spec, which fuses the input norm into "
                "them): run with fastPath on (the default) or --attention sdpa",
            )
        _classes[base] = type(f"Lora{base.__name__}", (LoraLayer, base), {"column": column})
    return _classes[base]


def add_adapter(
    layer: torch.nn.Module, arch: ModelArch, peft: PeftSpec, target: str, gated: bool
) -> None:
    """Turn `layer` into its LoRA class and give it zero adapters of this rank's shape."""
    layer.__class__ = lora_class(type(layer))
    weight: torch.Tensor = layer.weight  # type: ignore[assignment]
    out, inp = weight.shape
    n = parts(arch, target)
    lora: Any = layer
    tp, tp_rank = lora.tp_group.size(), lora.tp_group.rank()
    if lora.column:  # A replicated (full input), B this rank's rows
        if lora.gather_output:
            raise ConfigError(FIELD, f"LoRA on {target}: a layer that gathers its output")
        shapes, split = ((n * peft.rank, inp), (out, peft.rank)), "lora_B"
        local = local_parts(arch, target, out, tp, tp_rank)
    else:  # A this rank's input columns, B replicated
        shapes, split = ((peft.rank, inp), (out, peft.rank)), "lora_A"
        local = torch.zeros(out, dtype=torch.long)
    for name, shape in zip(PARAMS, shapes, strict=True):
        param = torch.nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device))
        if name == split:
            set_tensor_model_parallel_attributes(param, True, 0 if lora.column else 1, 1)
        layer.register_parameter(name, param)
    layer.register_buffer("lora_part", local.to(weight.device), persistent=False)
    lora.lora_parts, lora.lora_scale, lora.lora_dropout = n, peft.scale, peft.dropout
    lora.lora_gated = gated


def target_layers(chunk: torch.nn.Module, targets: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """(target, layer) of every target linear layer in a model chunk's transformer layers."""
    for block in chunk.decoder.layers:  # type: ignore[union-attr]
        for target in targets:
            module: Any = block
            for name in LORA_TARGETS[target][0].split("."):
                module = getattr(module, name)
            yield target, module


def adapter_entries(chunk: MegatronModule, pg: ProcessGroupCollection) -> Iterator[Any]:
    """(layer, target, param name, ShardedTensor) of each adapter slice of the chunk on this
    rank (SwiGLU halves built); the ShardedTensor's data is a view of the parameter."""
    from kubetron_trainer.models.hf_weights import sharded_tensors
    from kubetron_trainer.runtime.checkpoint import sharded_model_state

    for _, sh in sharded_tensors(sharded_model_state(chunk, pg)):
        if is_adapter_key(sh.key):
            layer = int(sh.global_offset[0])
            target = target_of(sh.key)
            assert target is not None, sh.key
            yield layer, target, sh.key.rsplit(".", 1)[-1], sh


FullAdapters = Callable[[int, str, tuple[int, int]], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def fill_adapters(
    chunks: list[MegatronModule], targets: Sequence[str], pg: ProcessGroupCollection,
    full: FullAdapters,
) -> int:  # fmt: skip
    """Copy this rank's slice of each adapter from `full(layer, target, (out, in))`, the
    layer's full Megatron-layout (A, compact B); returns the slices filled."""
    from kubetron_trainer.models.hf_weights import copy_slice

    filled = 0
    cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for chunk in chunks:
        shapes = layer_shapes(chunk, targets, pg)
        for layer, target, name, sh in adapter_entries(chunk, pg):
            if (layer, target) not in cache:
                cache[(layer, target)] = full(layer, target, shapes[target])
            tensor = cache[(layer, target)][PARAMS.index(name)]
            copy_slice(sh, tensor, ADAPTERS_FIELD, f"the {target} adapter {name} of layer {layer}")
            filled += 1
    return filled


def layer_shapes(
    chunk: Any, targets: Sequence[str], pg: ProcessGroupCollection
) -> dict[str, tuple[int, int]]:
    """Each target's full (out, in) of W: its local shape, times the tensor degree on the
    axis it splits."""
    tp, shapes = pg.tp.size(), {}
    for target, layer in target_layers(chunk, targets):
        out, inp = layer.weight.shape
        column = isinstance(layer, ColumnParallelLinear)
        shapes[target] = (out * tp, inp) if column else (out, inp * tp)
    return shapes


def apply_lora(
    chunks: list[MegatronModule], arch: ModelArch, peft: PeftSpec, pg: ProcessGroupCollection,
    seed: int,
) -> int:  # fmt: skip
    """Freeze every parameter of the chunks, add the adapters of `peft` to the target layers
    and initialise them (peft's way from `seed`, or from `peft.adapters`); returns the number
    of trainable parameters on this rank."""
    if arch.is_moe and {"fc1", "fc2"} & set(peft.targets):
        raise ConfigError(FIELD, "LoRA on fc1/fc2 needs a dense MLP; this model is MoE")
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)
        for target, layer in target_layers(chunk, peft.targets):
            add_adapter(layer, arch, peft, target, gated=target == "fc1" and arch.swiglu)
    if peft.adapters is not None:
        source = PeftAdapters(Path(peft.adapters), arch, peft)
        fill_adapters(chunks, peft.targets, pg, source.full)
        how = f"from {peft.adapters}"
    else:

        def initial(layer: int, target: str, shape: tuple[int, int]) -> tuple:
            return fuse(arch, target, initial_pairs(arch, peft, seed, layer, target, shape))

        fill_adapters(chunks, peft.targets, pg, initial)
        how = f"peft's initialisation from seed {seed}"
    trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    log.info(
        "LoRA r=%d alpha=%g dropout=%g on %s: %d trainable parameters on this rank, base "
        "frozen; adapters %s", peft.rank, peft.alpha, peft.dropout, ",".join(peft.targets),
        trainable, how,
    )  # fmt: skip
    return trainable


# --------------------------------------------------------------------------- peft's format


def peft_key(layer: int, module: str, name: str) -> str:
    """peft's key of one adapter tensor (`name` lora_A or lora_B) in adapter_model.safetensors."""
    return f"{PEFT_PREFIX}{layer}.{module}.{name}.weight"


def target_modules(arch: ModelArch, targets: Sequence[str]) -> list[str]:
    """peft's target_modules of `targets`: the last name of each module path."""
    return [m.rsplit(".", 1)[-1] for t in targets for m in peft_modules(arch, t)]


def adapter_config(arch: ModelArch, peft: PeftSpec, base: str | None) -> dict[str, Any]:
    """adapter_config.json of the adapters: peft's LoraConfig fields."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": peft.rank,
        "lora_alpha": peft.alpha, "lora_dropout": peft.dropout,
        "target_modules": target_modules(arch, peft.targets), "bias": "none",
        "base_model_name_or_path": base, "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }  # fmt: skip


AdapterTensors = dict[tuple[str, str], torch.Tensor]  # (target, lora_A/B) -> [layers, ...]


def peft_pairs(
    arch: ModelArch, peft: PeftSpec, tensors: AdapterTensors
) -> Iterator[tuple[int, str, torch.Tensor, torch.Tensor]]:
    """(layer, peft module path, A, B) of each peft module, from the full Megatron-layout
    adapters of a checkpoint stacked over the layers."""
    for target in peft.targets:
        a_all, b_all = tensors[(target, "lora_A")], tensors[(target, "lora_B")]
        for layer in range(a_all.shape[0]):
            pairs = unfuse(arch, target, a_all[layer], b_all[layer])
            for module, (a, b) in zip(peft_modules(arch, target), pairs, strict=True):
                yield layer, module, a, b


def to_peft(arch: ModelArch, peft: PeftSpec, tensors: AdapterTensors) -> dict[str, torch.Tensor]:
    """peft's adapter tensors (adapter_model.safetensors) of a checkpoint's adapters."""
    out: dict[str, torch.Tensor] = {}
    for layer, module, a, b in peft_pairs(arch, peft, tensors):
        out[peft_key(layer, module, "lora_A")] = a.contiguous()
        out[peft_key(layer, module, "lora_B")] = b.contiguous()
    return out


class PeftAdapters:
    """A peft adapter directory that `recipe.peft.adapters` starts from, checked against the
    recipe: its r, lora_alpha and target modules, and every tensor the model needs."""

    def __init__(self, directory: Path, arch: ModelArch, peft: PeftSpec) -> None:
        from safetensors.torch import load_file

        self.arch = arch
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise ConfigError(
                ADAPTERS_FIELD, f"{directory} has no {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
        config = json.loads(config_path.read_text())
        wanted = {"r": peft.rank, "lora_alpha": peft.alpha,
                  "target_modules": sorted(target_modules(arch, peft.targets))}  # fmt: skip
        found = {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                 "target_modules": sorted(config.get("target_modules") or [])}  # fmt: skip
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            found["rank_pattern/alpha_pattern"] = "set"
        diffs = [f"{k} {found[k]!r} (recipe: {wanted.get(k)!r})" for k in found
                 if found[k] != wanted.get(k)]  # fmt: skip
        if diffs or config.get("peft_type") != "LORA":
            raise ConfigError(
                ADAPTERS_FIELD,
                f"{directory} holds other adapters than recipe.peft asks for: "
                f"{'; '.join(diffs) or 'peft_type ' + str(config.get('peft_type'))}",
            )
        self.tensors = load_file(str(weights_path))

    def get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ConfigError(ADAPTERS_FIELD, f"the adapters have no tensor {key}")
        return self.tensors[key].float()

    def full(self, layer: int, target: str, shape: tuple[int, int]) -> tuple:
        """`FullAdapters` of the directory: its modules' tensors fused into the layer's."""
        modules = peft_modules(self.arch, target)
        pairs = [(self.get(peft_key(layer, m, "lora_A")), self.get(peft_key(layer, m, "lora_B")))
                 for m in modules]  # fmt: skip
        return fuse(self.arch, target, pairs)
