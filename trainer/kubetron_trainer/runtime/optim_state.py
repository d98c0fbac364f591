"""The distributed optimizer's state in a checkpoint: Megatron-Core's `fully_reshardable`
format, written and read without gathering it on every rank.

Why this format: it stores the optimizer state in model space (one tensor per parameter and
state key, with the parameter's own key, shape and tensor-parallel layout), so a checkpoint
loads into another tensor, pipeline, expert or data-parallel shape. Megatron's default
`dp_reshardable` stores each rank's flat buffers and reloads only into the same TP/PP.

Why not Megatron's own writer of it: `DistributedOptimizer.sharded_param_state_fully_reshardable`
gathers the whole optimizer state (fp32 main weights and both Adam moments, 12 bytes a
parameter) into CPU tensors on every data-parallel rank, at save and at load: 98 GB a rank for
Qwen3-8B, twice that on a 2-GPU host (by these numbers what killed an 8B data-parallel run
while it wrote its final checkpoint). `lean_fully_reshardable` writes the same keys, shapes and
tensor layout (so either loader reads it) without the gather: each parameter's state is
written by the one data-parallel rank whose optimizer shard holds it, straight from the GPU,
and the few parameters that straddle two shards are summed over the data-parallel group first;
a load asks only for the parameters of this rank's shard and reads them in place.
`lean_optimizer_state` puts it in place of Megatron's method while `checkpoint` builds its
state dict.

The rest makes a saved state load into this run's optimizer: the sharding type and the
ChainedOptimizer key prefix a checkpoint was saved with, the param groups regrouped when the
expert-parallel degree (so the number of chained optimizers) changed, and two workarounds for
Megatron-Core 0.19's load without Transformer Engine or Apex (a fresh optimizer's missing
state, torch Adam's per-parameter `step`).
"""

from __future__ import annotations

import logging
from collections import ChainMap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.optimizer.optimizer import param_group_identifier_keys

from kubetron_trainer.runtime.optimizer import megatron_optimizers, torch_optimizers

log = logging.getLogger(__name__)

# How the distributed optimizer's state is saved (module docstring). Not 0.19's
# fully_sharded_model_space: it builds flattened ShardedTensors that 0.19's own checks reject
# ("ShardedTensor.flattened_range is not supported", seen on H100).
OPTIMIZER_SHARDING = "fully_reshardable"


# Megatron-Core's ChainedOptimizer puts `chained_<i>.` before the tensor keys of its i-th optimizer
# unless `chained_optim_avoid_prefix` is set. How many optimizers it chains depends on the shape:
# expert parameters get an optimizer of their own only at expert-parallel > 1 (Megatron marks
# them `allreduce=False` only then), so with the prefix an EP2 checkpoint's keys are not the keys
# an EP1 run asks for (KeyError "... from model not in state dict", seen on 2 H200s). Saved
# without it; a checkpoint saved with it (before) is loaded with it.
CHAINED_PREFIX = "chained_"


def saved_with_chained_prefix(source: Path) -> bool:
    """Whether a checkpoint's optimizer tensors carry the ChainedOptimizer's `chained_<i>.`."""
    keys = dist_checkpointing.load_tensors_metadata(str(source)).keys()
    return any(str(key).startswith(CHAINED_PREFIX) for key in keys)


def _group_id(group: dict[str, Any]) -> tuple[Any, ...]:
    """The tuple Megatron's DistributedOptimizer.load_state_dict matches param groups by."""
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys)


