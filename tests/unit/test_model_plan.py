"""The trainer's own check of each model of a multi-model job at start, before it joins the job:
the operator's model rules (a config written by hand or an older operator gets the same
refusal), each message on the model's fields; a good config settles each model's view, shape
and engine."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kubetron_api.config import PRESETS, FastPath, TrainerConfig
from kubetron_api.dims import ParallelConfigError
from kubetron_trainer.runtime.model_plan import plan_models

TINY = PRESETS["gpt-tiny"].model_dump(mode="json", by_alias=True)


def config(reference: dict[str, Any]) -> TrainerConfig:
    every = {"first": 0, "count": 4}
    return TrainerConfig.model_validate(
        {
            "model": TINY, "worldSize": 4, "gpusPerNode": 4,
            "recipe": {"kind": "dpo", "precision": "fp32", "globalBatchSize": 8, "seqLength": 64},
            "checkpoint": {"path": "/ckpt"},
            "models": [
                {"name": "policy", "model": TINY, "preset": "gpt-tiny", "trainable": True,
                 "parallelism": {"tensor": 2}, "ranks": every},
                {"name": "reference", "model": TINY, "preset": "gpt-tiny", "trainable": False,
                 "weights": "/w", "ranks": every, "parallelism": {}, **reference},
            ],
        }
    )  # fmt: skip


def test_each_model_gets_its_view_shape_and_engine() -> None:
    starts = plan_models(config({}), torch.device("cpu"), FastPath.parse("on"), "auto")
    policy, reference = starts
    assert (policy.dims.tp, policy.dims.dp, reference.dims.tp, reference.dims.dp) == (2, 2, 1, 4)
    assert policy.cfg.checkpoint.path == "/ckpt/policy"  # a trainable model's own directory
    assert reference.cfg.checkpoint.path is None  # a frozen model is its weights
    assert reference.field == "spec.models[1]" and reference.cfg.weights == "/w"


def test_a_model_that_cannot_run_is_refused_on_its_own_fields() -> None:
    cfg = config({"parallelism": {"tensor": 3}})
    with pytest.raises(ParallelConfigError) as info:
        plan_models(cfg, torch.device("cpu"), FastPath(), "auto")
    text = str(info.value)
    assert "model 'reference' (spec.models[1]): " in text
    assert "spec.models[1].parallelism.tensor=3" in text
    assert "spec.parallelism" not in text.replace("spec.models[1].parallelism", "")
