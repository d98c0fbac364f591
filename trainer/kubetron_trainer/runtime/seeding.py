"""Process-wide state Megatron-Core still reads without global groups: seeds and one buffer.

`setup_megatron_globals` seeds Python, NumPy and torch with Megatron training's arithmetic
(`_set_random_seed`: offset per pipeline stage, optionally per dp rank), Megatron's CUDA RNG
tracker with tp/ep/etp ranks taken from a `ProcessGroupCollection`, and creates the global memory
buffer that DotProductAttention and sequence parallelism read. Nothing else of `parallel_state`
is initialised.

`reseed_for_resume` seeds a resumed run whose checkpoint's RNG states do not fit its shape (see
`checkpoint`): the same arithmetic from a base derived from the recipe seed and the step.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection

from kubetron_api.dims import ParallelGroupsError


@dataclass(frozen=True)
class RngSeeds:
    """Seeds as Megatron's training derives them for one rank.

    `base` seeds Python, NumPy, torch's CPU generator and the CUDA data-parallel state;
    the CUDA tracker adds the tensor-parallel and expert-parallel states.
    """

    base: int
    tensor_model_parallel: int
    expert_parallel: int


def rng_seeds(
    seed: int,
    *,
    pp_rank: int,
    tp_rank: int,
    ep_rank: int,
    etp_rank: int,
    dp_rank: int = 0,
    data_parallel_random_init: bool = False,
) -> RngSeeds:
    """Megatron's arithmetic: `_set_random_seed` offsets by stage (and dp rank when asked),
    `model_parallel_cuda_manual_seed` derives the tracker seeds from tp/ep/etp ranks."""
    if seed <= 0:
        raise ParallelGroupsError(f"seed={seed} must be > 0 (Megatron skips seeding otherwise)")
    base = seed + 100 * pp_rank + (10 * dp_rank if data_parallel_random_init else 0)
    return RngSeeds(
        base=base,
        tensor_model_parallel=base + 2718 + tp_rank,
        expert_parallel=base + 1024 + 100 * ep_rank + etp_rank,
    )


def setup_megatron_globals(
    pg: ProcessGroupCollection | None,
    seed: int,
    *,
    data_parallel_random_init: bool = False,
    te_rng_tracker: bool = False,
) -> RngSeeds:
    """The process-wide state Megatron-Core reads even with explicit groups; nothing else of
    `parallel_state` is initialised. Call once per process, with the collection whose ranks seed
    it (any collection works, also `ProcessGroupCollection.use_mpu_process_groups()`).
    """
    if pg is None:
        raise ParallelGroupsError(
            "this rank is outside the grid (its ParallelGroups.pg is None); seed from the "
            "collection of a grid it belongs to"
        )
    _ensure_global_memory_buffer()
    seeds = rng_seeds(
        seed,
        pp_rank=pg.pp.rank(),
        tp_rank=pg.tp.rank(),
        ep_rank=pg.ep.rank(),
        etp_rank=pg.expt_tp.rank(),
        dp_rank=pg.dp.rank(),
        data_parallel_random_init=data_parallel_random_init,
    )
    random.seed(seeds.base)
    np.random.seed(seeds.base)
    torch.manual_seed(seeds.base)
    if torch.cuda.device_count() > 0:  # the CUDA RNG tracker needs a GPU
        tensor_parallel.model_parallel_cuda_manual_seed(
            seeds.base,
            te_rng_tracker,
            tp_rank=pg.tp.rank(),
            ep_rank=pg.ep.rank(),
            etp_rank=pg.expt_tp.rank(),
            force_reset_rng=True,  # a second model or run in the same process re-seeds
        )
    return seeds


def resume_seed(seed: int, step: int) -> int:
    """The base seed of a run resumed at `step` without its RNG states: a deterministic mix of
    the recipe seed and the step (the same on every rank; the per-rank offsets are added by
    `rng_seeds`), in [1, 2**31) so those offsets stay within NumPy's 32-bit seeds."""
    digest = hashlib.sha256(f"kubetron-resume:{seed}:{step}".encode()).digest()
    return 1 + int.from_bytes(digest[:8], "big") % (2**31 - 1)


def reseed_for_resume(
    pg: ProcessGroupCollection | None, seed: int, step: int, **kwargs: bool
) -> RngSeeds:
    """Seed every generator as `setup_megatron_globals` does, from `resume_seed(seed, step)`.

    Used when a checkpoint's RNG states were written by another parallel shape: a rank's saved
    state belongs to the rank at that position of the old grid, so it is not loaded. The offsets
    stay Megatron's (by pipeline stage, by tensor/expert rank for the CUDA tracker, by dp rank
    only with `data_parallel_random_init`), not the global rank: tensor-parallel peers must
    share the default generator (dropout outside tensor-parallel regions), so the same
    (seed, step, position) gives the same streams whatever the world size."""
    return setup_megatron_globals(pg, resume_seed(seed, step), **kwargs)


def _ensure_global_memory_buffer() -> None:
    """DotProductAttention and sequence parallelism read this buffer from a global."""
    try:
        buffer = parallel_state.get_global_memory_buffer()
    except AssertionError:
        buffer = None
    if buffer is None:
        parallel_state._set_global_memory_buffer()