def regroup_optimizer_state(loaded: dict[Any, Any], optimizer: Any) -> dict[Any, Any]:
    """The loaded optimizer state in the layout of this run's optimizer chain.

    The tensors come back in the layout this run asked for; the rest (param groups with the
    step, the sharding type) in the layout of the run that saved them: one entry per chained
    optimizer, or flat when it chained one. When the two differ (an expert-parallel degree
    change: dense + expert optimizers at EP > 1, one optimizer at EP1), each of this run's
    optimizers gets its tensors and every saved param group; a group this run has and the
    checkpoint lacks (the expert groups, `is_expert_parallel`, after EP1) is the saved group
    that matches it in every other key. Unchanged when the layouts agree."""
    chain = megatron_optimizers(optimizer)
    saved_flat = "optimizer" in loaded
    indices = sorted(k for k in loaded if isinstance(k, int))
    saved = [loaded] if saved_flat else [loaded[i] for i in indices]
    if saved_flat == (len(chain) == 1) and (saved_flat or len(saved) == len(chain)):
        return loaded
    groups = [g for entry in saved for g in entry["optimizer"]["param_groups"]]
    known = {_group_id(g) for g in groups}
    flag = param_group_identifier_keys.index("is_expert_parallel")
    for opt in chain:
        for group in getattr(opt, "optimizer", opt).param_groups:
            want = _group_id(group)
            if want in known:
                continue
            for g in list(groups):
                have = _group_id(g)
                if have[:flag] + have[flag + 1 :] == want[:flag] + want[flag + 1 :]:
                    groups.append({**g, "is_expert_parallel": want[flag]})
                    known.add(want)
                    break
    sharding = saved[0]["param_state_sharding_type"]
    extra = {k: v for k, v in saved[0].items() if k == "grad_scaler"}
    if len(chain) == 1:
        tensors = [loaded["param_state"]]
    else:
        tensors = [loaded[i]["param_state"] for i in range(len(chain))]
    entries = [
        {"optimizer": {"param_groups": [dict(g) for g in groups]}, "param_state": t,
         "param_state_sharding_type": sharding, **extra}
        for t in tensors
    ]  # fmt: skip
    log.info(
        "optimizer state saved as %d chained optimizer(s), loaded into %d: param groups "
        "regrouped", len(saved), len(chain),
    )  # fmt: skip
    return entries[0] if len(chain) == 1 else dict(enumerate(entries))


def saved_optimizer_sharding(source: Path) -> str:
    """The distributed optimizer's sharding type a checkpoint was saved with (older kubetron
    checkpoints used dp_reshardable); loading must ask for the same one."""
    common = dist_checkpointing.load_common_state_dict(str(source))
    optimizer = common.get("optimizer") if isinstance(common, dict) else None
    if isinstance(optimizer, dict) and "param_state_sharding_type" in optimizer:
        return str(optimizer["param_state_sharding_type"])
    return OPTIMIZER_SHARDING


# Where Megatron's fully_reshardable format keeps a parameter's state: `<prefix>.<key>.<param>`.
STATE_PREFIX = "optimizer.state"


def _replica(replica_id: Any, main: bool) -> Any:
    """The model parameter's replica id with its data-parallel part (the last) set to 0 for the
    rank that writes or reads this shard (the main replica), to 1 for another rank; the other
    parts (a tensor-parallel replica of a norm weight, say) still decide."""
    dp = 0 if main else 1
    if isinstance(replica_id, tuple):
        return (*replica_id[:-1], dp)
    return dp


def _state_tensor(meta: Any, key: str, data: torch.Tensor, replica_id: Any) -> Any:
    """A model parameter's sharded metadata turned into one optimizer-state tensor of it
    (what Megatron's fully_reshardable format stores under `optimizer.state.<key>.<param>`)."""
    fields: dict[str, Any] = {"key": key, "data": data, "replica_id": replica_id}
    if not isinstance(meta, ShardedTensorFactory):
        fields["dtype"] = data.dtype
    out = replace(meta, **fields)
    out.validate_metadata_integrity()
    return out


def _state_entry(meta: Any, data: dict[str, torch.Tensor], main: bool) -> dict[str, Any]:
    """One parameter's entry of the format: each state key's tensor, `main` when this rank is
    the main replica (Megatron validates, at save and at load, that the main replicas of every
    key's shards cover it exactly once: the one rank that writes, or alone reads, a parameter's
    state is its main replica, the others holding part of it are not)."""
    replica = _replica(meta.replica_id, main=main)
    return {
        k: _state_tensor(meta, f"{STATE_PREFIX}.{k}.{meta.key}", t, replica)
        for k, t in data.items()
    }


