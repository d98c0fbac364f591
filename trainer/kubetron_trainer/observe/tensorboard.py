"""TensorBoard event files of a run (`spec.observability.tensorboard`), written by one rank.

Every number here is job-wide once the loop has shared it from the last pipeline stage, so one
rank writes them all: the origin of the trained model's grid (global rank 0 in a job of one
model). The writer is torch's `SummaryWriter`. A restart writes a new event file into the same
directory (TensorBoard merges a directory's files); it opens with `purge_step` at its first
step, so the steps an earlier attempt wrote after the checkpoint it resumed from are dropped
when read and each step shows once. Events are flushed every log interval, at the end and on
SIGTERM (the loop's `finish`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from kubetron_trainer.observe.metrics import StepStats

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

    from kubetron_api.config import TrainerConfig

log = logging.getLogger(__name__)

# The tags, grouped by TensorBoard's sections (the part before the slash).
LOSS = "train/loss"
GRAD_NORM = "train/grad_norm"
LEARNING_RATE = "train/learning_rate"
TOKENS_PER_S = "throughput/tokens_per_s"
TFLOPS = "throughput/tflops_per_gpu"
STEP_TIME = "throughput/step_time_s"
MFU = "throughput/mfu"
MEMORY_ALLOCATED = "gpu/memory_allocated_gib"
MEMORY_RESERVED = "gpu/memory_reserved_gib"
RECIPE = "recipe/"  # + the recipe's own numbers (StepStats.extras): DPO rewards, distillation KL
VALIDATION_LOSS = "validation/loss"
VALIDATION_PPL = "validation/perplexity"
ATTEMPT = "run/attempt"  # the operator's attempt number: a step after a restart shows its rise


def writes(pg: ProcessGroupCollection) -> bool:
    """Whether this rank writes: the origin of its model's grid (rank 0 of each group)."""
    return all(g.rank() == 0 for g in (pg.tp, pg.pp, pg.dp, pg.cp))


class TensorBoard:
    """The run's `SummaryWriter` on the writing rank."""

    def __init__(self, path: str, first_step: int, attempt: int, device: torch.device) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer: Any = SummaryWriter(log_dir=path, purge_step=first_step)
        self.attempt = attempt
        self.device = device
        log.info("TensorBoard events from step %d in %s", first_step, path)

    @classmethod
    def open(
        cls,
        cfg: TrainerConfig,
        pg: ProcessGroupCollection,
        first_step: int,
        attempt: int,
        device: torch.device,
    ) -> TensorBoard | None:
        """The writer of `cfg`'s run on the writing rank (None elsewhere, or when unset)."""
        board = cfg.observability.tensorboard
        if board is None or not writes(pg):
            return None
        return cls(board.path, first_step, attempt, device)

    def record_step(self, s: StepStats, flush: bool) -> None:
        add = self.writer.add_scalar
        scalars = {
            LOSS: s.loss, GRAD_NORM: s.grad_norm, LEARNING_RATE: s.lr,
            TOKENS_PER_S: s.tokens_per_s, TFLOPS: s.tflops_per_gpu, STEP_TIME: s.duration_s,
            ATTEMPT: self.attempt,
        }  # fmt: skip
        if s.mfu is not None:
            scalars[MFU] = s.mfu
        if self.device.type == "cuda":
            scalars[MEMORY_ALLOCATED] = torch.cuda.memory_allocated(self.device) / 2**30
            scalars[MEMORY_RESERVED] = torch.cuda.memory_reserved(self.device) / 2**30
        scalars |= {RECIPE + name: value for name, value in s.extras.items()}
        for tag, value in scalars.items():
            add(tag, value, s.step)
        if flush:
            self.writer.flush()

    def record_validation(self, step: int, loss: float, perplexity: float) -> None:
        self.writer.add_scalar(VALIDATION_LOSS, loss, step)
        self.writer.add_scalar(VALIDATION_PPL, perplexity, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
