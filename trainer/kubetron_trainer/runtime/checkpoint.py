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

A LoRA run (`recipe.peft`) writes the adapters alone: the model's sharded state cut to the
`lora_A`/`lora_B` entries and the optimizer state of those (the only parameters it trains);
`kubetron.json` records the base weights they need, which a resume loads first
(`loop.start_weights`), refusing another base before anything is read (`ckpt_meta.check_peft`).

The optimizer's state is written in Megatron's `fully_reshardable` format without gathering it
on every rank (`optim_state`: its format, and why). Synchronous saves go through torch DCP's
FileSystemWriter, which copies one tensor at a time to the host; an asynchronous save
(`checkpoint.asyncSave`) copies this rank's whole share to the host first (that is what lets
training go on) and writes it from a forked process while the next steps run.
"""

from __future__ import annotations

import logging
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedStateDict,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from torch.distributed.checkpoint import FileSystemWriter

from kubetron_api.ckpt_meta import (
    LATEST,
    RunIdentity,
    check_fence,
    describe_shape,
    plan_resume,
    read_latest,
    step_dir,
    weights_step,
    write_latest,
    write_step_meta,
)
from kubetron_trainer.runtime.optim_state import (
    OPTIMIZER_SHARDING,
    init_fresh_optimizer_state,
    lean_optimizer_state,
    regroup_optimizer_state,
    saved_optimizer_sharding,
    saved_with_chained_prefix,
    steps_aside_while_loading,
)
from kubetron_trainer.runtime.seeding import reseed_for_resume, resume_seed

__all__ = [
    "LATEST",
    "Checkpointer",
    "Resumed",
    "load_model_state",
    "load_model_weights",
    "model_state",
    "read_latest",
    "step_dir",
    "write_latest",
]
log = logging.getLogger(__name__)


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


def model_state(chunks: list[MegatronModule], pg: ProcessGroupCollection) -> dict[str, Any]:
    """Every chunk's sharded state under its key in a checkpoint: `model`, or `model0`,
    `model1`, ... with virtual pipeline stages."""
    keys = model_state_keys(chunks)
    return {key: sharded_model_state(chunk, pg) for key, chunk in zip(keys, chunks, strict=True)}


def model_state_keys(chunks: list[MegatronModule]) -> list[str]:
    """The checkpoint key of each chunk's model state (`model_state`)."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def adapters_only(state: dict[str, Any]) -> dict[str, Any]:
    """`model_state` cut to the LoRA adapters' entries (what a LoRA checkpoint holds)."""
    from kubetron_trainer.models.lora import is_adapter_key

    return {
        part: {k: v for k, v in sub.items() if is_adapter_key(k)} for part, sub in state.items()
    }


def load_chunk(chunk: MegatronModule, loaded: dict[str, Any], adapters: bool) -> None:
    """Load a chunk's part of a checkpoint; `adapters`: a LoRA checkpoint, which must hold
    every adapter (the rest is the base weights, loaded before)."""
    if not adapters:
        chunk.load_state_dict(loaded)
        return
    from kubetron_trainer.models.lora import is_adapter_key

    result = chunk.load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if is_adapter_key(k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"LoRA checkpoint: missing {missing}, unexpected {result.unexpected_keys}"
        )


