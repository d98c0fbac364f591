"""Pieces both optimizer-step paths (CPU and GPU) share: the loss, the LR schedule, the seeds.

Kept apart from `loop.py` so `step_cpu` and `step_gpu` can use them without importing the loop,
and so the two paths cannot drift in how they average the loss or schedule the learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection

from kubetron_api.config import RecipeSpec


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step returns on every rank."""

    loss: float
    grad_norm: float
    ok: bool = True


def megatron_optimizers(optimizer: Any) -> list[Any]:
    """The optimizers a Megatron optimizer chains (itself when it chains none)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (each holds its torch optimizer as
    `.optimizer`)."""
    inners = (getattr(o, "optimizer", None) for o in megatron_optimizers(optimizer))
    return [o for o in inners if isinstance(o, torch.optim.Optimizer)]


def masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean language-model loss over the tokens the mask keeps (in fp32)."""
    mask = loss_mask.float()
    return (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)


def build_scheduler(optimizer: Any, recipe: RecipeSpec) -> OptimizerParamScheduler:
    """Megatron's LR schedule in optimizer steps: linear warmup, then decay to min_lr."""
    opt, sched = recipe.optimizer, recipe.lr_schedule
    decay = sched.decay_iters or recipe.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=sched.warmup_iters,
        lr_decay_steps=max(decay, sched.warmup_iters + 1),
        lr_decay_style=sched.style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=max(decay, 1),
        wd_incr_style="constant",
    )


def current_lr(optimizer: Any) -> float:
    """The learning rate of the first parameter group (all groups share it)."""
    return float(optimizer.param_groups[0]["lr"])


def share_from_last_stage(values: list[float], pg: ProcessGroupCollection) -> list[float]:
    """Values known on the last pipeline stage, on every stage (sum with zeros elsewhere)."""
    if pg.pp.size() == 1:
        return values
    t = torch.tensor(values if pg.pp.rank() == pg.pp.size() - 1 else [0.0] * len(values))
    if dist.get_backend(pg.pp) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=pg.pp)
    return t.cpu().tolist()
