"""Each model of a multi-model job as settled before the trainer joins the job.

Each model of `TrainerConfig.models` gets its own view of the config (`for_model`), its shape
checked by the same rules as a one-model job (the messages name `spec.models[i]` and the model),
and its own engine choice. Nothing here builds a group or imports Megatron: a model that cannot
run is refused (exit 2 naming the field) before any rank joins the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kubetron_api.config import FastPath, TrainerConfig, TrainerModel
from kubetron_api.dims import ParallelConfigError, ParallelDims
from kubetron_api.model_rules import MODEL_SHAPE_RULES, on_model
from kubetron_api.rules import CPU_PRECISION, Device, ShapeSpec, check_shape
from kubetron_trainer.models.fast_path import AttentionBackend, EngineChoice, decide_fast_path

log = logging.getLogger(__name__)
# What the trainer checks of each model at start: the operator's model rules but its steer of
# CPU pods to fp32 (as for one model, `rules.TRAINER_RULES`).
MODEL_TRAINER_RULES = tuple(r for r in MODEL_SHAPE_RULES if r is not CPU_PRECISION)


@dataclass(frozen=True)
class ModelStart:
    """One model as settled before the trainer joins the job."""

    spec: TrainerModel
    cfg: TrainerConfig  # the model's view (`TrainerConfig.for_model`)
    dims: ParallelDims
    choice: EngineChoice
    field: str  # its place in the spec, for messages: spec.models[1]

    @property
    def name(self) -> str:
        return self.spec.name

    def holds(self, rank: int) -> bool:
        return self.spec.ranks.first <= rank < self.spec.ranks.end


def plan_models(
    cfg: TrainerConfig, device: torch.device, fast: FastPath, attention: AttentionBackend
) -> tuple[ModelStart, ...]:
    """Every model's shape checked on this device and its engine decided; a broken rule raises
    one `ParallelConfigError` naming the model and its fields."""
    starts = []
    kind: Device = "gpu" if device.type == "cuda" else "cpu"
    for index, m in enumerate(cfg.models):
        view = cfg.for_model(m)
        where = f"spec.models[{index}]"
        shape = ShapeSpec(view.model, view.recipe, m.parallelism, view.data, m.ranks.count,
                          view.gpus_per_node, kind, m.weights, m.ranks.first)  # fmt: skip
        try:
            dims = check_shape(shape, MODEL_TRAINER_RULES).dims
        except ParallelConfigError as err:
            sliced = m.ranks.count != cfg.world_size
            problems = [on_model(p, index, m.name, sliced) for p in err.problems]
            raise ParallelConfigError(problems, err.shape) from None
        # the recipes read per-token log-probabilities or logits: no fused loss
        choice = decide_fast_path(fast.without("ce"), view, dims, device, attention)
        starts.append(ModelStart(m, view, dims, choice, where))
        log.info(
            "model %s: ranks %d-%d, %s, %s, engine: %s", m.name, m.ranks.first, m.ranks.end - 1,
            dims.describe(), "trainable" if m.trainable else "frozen", choice.engine.to_label(),
        )  # fmt: skip
    return tuple(starts)
