"""The optimizer step on GPUs: Megatron-Core's DDP, distributed optimizer and pipeline schedules.

Everything takes the trainer's `ProcessGroupCollection`: `DistributedDataParallel`,
`get_megatron_optimizer`, `finalize_model_grads` and every schedule from
`get_forward_backward_func(pp_size=, vp_size=)` (with a `P2PCommunicator` on the pp group, so
1F1B and the interleaved schedule work without `parallel_state`). Gradient clipping and the
grad norm come from Megatron's optimizer (`OptimizerConfig.clip_grad`).

With the fast path's `ce` piece the last stage hands `GPTModel` an `output_processor` that
returns the masked-mean loss from the hidden states (fused linear cross-entropy) instead of
per-token losses from materialised logits; the loss function then only reports it.

An evaluation (`recipe.eval`) runs the same schedule with `forward_only=True` under `no_grad`,
the model in eval mode, each micro-batch's loss reported with its loss-token count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import Float16Module

from kubetron_api.config import FastPath, RecipeSpec, TrainerConfig
from kubetron_trainer.data.batches import Batch
from kubetron_trainer.models.fast_path import OFF
from kubetron_trainer.models.fused import fused_lm_loss, use_fused_adam
from kubetron_trainer.runtime.evaluate import scored
from kubetron_trainer.runtime.step import (
    LM_LOSS,
    LOSS_KEY,
    Objective,
    Stats,
    StepResult,
    mean_over_dp,
)


def optimizer_config(cfg: TrainerConfig, bf16: bool) -> OptimizerConfig:
    o = cfg.recipe.optimizer
    return OptimizerConfig(
        optimizer=o.name,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.distributed,
    )


def _loss_func(
    objective: Objective, batch: Batch | None, output: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    if batch is None:
        raise RuntimeError("loss requested on a pipeline stage that read no labels")
    loss, stats = objective(output, batch)
    # clone: the schedule divides the returned loss by the micro-batch count in place, and a
    # detached view would share that storage (the logged loss came out 1/num_microbatches).
    return loss, {LOSS_KEY: loss.detach().clone(), **stats}


def _reduced_loss_func(output: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The fused loss path: the model already returned the masked-mean loss (a scalar)."""
    return output, {LOSS_KEY: output.detach().clone()}


def _forward_step(
    data: Iterator[Batch | None],
    model: torch.nn.Module,
    fused_loss: bool = False,
    objective: Objective = LM_LOSS,
) -> tuple[Any, Any]:
    """Megatron's forward_step_func: tokens on the first stage, labels on the last (chat data:
    every stage gets the batch, for its attention mask; the model reads only what its stage
    uses)."""
    batch = next(data)
    if batch is None:  # a middle pipeline stage: activations come from the previous stage
        output = model(None, None, None)
        return output, partial(_loss_func, objective, None)
    if fused_loss and batch.labels is not None:
        output = model(
            batch.tokens, batch.position_ids, batch.attention_mask, labels=batch.labels,
            loss_mask=batch.loss_mask, output_processor=fused_lm_loss,
        )  # fmt: skip
        if output.dim() == 0:  # the last stage: the loss itself
            return output, _reduced_loss_func
        return output, partial(_loss_func, objective, batch)
    labels = None if objective.logits else batch.labels
    output = model(batch.tokens, batch.position_ids, batch.attention_mask, labels=labels)
    return output, partial(_loss_func, objective, batch)