def _buffer_params(opt: Any) -> list[tuple[int, Any, ChainMap]]:
    """Every parameter of the optimizer's gradient buffers, in Megatron's order (its index is
    the entry's key in the format), with the param map of this rank's shard of its buffer."""
    entries: list[tuple[int, Any, ChainMap]] = []
    for gbuf_idx, by_dtype in enumerate(opt.gbuf_ranges):
        if len(by_dtype) != 1:
            raise NotImplementedError("one dtype a gradient buffer, as Megatron's own format")
        (buckets,) = by_dtype.values()
        local = ChainMap(*(bucket["param_map"] for bucket in buckets))
        for param in opt.buffers[gbuf_idx].param_index_map:
            entries.append((len(entries), param, local))
    return entries


def _split_params(entries: list[tuple[int, Any, ChainMap]], group: Any) -> dict[int, int]:
    """The parameters split between optimizer shards: parameter index -> the lowest rank
    holding part of it. Collective: every rank of the data-parallel group must know them,
    since every rank joins the all-reduce of each one at save."""
    partial = [
        index
        for index, param, local in entries
        if param in local and local[param]["param"].size != param.numel()
    ]
    holders: list[list[int]] = [[] for _ in range(group.size())]
    dist.all_gather_object(holders, partial, group=group)
    split: dict[int, int] = {}
    for rank in range(group.size() - 1, -1, -1):
        split.update(dict.fromkeys(holders[rank], rank))
    return split


def _summed_over_dp(
    opt: Any, param: Any, local: ChainMap, keys: tuple[str, ...], shape: torch.Size, group: Any
) -> dict[str, torch.Tensor]:
    """A split parameter's whole state at save: each rank's part at its place in a zeroed
    buffer, summed over the data-parallel group (collective)."""
    mine = param in local
    tensors = opt._get_main_param_and_optimizer_states(param) if mine else {}
    whole: dict[str, torch.Tensor] = {}
    for k in keys:
        buf = torch.zeros(param.numel(), dtype=torch.float32, device=torch.cuda.current_device())
        if mine:
            part = local[param]["param"]
            buf[part.start : part.end].copy_(tensors[k].view(-1))
        dist.all_reduce(buf, group=group)
        whole[k] = buf.view(shape)
    return whole


def lean_fully_reshardable(
    opt: Any,
    model_sharded_state_dict: ShardedStateDict,
    is_loading: bool = False,
    metadata: dict[str, Any] | None = None,
) -> dict[int, dict[str, Any]]:
    """Megatron's `fully_reshardable` optimizer state without gathering it on every rank.

    Megatron's DistributedOptimizer.sharded_param_state_fully_reshardable builds, on every
    data-parallel rank, CPU tensors of the whole model's fp32 main weights and Adam moments
    (zero-filled on load too). Here: the same entries (parameter index -> {param, exp_avg,
    exp_avg_sq} in model space, the model parameter's key, shape and tensor-parallel layout),
    but a rank lists only the parameters its optimizer shard holds whole, as views of its own
    GPU state: at save the main replica, at load the tensors read in place. A parameter split
    between shards (at most data-parallel size - 1 a bucket) is summed over the data-parallel
    group at save and written by the lowest rank holding part of it; at load each rank holding
    part of it reads the whole parameter into a host tensor and keeps its part. Megatron's own
    `load_parameter_state_from_fully_reshardable` then reads these entries unchanged (it skips
    the parameters a rank does not hold before looking them up)."""
    del metadata
    sharded, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    meta_of = {sh.data: sh for sh in nested_values(sharded)}
    group = opt.data_parallel_group
    me = group.rank()
    keys = ("param", *opt.optimizer_state_keys)
    entries = _buffer_params(opt)
    split = _split_params(entries, group)
    out: dict[int, dict[str, Any]] = {}
    for index, param, local in entries:
        mine = param in local
        if not mine and index not in split:
            continue
        try:
            meta = meta_of[param]
        except KeyError as err:
            raise ValueError(
                f"model parameter {tuple(param.shape)} not in the model state"
            ) from err
        shape = meta.data.shape
        if index not in split:  # whole on this rank: its own GPU state, no copy
            tensors = opt._get_main_param_and_optimizer_states(param)
            out[index] = _state_entry(meta, {k: tensors[k].view(shape) for k in keys}, main=True)
        elif is_loading:
            if mine:
                data = {k: torch.empty(shape, dtype=torch.float32) for k in keys}
                out[index] = _state_entry(meta, data, main=split[index] == me)
        else:
            whole = _summed_over_dp(opt, param, local, keys, shape, group)
            if split[index] == me:
                out[index] = _state_entry(meta, whole, main=True)
    return out


