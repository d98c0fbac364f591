"""The optimizer step on CPU (gloo), where Megatron-Core's schedules, DDP and optimizers can't run.

In Megatron-Core 0.19 every `get_forward_backward_func` schedule, `DistributedDataParallel`, the
distributed optimizer and `get_grad_norm_fp32` need CUDA. So on CPU this module does the same
arithmetic itself: forward and backward per micro-batch (loss averaged over micro-batches, as
Megatron's schedules do), gradients averaged over the dp group, the global grad norm over unique
tensor-parallel shards reduced over the model-parallel group, clipping, a torch optimizer with
Megatron's weight-decay grouping, and Megatron's `OptimizerParamScheduler`
(`optimizer.build_scheduler`). Model, groups, data, checkpoints and metrics are shared with the GPU
path. Pipeline parallelism needs a GPU. An evaluation (`recipe.eval`) is the model's forward
under `no_grad`, in eval mode.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

from kubetron_api.config import OptimizerSpec, TrainerConfig
from kubetron_trainer.data.batches import Batch
from kubetron_trainer.runtime.evaluate import scored
from kubetron_trainer.runtime.step import (
    LM_LOSS,
    LOSS_KEY,
    Objective,
    Stats,
    StepResult,
    mean_over_dp,
)

log = logging.getLogger(__name__)


class CpuOptimizer:
    """A torch optimizer with dp gradient averaging, clipping and Megatron-style checkpoints.

    Exposes what the loop and `checkpoint` use of a Megatron optimizer: `param_groups`,
    `zero_grad`, `step() -> (ok, grad_norm, None)`, `sharded_state_dict`, `load_state_dict`.
    """

    def __init__(self, chunks: list[GPTModel], spec: OptimizerSpec, pg: ProcessGroupCollection):
        self.pg = pg
        self.clip_grad = spec.clip_grad
        self.params = [p for c in chunks for p in c.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.ndim > 1]
        no_decay = [p for p in self.params if p.ndim <= 1]  # biases and norms, as Megatron
        groups: list[dict[str, Any]] = [
            {"params": decay, "wd_mult": 1.0},
            {"params": no_decay, "wd_mult": 0.0},
        ]
        self.optimizer: torch.optim.Optimizer
        if spec.name == "adam":
            self.optimizer = torch.optim.AdamW(
                groups,
                lr=spec.lr,
                betas=(spec.adam_beta1, spec.adam_beta2),
                eps=spec.adam_eps,
                weight_decay=spec.weight_decay,
            )
        else:
            self.optimizer = torch.optim.SGD(
                groups, lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay
            )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def step(self) -> tuple[bool, float, None]:
        """Average grads over dp, clip by the global norm, update; returns Megatron's triple."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.pg.dp_cp.size() > 1 and grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.pg.dp_cp)
            flat /= self.pg.dp_cp.size()
            for g, synced in zip(
                grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True
            ):
                g.copy_(synced)
        norm = self.grad_norm()
        if self.clip_grad > 0 and norm > self.clip_grad:
            scale = self.clip_grad / (norm + 1e-6)
            for g in grads:
                g.mul_(scale)
        self.optimizer.step()
        return True, norm, None

    def grad_norm(self) -> float:
        """L2 norm of the whole model's gradient: each tensor-parallel shard counted once."""
        total = torch.zeros(1, dtype=torch.float64)
        for p in self.params:
            if p.grad is not None and param_is_not_tensor_parallel_duplicate(p, self.pg.tp):
                total += p.grad.detach().double().pow(2).sum()
        dist.all_reduce(total, group=self.pg.mp)
        return float(total.sqrt())

    def init_state(self) -> None:
        """Create empty optimizer state, so a checkpoint can be loaded before the first step."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                if state:
                    continue
                if isinstance(self.optimizer, torch.optim.AdamW):
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                else:
                    state["momentum_buffer"] = torch.zeros_like(p)

    def sharded_state_dict(
        self,
        model_sharded_state_dict: dict[str, Any],
        is_loading: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The optimizer state as ShardedTensors shaped like the model's parameters (the
        `metadata` Megatron's optimizers take is accepted and not needed: state is replicated)."""
        if is_loading:
            self.init_state()
        state = self.optimizer.state_dict()
        ordered = [p for group in self.optimizer.param_groups for p in group["params"]]
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, ordered)
        steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        if steps:
            state["state"]["common_step"] = torch.tensor(steps.pop())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        step = state["state"].pop("common_step", None)
        if step is not None:
            for param_state in state["state"].values():
                param_state["step"] = step.clone().float()
        self.optimizer.load_state_dict(state)


def cpu_train_step(
    chunks: list[GPTModel],
    optimizer: CpuOptimizer,
    micro_batches: Sequence[Batch | None],
    objective: Objective = LM_LOSS,
) -> StepResult:
    """One optimizer step over this rank's micro-batches; the loss (and the objective's own
    numbers) averaged over micro-batches and dp."""
    if len(chunks) != 1:
        raise ValueError("the CPU step supports one model chunk (no pipeline parallelism)")
    model = chunks[0]
    model.train()
    optimizer.zero_grad()
    reported = []
    for batch in micro_batches:
        if batch is None:
            raise ValueError("every CPU rank reads data (pipeline parallelism needs a GPU)")
        labels = None if objective.logits else batch.labels
        output = model(batch.tokens, batch.position_ids, batch.attention_mask, labels=labels)
        loss, stats = objective(output, batch)
        (loss / len(micro_batches)).backward()
        reported.append({LOSS_KEY: loss.detach(), **stats})
    ok, grad_norm, _ = optimizer.step()
    means = mean_over_dp(reported, optimizer.pg)
    return StepResult(means.pop(LOSS_KEY), grad_norm, ok, means)


def cpu_evaluate(
    chunks: list[GPTModel], micro_batches: Sequence[Batch | None], objective: Objective = LM_LOSS
) -> list[Stats]:
    """Each micro-batch's loss and loss tokens (`evaluate.scored`), forward only."""
    model = chunks[0]
    model.eval()
    records = []
    with torch.no_grad():
        for batch in micro_batches:
            if batch is None:
                raise ValueError("every CPU rank reads data (pipeline parallelism needs a GPU)")
            labels = None if objective.logits else batch.labels
            output = model(batch.tokens, batch.position_ids, batch.attention_mask, labels=labels)
            records.append(scored(objective(output, batch)[0], batch))
    model.train()
    return records


class CpuEngine:
    """The CPU optimizer step behind the loop's `Engine` interface."""

    def __init__(
        self,
        cfg: TrainerConfig,
        chunks: list[GPTModel],
        pg: ProcessGroupCollection,
        objective: Objective = LM_LOSS,
    ) -> None:
        if cfg.recipe.optimizer.distributed and pg.dp_cp.size() > 1:
            log.info("CPU path: optimizer state is replicated, not sharded (GPU only)")
        self.chunks = chunks
        self.objective = objective
        self.optimizer = CpuOptimizer(chunks, cfg.recipe.optimizer, pg)

    def after_load(self) -> None:
        """Nothing to redo after a load on the CPU path."""

    def step(self, micro_batches: Sequence[Batch | None]) -> StepResult:
        return cpu_train_step(self.chunks, self.optimizer, micro_batches, self.objective)

    def evaluate(self, micro_batches: Sequence[Batch | None]) -> list[Stats]:
        return cpu_evaluate(self.chunks, micro_batches, self.objective)