def load_model_state(
    chunks: list[MegatronModule],
    pg: ProcessGroupCollection,
    source: Path,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Load the model tensors of the step directory `source` into this rank's chunks, whatever
    the shape that saved them: Megatron's loader reshards every ShardedTensor (the padded
    vocabulary too). Only the weights are read: no optimizer state, scheduler or RNG, and no
    ShardedObject (a layer's `_extra_state` belongs to the shape that wrote it). `group`: the
    ranks that load together (default: the whole job; a model on a slice of its own loads over
    its slice's group)."""
    state = model_state(chunks, pg)
    request = {
        key: {k: v for k, v in part.items() if isinstance(v, ShardedTensor | ShardedTensorFactory)}
        for key, part in state.items()
    }
    loaded = dist_checkpointing.load(request, str(source), process_group=group)
    for key, chunk in zip(state, chunks, strict=True):
        result = chunk.load_state_dict(loaded[key], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint load from {source}: missing {missing}, unexpected "
                f"{result.unexpected_keys}"
            )


def load_model_weights(
    chunks: list[MegatronModule],
    pg: ProcessGroupCollection,
    path: Path,
    field: str,
    group: dist.ProcessGroup | None = None,
) -> int:
    """Start this rank's chunks from the weights in a kubetron checkpoint directory `path` (one
    model's: `latest` and its steps), in any parallel shape; returns the step loaded. The step
    is the one `latest` names, refused (ConfigError naming `field`) unless complete with its
    `kubetron.json` (`ckpt_meta.weights_step`; `hf_config.check_model_weights` also compares
    the architecture before the job starts). Model only: a frozen model or a new run's."""
    meta = weights_step(path, field)
    source = step_dir(path, meta.step)
    began = time.perf_counter()
    load_model_state(chunks, pg, source, group)
    log.info(
        "loaded the weights of %s (step %d, %s, saved as %s) in %.2fs",
        source, meta.step, meta.model.describe(), describe_shape(meta.shape),
        time.perf_counter() - began,
    )  # fmt: skip
    return meta.step


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
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.root = root
        self.group = group  # the ranks that load together: the job, or a model's own slice
        self.chunks = chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.pg = pg
        self.device = device
        self.identity = identity
        self.rank = dist.get_rank()
        # one RNG state a rank of the model: its place among the ranks that save the model
        self.shard = dist.get_rank(group) if group is not None else self.rank
        self.shards = dist.get_world_size(group) if group is not None else dist.get_world_size()
        if async_save and device.type != "cuda":
            log.warning("checkpoint.asyncSave needs CUDA (Megatron's async writer); saving "
                        "synchronously on %s", device.type)  # fmt: skip
        self.async_save = async_save and device.type == "cuda"
        self.pending: PendingSave | None = None
        self.on_saved: Callable[[int, float], None] | None = None  # (step, seconds)

    def _sharded_state(
        self,
        step: int,
        is_loading: bool,
        sharding: str = OPTIMIZER_SHARDING,
        rng: bool = True,
        chained_prefix: bool = False,
    ) -> dict[str, Any]:
        state = model_state(self.chunks, self.pg)
        if self.identity.peft is not None:  # LoRA: the adapters; the base is its own weights
            state = adapters_only(state)
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
        if rng:  # one object per rank of the model: rng_state/shard_<rank>_<ranks>
            state["rng_state"] = ShardedObject(
                "rng_state", _rng_state(self.device), (self.shards,), (self.shard,), replica_id=0
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
        init_fresh_optimizer_state(self.optimizer)
        request = self._sharded_state(
            step, True, sharding=sharding, rng=plan.restore_rng, chained_prefix=prefix
        )
        began = time.perf_counter()
        loaded = dist_checkpointing.load(request, str(source), process_group=self.group)
        if loaded["iteration"] != step:
            raise ValueError(f"{source} holds iteration {loaded['iteration']}, expected {step}")
        for key, chunk in zip(model_state_keys(self.chunks), self.chunks, strict=True):
            load_chunk(chunk, loaded[key], adapters=self.identity.peft is not None)
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


def join_save(root: Path, step: int) -> None:
    """Take part, holding nothing of the saved model, in a `Checkpointer.save` of `step` that
    the ranks of another model run (a multi-model job's frozen model on its own slice):
    Megatron's save is collective over the whole job, so this rank follows the saver's
    barriers and writes an empty share (rank 0, which holds the trained model, writes the
    common state)."""
    dist.barrier()  # the step's directory exists
    strategy = SyncTorchDistSaveStrategy()
    dist_checkpointing.save({}, str(step_dir(root, step)), sharded_strategy=strategy)
    dist.barrier()  # every share is complete: rank 0 writes kubetron.json and `latest`
    dist.barrier()