@contextmanager
def lean_optimizer_state(optimizer: Any) -> Iterator[None]:
    """While inside, every distributed optimizer of the chain builds its fully_reshardable
    state with `lean_fully_reshardable` (the method is replaced on the instance only)."""
    patched = []
    for opt in megatron_optimizers(optimizer):
        if hasattr(opt, "gbuf_ranges") and hasattr(opt, "sharded_param_state_fully_reshardable"):

            def lean(model_sd: Any, is_loading: bool = False, metadata: Any = None,
                     opt: Any = opt) -> Any:  # fmt: skip
                return lean_fully_reshardable(opt, model_sd, is_loading, metadata)

            opt.sharded_param_state_fully_reshardable = lean
            patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt.sharded_param_state_fully_reshardable


def init_fresh_optimizer_state(optimizer: Any) -> None:
    """Give a fresh Megatron optimizer the state entries that loading reads before it loads.

    Without Transformer Engine or Apex, Megatron-Core 0.19's DistributedOptimizer.state_dict()
    (called by sharded_state_dict, also when loading) takes the step from the torch optimizer's
    per-parameter state, which a freshly built optimizer does not have yet ("assert len(steps)
    == 1", seen on 2 H100s resuming a checkpoint). Zero moments and step 0, as Megatron's own
    init_state_fn plus a step; every value is replaced by the checkpoint's. The CPU optimizer
    has no init_state_fn and is left alone.
    """
    for opt in megatron_optimizers(optimizer):
        inner, init = getattr(opt, "optimizer", None), getattr(opt, "init_state_fn", None)
        if inner is None or init is None:
            continue
        init(inner, getattr(opt, "config", None))
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.tensor(0.0))


def _steps_to_floats(opt: torch.optim.Optimizer) -> None:
    for state in opt.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = float(state["step"])


@contextmanager
def steps_aside_while_loading(optimizer: Any) -> Iterator[None]:
    """Keep torch Adam's per-parameter `step` out of Megatron's parameter-state copy.

    Megatron-Core 0.19's DistributedOptimizer.load_state_dict without Transformer Engine or
    Apex first loads the torch optimizer (every parameter's state then holds a tensor `step`),
    then copies each saved tensor into the state's tensors by key from a source that has no
    `step`: KeyError 'step' (seen on an H100 resuming a fully_reshardable checkpoint). A
    post-hook on the torch optimizer's own load turns each `step` into a float, which that copy
    skips; on the way out the steps become fp32 tensors again (torch Adam needs tensors).
    """
    inners = torch_optimizers(optimizer)
    hooks = [opt.register_load_state_dict_post_hook(_steps_to_floats) for opt in inners]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for opt in inners:
            for state in opt.state.values():
                step = state.get("step")
                if step is not None and not isinstance(step, torch.Tensor):
                    state["step"] = torch.tensor(float(step), dtype=torch.float32)
