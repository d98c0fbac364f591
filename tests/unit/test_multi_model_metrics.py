"""What a job of several models exports beside the one-model metrics: the recipe's own numbers
(DPO rewards, the distillation KL) under their own names, and each model's throughput and
parameter bytes labelled with the model's name."""

from __future__ import annotations

from prometheus_client import generate_latest

from kubetron_api import wire
from kubetron_trainer.observe.metrics import StepStats, TrainerMetrics


def test_recipe_numbers_and_models_are_exported_by_name() -> None:
    metrics = TrainerMetrics("dpo-job", rank=0, local_rank=0, world_size=4, multiprocess=False)
    extras = {"chosen_reward": 0.25, "rejected_reward": -0.5, "reward_margin": 0.75,
              "reward_accuracy": 0.875}  # fmt: skip
    metrics.record_step(StepStats(3, 0.61, 1.0, 1e-4, 2.0, 8192, 4096.0, 1.0, None, extras))
    metrics.record_models(8192, {"policy": 1.5, "reference": 0.5})
    metrics.record_parameters("reference", 1234)
    assert metrics.registry is not None
    text = generate_latest(metrics.registry).decode()
    assert 'kubetron_train_dpo_reward_accuracy{job="dpo-job"} 0.875' in text
    assert 'kubetron_train_dpo_reward_margin{job="dpo-job"} 0.75' in text
    assert 'kubetron_train_loss{job="dpo-job"} 0.61' in text
    tps = wire.MODEL_TOKENS_PER_SECOND.name
    assert f'{tps}{{job="dpo-job",model="reference"}} 16384.0' in text
    assert f'{tps}{{job="dpo-job",model="policy"}} 5461.' in text
    params = wire.MODEL_PARAMETER_BYTES.name
    assert f'{params}{{job="dpo-job",model="reference",rank="0"}} 1234.0' in text


def test_every_recipe_number_has_a_documented_metric() -> None:
    from kubetron_trainer.recipes.dpo import DPO_STATS
    from kubetron_trainer.recipes.teacher import DISTILL_STATS

    assert set(DPO_STATS) | set(DISTILL_STATS) == set(wire.RECIPE_METRICS)
