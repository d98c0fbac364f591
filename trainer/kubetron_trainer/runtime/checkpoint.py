"""Checkpoints with `megatron.core.dist_checkpointing` (torch_dist), crash-safe and resumable
into another parallel shape.

Layout under `checkpoint.path` (see `ckpt_meta`): one directory per saved step
(`iter_0000010/`) and a `latest` file holding the step of the newest complete checkpoint. Every
rank writes its shards into the step's directory; after all ranks finished, rank 0 writes the
step's `kubetron.json` (format version, model, parallel shape, consumed samples) and then
replaces `latest`, both atomically (temporary file, fsync, `os.replace`). A crash or preemption
mid-save therefore never leaves `latest` pointing at a partial checkpoint: the next start
resumes from the previous one, and the partial directory is removed before it is written again.

A checkpoint holds the model chunks' sharded state (with `metadata={'dp_cp_group': pg.dp_cp}`),
the optimizer's state sharded like the parameters, the LR scheduler, every rank's RNG states and
the step. Model and optimizer state are ShardedTensors in model space, so Megatron's loader
reshards them into any data-parallel size and tensor/pipeline degree. A rank's RNG states belong
to its position in the grid that saved them: they are loaded only when the shape is the same,
otherwise every rank is re-seeded from (seed, step, its position) (`seeding.reseed_for_resume`).
The data position is the consumed samples in `kubetron.json` (`data.Batches`).

Host memory. Megatron-Core's `fully_reshardable` optimizer format gathers the whole optimizer
state (fp32 main weights and both Adam moments, 12 bytes a parameter) into CPU tensors on every
data-parallel rank, at save and at load: 98 GB a rank for Qwen3-8B, twice that on a 2-GPU host
(by these numbers what killed an 8B data-parallel run while it wrote its final checkpoint). Here
the same format (the same keys, shapes and tensor layout, so either loader reads it) is written
without the gather: each parameter's state is written by the one data-parallel rank whose
optimizer shard holds it, straight from the GPU, and the few parameters that straddle two shards
are summed over the data-parallel group first; a load asks only for the parameters of this
rank's shard and reads them in place. Synchronous saves go through torch DCP's FileSystemWriter,
which copies one tensor at a time to the host; an asynchronous save (`checkpoint.asyncSave`)
copies this rank's whole share to the host first (that is what lets training go on) and writes
it from a forked process while the next steps run.
"""

from __future__ import annotations

import logging
import random
import resource
import shutil
import time
from collections import ChainMap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedStateDict,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.optimizer.optimizer import param_group_identifier_keys
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from torch.distributed.checkpoint import FileSystemWriter

from kubetron_api.ckpt_meta import (
    LATEST,
    RunIdentity,
    check_fence,
    plan_resume,
    read_latest,
    step_dir,
    write_latest,
    write_step_meta,
)
from kubetron_trainer.runtime.seeding import reseed_for_resume, resume_seed
from kubetron_trainer.runtime.step_common import megatron_optimizers, torch_optimizers

__all__ = ["LATEST", "Checkpointer", "Resumed", "read_latest", "step_dir", "write_latest"]
log = logging.getLogger(__name__)
# How the distributed optimizer's state is saved. fully_reshardable stores it in model space
# (one tensor per parameter, like a plain optimizer), so a checkpoint loads into another TP/PP/DP
# shape; Megatron's default dp_reshardable stores the flat per-rank buffers and reloads only into
# the same TP/PP. Its cost: each save all-gathers the optimizer state over the dp group.
# (0.19's fully_sharded_model_space builds flattened ShardedTensors that 0.19's own checks reject,
# "ShardedTensor.flattened_range is not supported", seen on H100.)
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


class PortableWriter(FileSystemWriter):
    """DCP's FileSystemWriter recording the checkpoint directory as a string: a pickled Path
    from Python 3.13 (`pathlib._local`) does not unpickle in older Pythons (package __init__)."""

    @property
    def checkpoint_id(self) -> str:
        return str(super().checkpoint_id)


