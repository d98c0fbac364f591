"""The wire between operator and trainer: the engine label both sides read, and the one decision
(`decide_fast_path`) that the engine, the layer spec and the GPU step take their pieces from."""

from __future__ import annotations

import logging

import pytest
import torch

from kubetron_api.config import PRESETS, FastPath, TrainerConfig
from kubetron_api.dims import ParallelConfigError, ParallelDims
from kubetron_api.exitcodes import ConfigError
from kubetron_api.wire import LayerEngine
from kubetron_operator.progress import engine_label
from kubetron_trainer.models.fast_path import EngineChoice, decide_fast_path

GPU = torch.device("cuda", 0)  # only named: no piece below probes the GPU
CPU = torch.device("cpu")


def config(preset: str = "qwen3-0.6b", data: str = "mock", **recipe: object) -> TrainerConfig:
    paths = [{"prefix": "/d/x"}] if data == "chat" else []
    return TrainerConfig.model_validate({
        "model": PRESETS[preset].model_dump(), "recipe": {"seqLength": 64, **recipe},
        "data": {"type": data, "paths": paths},
    })  # fmt: skip


@pytest.mark.parametrize(
    ("engine", "label"),
    [
        (LayerEngine("transformer-engine"), "transformer-engine"),
        (LayerEngine("local"), "local spec"),
        (LayerEngine("fast-path", ("ce", "norm", "overlap")), "fast path (ce+norm+overlap)"),
    ],
)
def test_engine_label_round_trips(engine: LayerEngine, label: str) -> None:
    assert engine.to_label() == label
    assert LayerEngine.from_label(label) == engine
    assert engine_label(label) == label  # what status.progress.engine shows


@pytest.mark.parametrize("label", ["", "fast path ()", "fast path (ce+warp)", "te", "local"])
def test_a_label_that_names_no_engine_is_not_shown(label: str) -> None:
    with pytest.raises(ValueError, match="names no engine"):
        LayerEngine.from_label(label)
    assert engine_label(label) is None


@pytest.mark.parametrize(
    ("choice", "label"),
    [
        (EngineChoice("te", FastPath.parse("on")), "transformer-engine"),
        (EngineChoice("sdpa"), "local spec"),
        (EngineChoice("unfused"), "local spec"),
        (EngineChoice("sdpa", FastPath.parse("rope,norm")), "fast path (norm+rope)"),
    ],
)
def test_the_choice_names_its_engine(choice: EngineChoice, label: str) -> None:
    assert choice.engine.to_label() == label


def test_on_a_gpu_the_pieces_that_fit_the_model_and_shape_apply() -> None:
    cfg = config("gpt-tiny")
    choice = decide_fast_path(FastPath.parse("norm,rope,cudnn"), cfg, ParallelDims(2, tp=2), GPU)
    assert choice.attention == "sdpa"
    assert choice.fast.pieces == ("norm", "cudnn")  # gpt-tiny has learned positions: no rope


def test_the_fast_path_is_not_applied_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        choice = decide_fast_path(FastPath.parse("on"), config(), ParallelDims(1), CPU, "sdpa")
    assert choice == EngineChoice("sdpa")
    assert "not applied on cpu" in caplog.text


def test_other_attention_leaves_the_fast_path_out(caplog: pytest.LogCaptureFixture) -> None:
    choice = decide_fast_path(FastPath.parse("norm"), config(), ParallelDims(1), GPU, "unfused")
    assert choice == EngineChoice("unfused")
    assert "fast path: norm requested; not applied (cuda, unfused)" in caplog.text


def test_chat_data_runs_sdpa_and_refuses_transformer_engine() -> None:
    cfg = config(data="chat", fastPath="off")
    assert decide_fast_path(cfg.recipe.fast, cfg, ParallelDims(1), GPU).attention == "sdpa"
    with pytest.raises(ConfigError, match="te ignores the attention mask"):
        decide_fast_path(cfg.recipe.fast, cfg, ParallelDims(1), GPU, "te")


def test_a_recipe_that_needs_transformer_engine_is_refused_without_it() -> None:
    cfg = config(precision="fp8", fastPath="off")  # on the fast path fp8 runs without TE
    with pytest.raises(ParallelConfigError, match="no Transformer Engine"):
        decide_fast_path(cfg.recipe.fast, cfg, ParallelDims(1), GPU, "sdpa")


def test_the_spec_is_parsed_once() -> None:
    cfg = config(fastPath="ce,rope")
    assert cfg.recipe.fast is cfg.recipe.fast
    assert cfg.recipe.fast.lists("ce") and not FastPath.parse("on").lists("ce")
