"""What one optimizer step computes and reports, the same on both paths (`step_cpu`,
`step_gpu`): the masked-mean loss both take, the `StepResult` both return, and the last
pipeline stage's loss and grad norm shared with every stage for the loop to report.

Kept apart from `loop.py` so the two step paths use it without importing the loop, and so they
cannot drift in how they average the loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

if TYPE_CHECKING:
    from kubetron_trainer.data.batches import Batch


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step returns on every rank; `extras` are the recipe's own numbers
    (DPO rewards, the distillation KL), averaged like the loss."""

    loss: float
    grad_norm: float
    ok: bool = True
    extras: dict[str, float] = field(default_factory=dict)


def masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean language-model loss over the tokens the mask keeps (in fp32)."""
    mask = loss_mask.float()
    return (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)


Stats = dict[str, torch.Tensor]
# The loss among the numbers a step reports per micro-batch (the schedule's name for it).
LOSS_KEY = "lm loss"


class Objective(Protocol):
    """The trained model's loss on one micro-batch, from the model's output: per-token
    cross-entropy (labels given) or, where `logits` is set, this rank's vocabulary shard of the
    logits. Returns the loss and the recipe's own numbers (scalars, detached)."""

    logits: bool

    def __call__(self, output: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, Stats]: ...


class LanguageModelLoss:
    """Pretraining and fine-tuning: the masked mean of the per-token cross-entropy."""

    logits = False

    def __call__(self, output: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, Stats]:
        return masked_mean(output, batch.loss_mask), {}


LM_LOSS = LanguageModelLoss()


def mean_over_dp(
    per_micro: Iterable[Mapping[str, torch.Tensor]], pg: ProcessGroupCollection
) -> dict[str, float]:
    """Each named number averaged over the micro-batches, then over the data-parallel ranks
    (one all-reduce for all of them)."""
    rows = list(per_micro)
    if not rows:
        return {}
    names = sorted(rows[0])
    if not names:
        return {}
    means = torch.stack([torch.stack([r[n].detach().float() for r in rows]).mean() for n in names])
    dist.all_reduce(means, group=pg.dp_cp)
    means /= pg.dp_cp.size()
    return dict(zip(names, means.cpu().tolist(), strict=True))


def share_from_last_stage(values: list[float], pg: ProcessGroupCollection) -> list[float]:
    """Values known on the last pipeline stage, on every stage (sum with zeros elsewhere)."""
    if pg.pp.size() == 1:
        return values
    t = torch.tensor(values if pg.pp.rank() == pg.pp.size() - 1 else [0.0] * len(values))
    if dist.get_backend(pg.pp) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=pg.pp)
    return t.cpu().tolist()
