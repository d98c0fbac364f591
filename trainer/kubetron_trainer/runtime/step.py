"""What one optimizer step computes and reports, the same on both paths (`step_cpu`,
`step_gpu`): the masked-mean loss both take, the `StepResult` both return, and the last
pipeline stage's loss and grad norm shared with every stage for the loop to report.

Kept apart from `loop.py` so the two step paths use it without importing the loop, and so they
cannot drift in how they average the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step returns on every rank."""

    loss: float
    grad_norm: float
    ok: bool = True


def masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean language-model loss over the tokens the mask keeps (in fp32)."""
    mask = loss_mask.float()
    return (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)


def share_from_last_stage(values: list[float], pg: ProcessGroupCollection) -> list[float]:
    """Values known on the last pipeline stage, on every stage (sum with zeros elsewhere)."""
    if pg.pp.size() == 1:
        return values
    t = torch.tensor(values if pg.pp.rank() == pg.pp.size() - 1 else [0.0] * len(values))
    if dist.get_backend(pg.pp) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=pg.pp)
    return t.cpu().tolist()
