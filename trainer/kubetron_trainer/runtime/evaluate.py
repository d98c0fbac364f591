"""Validation loss (`recipe.eval`): forward-only passes of the trained model over the validation
split, at step boundaries and after the last step.

The loop hands each step boundary to `Evaluator`; the engines run the forward passes in the
model's own parallel shape (`step_cpu`: the model under `no_grad`; `step_gpu`: Megatron's
schedule with `forward_only=True`, pipeline stages included) and return each micro-batch's
loss with its loss-token count (`scored`). Every evaluation reads the same `iterations` global
batches from sample 0 of the validation split, each data-parallel rank its own samples laid
out as in a training step (`Batches`), so two evaluations score the same samples and compare.

The loss is token-weighted: the per-token losses summed over every loss token of the pass, on
every data-parallel rank, over their count. That is the mean negative log-likelihood per token
of the validation samples, and its exp the perplexity. (The training loss is a mean of
per-micro-batch means; the two agree where every micro-batch holds as many loss tokens, as
with mock and indexed data.) Rank 0 logs each evaluation, exports it
(`kubetron_train_validation_loss`, which the operator shows in `status.progress`) and records
it in the summary with the validation sample indices each data-parallel rank read.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from kubetron_trainer.data.batches import Batch, Batches
from kubetron_trainer.runtime.step import LOSS_KEY, Stats, share_from_last_stage

if TYPE_CHECKING:
    from kubetron_trainer.runtime.loop import Run, Summary

log = logging.getLogger(__name__)

# Beside the loss, what an evaluated micro-batch reports: its loss tokens.
TOKENS_KEY = "tokens"


def scored(loss: torch.Tensor, batch: Batch) -> Stats:
    """An evaluated micro-batch's record: its masked-mean loss and its loss-token count."""
    return {LOSS_KEY: loss.detach().float(), TOKENS_KEY: batch.loss_mask.detach().float().sum()}


class Scorer(Protocol):
    """What evaluates: the engine's forward-only pass over one step's micro-batches, returning
    the last pipeline stage's `scored` records (none on the other stages)."""

    def evaluate(self, micro_batches: Sequence[Batch | None]) -> list[Stats]: ...


@dataclass(frozen=True)
class Evaluation:
    """One evaluation, the same on every rank."""

    step: int  # the optimizer step it followed
    loss: float  # token-weighted mean loss
    perplexity: float  # exp(loss)
    tokens: int  # loss tokens scored
    seconds: float


def token_weighted(
    records: Sequence[Stats], pg: ProcessGroupCollection, device: torch.device
) -> tuple[float, int]:
    """(mean loss per token, loss tokens) of `records` over every data-parallel rank, shared
    from the last pipeline stage (NaN where nothing was scored)."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for r in records:
        sums += torch.stack([r[LOSS_KEY] * r[TOKENS_KEY], r[TOKENS_KEY]]).double().to(device)
    # a replica's context-parallel ranks read the same samples: its sum and count grow alike
    dist.all_reduce(sums, group=pg.dp_cp)
    total, tokens = share_from_last_stage(sums.cpu().tolist(), pg)
    return (total / tokens if tokens else math.nan), round(tokens / pg.cp.size())


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class Evaluator:
    """`recipe.eval`'s evaluations of `run`'s trained model on the `validation` batches (none
    without `recipe.eval`: then it does nothing); each is appended to `summary.validation`."""

    def __init__(self, run: Run, validation: Batches | None, summary: Summary) -> None:
        self.run = run
        self.batches = validation
        self.spec = run.cfg.recipe.eval
        self.summary = summary

    def after(self, step: int) -> None:
        """At the boundary after step `step` (1-based): evaluate every `interval` steps."""
        interval = self.spec.interval if self.spec is not None else None
        if self.batches is not None and interval and step % interval == 0:
            self.evaluate(step)

    def finish(self, step: int) -> None:
        """After the last step `step`: evaluate (atEnd) unless the interval just did."""
        done = self.summary.validation
        if self.batches is None or self.spec is None or not self.spec.at_end:
            return
        if not done or done[-1].step != step:
            self.evaluate(step)

    def evaluate(self, step: int) -> Evaluation:
        """One pass over the validation batches (collective: every rank of the model)."""
        assert self.batches is not None and self.spec is not None
        run, steps = self.run, range(self.spec.iterations)
        began = time.perf_counter()
        records: list[Stats] = []
        for k in steps:
            records += run.engine.evaluate(self.batches.step(k))
        loss, tokens = token_weighted(records, run.pg, run.device)
        seconds = time.perf_counter() - began
        result = Evaluation(step, loss, perplexity(loss), tokens, seconds)
        if not self.summary.validation_indices:  # what each dp rank read, the same every time
            self.summary.validation_indices = gather(self.batches.samples(steps), run)
        self.summary.validation.append(result)
        if run.metrics is not None:
            run.metrics.record_validation(loss)
        if run.board is not None:
            run.board.record_validation(step, loss, result.perplexity)
        if run.topology.rank == 0:
            log.info(
                "step %d | validation loss %.4f | ppl %.2f | %d tokens in %.2f s",
                step, loss, result.perplexity, tokens, seconds,
            )  # fmt: skip
        return result


def gather(indices: list[int], run: Run) -> list[list[int]]:
    """Each data-parallel rank's `indices` (as many on every rank), in dp-rank order."""
    mine = torch.tensor(indices, dtype=torch.long, device=run.device)
    parts = [torch.empty_like(mine) for _ in range(run.pg.dp.size())]
    dist.all_gather(parts, mine, group=run.pg.dp)
    return [p.cpu().tolist() for p in parts]