class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """Megatron's torch_dist format, written by torch DCP's plain synchronous FileSystemWriter.

    Megatron-Core 0.19 always saves through its async writer, even synchronously: it first
    copies every tensor this rank writes to the host (a host copy of the rank's whole share of
    the checkpoint), and its staging calls `torch.cuda.synchronize()` unconditionally
    (filesystem_async.preload_tensors), so it fails on a machine without CUDA. DCP's writer
    copies one tensor at a time (`thread_count` files a rank, written in parallel). The files
    are the same torch DCP layout plus Megatron's metadata, loaded by Megatron's ordinary
    torch_dist load strategy. Every synchronous save, CPU and GPU.
    """

    def __init__(self, thread_count: int = 1) -> None:
        super().__init__("torch_dist", 1)
        self.writer_threads = thread_count

    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Path) -> None:
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        torch.distributed.checkpoint.save(
            mcore_to_pyt_state_dict(flat, False),
            storage_writer=PortableWriter(checkpoint_dir, thread_count=self.writer_threads),
            planner=MCoreSavePlanner(
                dedup_replicated_tensors=not self.keep_only_main_replica,
                flatten_state_dict=False,
                flatten_sharded_tensors=False,
            ),
        )


# Files a rank writes in parallel in a synchronous GPU save (DCP's FileSystemWriter threads).
GPU_WRITER_THREADS = 4


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
    prefix = "optimizer.state"

    # which parameters each rank holds only part of: every rank joins their all-reduces
    entries: list[tuple[int, Any, ChainMap]] = []
    partial: list[int] = []
    index = -1
    for gbuf_idx, by_dtype in enumerate(opt.gbuf_ranges):
        if len(by_dtype) != 1:
            raise NotImplementedError("one dtype a gradient buffer, as Megatron's own format")
        (buckets,) = by_dtype.values()
        local = ChainMap(*(bucket["param_map"] for bucket in buckets))
        for param in opt.buffers[gbuf_idx].param_index_map:
            index += 1
            entries.append((index, param, local))
            if param in local:
                part = local[param]["param"]
                if part.size != param.numel():
                    partial.append(index)
    holders: list[list[int]] = [[] for _ in range(group.size())]
    dist.all_gather_object(holders, partial, group=group)
    split: dict[int, int] = {}  # parameter index -> the lowest rank holding part of it
    for rank in range(group.size() - 1, -1, -1):
        split.update(dict.fromkeys(holders[rank], rank))

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
        tensors = opt._get_main_param_and_optimizer_states(param) if mine else {}
        # Megatron validates, at save and at load, that the main replicas of every key's
        # shards cover it exactly once: the one rank that writes (or alone reads) a
        # parameter's state is its main replica, the others holding part of it are not
        if index not in split:  # whole on this rank: its own GPU state, no copy
            data = {k: tensors[k].view(shape) for k in keys}
            replica = _replica(meta.replica_id, main=True)
            out[index] = {k: _state_tensor(meta, f"{prefix}.{k}.{meta.key}", data[k], replica)
                          for k in keys}  # fmt: skip
            continue
        if is_loading:
            if mine:
                data = {k: torch.empty(shape, dtype=torch.float32) for k in keys}
                replica = _replica(meta.replica_id, main=split[index] == me)
                out[index] = {
                    k: _state_tensor(meta, f"{prefix}.{k}.{meta.key}", data[k], replica)
                    for k in keys
                }
            continue
        whole = {}
        for k in keys:
            buf = torch.zeros(
                param.numel(), dtype=torch.float32, device=torch.cuda.current_device()
            )
            if mine:
                part = local[param]["param"]
                buf[part.start : part.end].copy_(tensors[k].view(-1))
            dist.all_reduce(buf, group=group)
            whole[k] = buf.view(shape)
        if split[index] == me:
            replica = _replica(meta.replica_id, main=True)
            out[index] = {k: _state_tensor(meta, f"{prefix}.{k}.{meta.key}", whole[k], replica)
                          for k in keys}  # fmt: skip
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


