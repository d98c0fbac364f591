"""What the trainer reads of an optimizer and its learning rate, the same on CPU and GPU.

A Megatron optimizer may chain several (dense and expert parameters get one each at
expert-parallel > 1), each holding a torch optimizer: the checkpoint and the fused Adam of the
fast path reach the torch optimizers through `megatron_optimizers` / `torch_optimizers`. The LR
schedule is Megatron's `OptimizerParamScheduler`, built here from the recipe for both step paths
(`step_gpu` and `step_cpu` build the optimizers themselves), so they cannot drift in how they
schedule the learning rate.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from kubetron_api.config import RecipeSpec


def megatron_optimizers(optimizer: Any) -> list[Any]:
    """The optimizers a Megatron optimizer chains (itself when it chains none)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (each holds its torch optimizer as
    `.optimizer`)."""
    inners = (getattr(o, "optimizer", None) for o in megatron_optimizers(optimizer))
    return [o for o in inners if isinstance(o, torch.optim.Optimizer)]


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