def _eval_forward_step(
    forward_step: Any, data: Iterator[Batch | None], model: torch.nn.Module
) -> tuple[Any, Any]:
    """`forward_step` whose loss function also reports the micro-batch's loss tokens."""
    batch = next(data)
    output, loss_func = forward_step(iter([batch]), model)
    if batch is None:  # a middle stage: no loss here
        return output, loss_func

    def counted(out: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        loss, stats = loss_func(out)
        return loss, scored(stats[LOSS_KEY], batch)

    return output, counted


def rows_per_micro_batch(recipe: RecipeSpec) -> int:
    """Sequences in one micro-batch: a DPO micro-batch holds both rows of each pair."""
    return recipe.micro_batch_size * (2 if recipe.kind == "dpo" else 1)


class GpuEngine:
    """Megatron DDP + optimizer + schedule behind the loop's `Engine` interface."""

    def __init__(
        self,
        cfg: TrainerConfig,
        chunks: list[GPTModel],
        pg: ProcessGroupCollection,
        fast: FastPath | None = None,
        objective: Objective = LM_LOSS,
    ) -> None:
        self.cfg = cfg
        self.pg = pg
        self.fast = fast or OFF
        self.forward_step = partial(_forward_step, fused_loss=self.fast.ce, objective=objective)
        config = chunks[0].config
        wrapped: list[torch.nn.Module] = [
            Float16Module(config, c) if config.bf16 else c for c in chunks
        ]
        # overlap: each bucket's reduce-scatter starts in the last micro-batch's backward as
        # soon as its gradients are complete (Megatron's overlap_grad_reduce, 40M-element
        # buckets); finalize_model_grads waits for them.
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=self.fast.overlap,
            use_distributed_optimizer=cfg.recipe.optimizer.distributed,
        )
        self.model = [
            DistributedDataParallel(
                config, ddp_config, m, disable_bucketing=i > 0, pg_collection=pg
            )
            for i, m in enumerate(wrapped)
        ]
        self.optimizer = get_megatron_optimizer(
            optimizer_config(cfg, config.bf16),
            self.model,
            use_gloo_process_groups=False,
            pg_collection=pg,
        )
        if self.fast.adam:
            use_fused_adam(self.optimizer)
        config.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=pg)
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = [m.no_sync for m in self.model]
        if len(self.model) == 1:
            config.no_sync_func = config.no_sync_func[0]
        if self.fast.overlap:  # the interleaved schedule starts each chunk's sync itself
            syncs = [m.start_grad_sync for m in self.model]
            config.grad_sync_func = syncs[0] if len(syncs) == 1 else syncs
        vp = len(self.model) if len(self.model) > 1 else None
        self.schedule = get_forward_backward_func(pp_size=pg.pp.size(), vp_size=vp)
        self.p2p = P2PCommunicator(pg.pp, config)

    def after_load(self) -> None:
        """A checkpoint replaced the optimizer's param groups and state: fused Adam again."""
        if self.fast.adam:
            use_fused_adam(self.optimizer)

    def step(self, micro_batches: Sequence[Batch | None]) -> StepResult:
        losses = self.forward_backward(micro_batches)
        ok, grad_norm, _ = self.optimizer.step()
        # the last pipeline stage: averaged over micro-batches, then over dp
        means = mean_over_dp(losses, self.pg)
        loss = means.pop(LOSS_KEY, 0.0)
        return StepResult(loss, float(grad_norm or 0.0), bool(ok), means)

    def forward_backward(self, micro_batches: Sequence[Batch | None]) -> list[dict[str, Any]]:
        """Zeroed gradients, then the schedule over the micro-batches: each parameter's
        `main_grad` holds the step's finalized gradient (reduced over dp, and over tp for
        sequence-parallel norms). Returns the last stage's per-micro-batch losses."""
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        return self._schedule(micro_batches, self.forward_step, forward_only=False)

    def evaluate(self, micro_batches: Sequence[Batch | None]) -> list[Stats]:
        """The schedule forward only: the last stage's `scored` record of each micro-batch."""
        for m in self.model:
            m.eval()
        with torch.no_grad():
            step = partial(_eval_forward_step, self.forward_step)
            records = self._schedule(micro_batches, step, forward_only=True)
        for m in self.model:
            m.train()
        return records

    def _schedule(
        self, micro_batches: Sequence[Batch | None], forward_step: Any, forward_only: bool
    ) -> list[dict[str, Any]]:
        iters: Any = [iter(micro_batches) for _ in self.model]
        recipe = self.cfg.recipe
        out: list[dict[str, Any]] = self.schedule(
            forward_step_func=forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=recipe.seq_length,
            micro_batch_size=rows_per_micro_batch(recipe),
            forward_only=forward_only,
            p2p_communicator=self.p2p,
            pg_collection=self.pg,
        )
        return out