def peak_rss_gib() -> float:
    """This process's peak resident host memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextmanager
def _megatron_dp_rank(rank: int) -> Iterator[None]:
    """Megatron-Core 0.19 reads the global data-parallel rank for the tied output layer of the
    last pipeline stage (LanguageModule.tie_embeddings_and_output_weights_state_dict), which
    fails without parallel_state's groups: lend it this rank's dp-cp rank meanwhile."""
    before = parallel_state._MPU_DATA_PARALLEL_RANK
    parallel_state._MPU_DATA_PARALLEL_RANK = rank
    try:
        yield
    finally:
        parallel_state._MPU_DATA_PARALLEL_RANK = before


def sharded_model_state(chunk: MegatronModule, pg: ProcessGroupCollection) -> ShardedStateDict:
    """One model chunk's sharded state dict on this rank's groups (what a checkpoint holds)."""
    with _megatron_dp_rank(pg.dp_cp.rank()):
        return chunk.sharded_state_dict(metadata={"dp_cp_group": pg.dp_cp})


def _init_fresh_optimizer_state(optimizer: Any) -> None:
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


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        get_cuda_rng_tracker().set_states(state["tracker"])


@dataclass(frozen=True)
class Resumed:
    """What `Checkpointer.load_latest` restored."""

    step: int
    consumed_samples: int  # the data position: samples read before step `step + 1`
    rng: str  # "restored" (same shape) or "re-seeded" (another shape, or a legacy checkpoint)


@dataclass
class PendingSave:
    """An asynchronous save written in the background, finalized later on every rank."""

    step: int
    began: float  # perf_counter at the start of the save
    blocked_s: float  # what training waited for: planning and the copy to the host
    queue: Any  # Megatron's AsyncCallsQueue holding the request


class Checkpointer:
    """Saves and loads the whole training state of this rank under `root`.

    `async_save` (GPU only): `save` plans the save, copies this rank's tensors to the host and
    returns while a forked process writes them; `finalize` (called at each step boundary, and
    blocking before another save, at the end and on SIGTERM) completes it on every rank: DCP's
    and Megatron's metadata, then `kubetron.json` and `latest`, so `latest` never names a step
    whose files are still being written."""

    def __init__(
        self,
        root: Path,
        chunks: list[MegatronModule],
        optimizer: Any,
        scheduler: OptimizerParamScheduler,
        pg: ProcessGroupCollection,
        device: torch.device,
        identity: RunIdentity,
        async_save: bool = False,
    ) -> None:
        self.root = root
        self.chunks = chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.pg = pg
        self.device = device
        self.identity = identity
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        if async_save and device.type != "cuda":
            log.warning("checkpoint.asyncSave needs CUDA (Megatron's async writer); saving "
                        "synchronously on %s", device.type)  # fmt: skip
        self.async_save = async_save and device.type == "cuda"
        self.pending: PendingSave | None = None
        self.on_saved: Callable[[int, float], None] | None = None  # (step, seconds)

    def _model_state(self) -> dict[str, Any]:
        if len(self.chunks) == 1:
            return {"model": sharded_model_state(self.chunks[0], self.pg)}
        return {
            f"model{i}": sharded_model_state(chunk, self.pg) for i, chunk in enumerate(self.chunks)
        }

    def _sharded_state(
        self,
        step: int,
        is_loading: bool,
        sharding: str = OPTIMIZER_SHARDING,
        rng: bool = True,
        chained_prefix: bool = False,
    ) -> dict[str, Any]:
        state = self._model_state()
        meta = {
            "distrib_optim_sharding_type": sharding,
            "dp_cp_group": self.pg.dp_cp,
            "chained_optim_avoid_prefix": not chained_prefix,
        }
        with lean_optimizer_state(self.optimizer):
            state["optimizer"] = self.optimizer.sharded_state_dict(
                state, is_loading=is_loading, metadata=meta
            )
        state["scheduler"] = self.scheduler.state_dict()
        state["iteration"] = step
        if rng:  # one object per rank of this world: rng_state/shard_<rank>_<world>
            state["rng_state"] = ShardedObject(
                "rng_state", _rng_state(self.device), (self.world,), (self.rank,), replica_id=0
            )
        return state

    def save(self, step: int, consumed_samples: int, blocking: bool = False) -> float:
        """Write step `step` (`consumed_samples` read so far), then its `kubetron.json`, then
        point `latest` at it; returns the seconds training waited (collective). With
        `async_save` (and not `blocking`) the files are written in the background and
        `finalize` completes the save; an earlier pending save is finalized first."""
        self.finalize(blocking=True)
        start = time.perf_counter()
        target = step_dir(self.root, step)
        check_fence(self.root, self.identity.attempt)  # every rank: a replaced attempt stops
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if target.exists():  # a partial save of this step from a crashed run
                shutil.rmtree(target)
            target.mkdir()
        dist.barrier()
        state = self._sharded_state(step, is_loading=False)
        if self.async_save and not blocking:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            request = dist_checkpointing.save(
                state, str(target), sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1),
                async_sharded_save=True, async_strategy="mcore",
            )  # fmt: skip
            assert request is not None
            request.add_finalize_fn(lambda: self._complete(step, consumed_samples))
            queue = AsyncCallsQueue()
            queue.schedule_async_request(request)
            del state
            blocked = time.perf_counter() - start
            self.pending = PendingSave(step, start, blocked, queue)
            log.info(
                "checkpoint of step %d: writing in the background to %s (training waited "
                "%.2fs; rank %d peak host RSS %.1f GiB)", step, target, blocked, self.rank,
                peak_rss_gib(),
            )  # fmt: skip
            return blocked
        threads = GPU_WRITER_THREADS if self.device.type == "cuda" else 1
        strategy = SyncTorchDistSaveStrategy(thread_count=threads)
        dist_checkpointing.save(state, str(target), sharded_strategy=strategy)
        del state
        self._complete(step, consumed_samples)
        seconds = time.perf_counter() - start
        log.info(
            "saved checkpoint of step %d to %s in %.2fs (rank %d peak host RSS %.1f GiB)",
            step, target, seconds, self.rank, peak_rss_gib(),
        )  # fmt: skip
        if self.on_saved is not None:
            self.on_saved(step, seconds)
        return seconds

    def _complete(self, step: int, consumed_samples: int) -> None:
        """After every rank's files are complete: `kubetron.json`, then `latest` (collective)."""
        dist.barrier()
        if self.rank == 0:
            target = step_dir(self.root, step)
            write_step_meta(target, self.identity.step_meta(step, consumed_samples))
            check_fence(self.root, self.identity.attempt)  # again, just before `latest`
            write_latest(self.root, step)
        dist.barrier()

    def close(self) -> None:
        """Complete a pending save, then stop the process Megatron's asynchronous writer
        started for its write results (a multiprocessing manager), if it did."""
        self.finalize(blocking=True)
        if not self.async_save:
            return
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        results = getattr(filesystem_async, "_results_queue", None)
        manager = getattr(results, "_manager", None)
        if manager is not None:
            manager.shutdown()
            filesystem_async._results_queue = None

    def finalize(self, blocking: bool = False) -> bool:
        """Complete a pending asynchronous save if it is written (every rank: collective);
        `blocking` waits for it. True when nothing is pending any more."""
        pending = self.pending
        if pending is None:
            return True
        done = pending.queue.maybe_finalize_async_calls(blocking=blocking)
        if not done and pending.queue.get_num_unfinalized_calls():
            return False
        pending.queue.close()
        self.pending = None
        seconds = time.perf_counter() - pending.began
        log.info(
            "saved checkpoint of step %d to %s in %.2fs in the background (training waited "
            "%.2fs; rank %d peak host RSS %.1f GiB)", pending.step,
            step_dir(self.root, pending.step), seconds, pending.blocked_s, self.rank,
            peak_rss_gib(),
        )  # fmt: skip
        if self.on_saved is not None:
            self.on_saved(pending.step, seconds)
        return True

    def load_latest(self) -> Resumed | None:
        """Restore the newest complete checkpoint (None when there is none).

        `ckpt_meta.plan_resume` first refuses, with a `ConfigError` and before anything is
        loaded, a `latest` pointing to an incomplete save, a newer format and another model.
        Model and optimizer are resharded by Megatron's loader into this run's shape; the RNG
        states are loaded when the shape is the one that saved them, else re-seeded."""
        plan = plan_resume(self.root, self.identity)
        if plan is None:
            return None
        step, source = plan.step, plan.source
        sharding = saved_optimizer_sharding(source)
        prefix = self.device.type == "cuda" and saved_with_chained_prefix(source)
        _init_fresh_optimizer_state(self.optimizer)
        request = self._sharded_state(
            step, True, sharding=sharding, rng=plan.restore_rng, chained_prefix=prefix
        )
        began = time.perf_counter()
        loaded = dist_checkpointing.load(request, str(source))
        if loaded["iteration"] != step:
            raise ValueError(f"{source} holds iteration {loaded['iteration']}, expected {step}")
        if len(self.chunks) == 1:
            self.chunks[0].load_state_dict(loaded["model"])
        else:
            for i, chunk in enumerate(self.chunks):
                chunk.load_state_dict(loaded[f"model{i}"])
        optimizer_state = loaded["optimizer"]
        if self.device.type == "cuda":
            optimizer_state = regroup_optimizer_state(optimizer_state, self.optimizer)
        with steps_aside_while_loading(self.optimizer):
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(loaded["scheduler"])
        if plan.restore_rng:
            _set_rng_state(loaded["rng_state"])
        else:
            seed = self.identity.seed
            reseed_for_resume(self.pg, seed, step)
            log.info(
                "RNG states not loaded (saved by another shape): re-seeded from seed %d and "
                "step %d (base %d plus Megatron's per-stage and per-tensor-rank offsets)",
                seed, step, resume_seed(seed, step),
            )  # fmt: skip
        log.info("resumed from %s (step %d): %s", source, step, plan.why)
        log.info(
            "loaded checkpoint of step %d in %.2fs (rank %d peak host RSS %.1f GiB)",
            step, time.perf_counter() - began, self.rank, peak_rss_gib(),
        )  # fmt: skip
        return Resumed(step, plan.consumed_samples, "restored" if plan.restore_rng else "re-seeded")
