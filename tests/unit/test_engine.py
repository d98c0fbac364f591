"""The engine a GPU job runs: the TE-free fast path by default, Transformer Engine on request."""

from __future__ import annotations

import pytest

from kubetron_api.config import PRESETS, FastPath, TrainerConfig
from kubetron_trainer.models.fast_path import (
    AttentionBackend,
    EngineChoice,
    pick_attention,
    pieces_for_model,
)


def config(**recipe: object) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {"model": PRESETS["gpt-tiny"].model_dump(), "recipe": recipe}
    )


def test_fast_path_is_on_by_default() -> None:
    assert config().recipe.fast == FastPath.parse("on")


def test_gpu_default_is_the_fast_path_even_where_te_is_installed() -> None:
    cfg = config()
    assert pick_attention("auto", "cuda", cfg.recipe.fast, cfg) == "sdpa"


@pytest.mark.parametrize(
    ("attention", "device", "recipe", "expected"),
    [
        ("auto", "cuda", {"fastPath": "off"}, "auto"),  # off: TE when the image has it
        ("te", "cuda", {}, "te"),  # asked for on the command line
        ("auto", "cuda", {"precision": "fp8", "fastPath": "off"}, "auto"),  # TE's fp8
        ("auto", "cuda", {"precision": "fp8"}, "sdpa"),  # the fast path's own fp8
        ("auto", "cpu", {"precision": "fp32"}, "auto"),  # no effect on the CPU
        ("unfused", "cuda", {}, "unfused"),
    ],
)
def test_te_stays_available(
    attention: AttentionBackend, device: str, recipe: dict[str, object], expected: str
) -> None:
    cfg = config(**recipe)
    assert pick_attention(attention, device, cfg.recipe.fast, cfg) == expected


def test_engine_names() -> None:
    assert EngineChoice("te").engine.to_label() == "transformer-engine"
    fast = FastPath.parse("ce,norm,rope,cudnn,wgrad,adam")
    assert (
        EngineChoice("sdpa", fast).engine.to_label() == "fast path (ce+norm+rope+cudnn+wgrad+adam)"
    )
    assert EngineChoice("sdpa").engine.to_label() == "local spec"


@pytest.mark.parametrize(
    ("preset", "tp", "dropped"),
    [
        ("qwen3-0.6b", 1, set()),  # dense SwiGLU, RoPE, tied embeddings: every piece applies
        ("qwen3-0.6b", 2, {"ce", "wgrad"}),  # ce needs TP1; wgrad then loses the tied output
        ("qwen3-30b-a3b", 1, {"swiglu"}),  # the experts' MLPs keep Megatron's SwiGLU
        ("gpt-tiny", 1, {"rope"}),  # learned positions: no RoPE to replace
        ("gpt-tiny-moe", 1, {"rope", "swiglu"}),
    ],
)
def test_pieces_that_do_not_apply_to_the_model_are_dropped(
    preset: str, tp: int, dropped: set[str]
) -> None:
    from dataclasses import asdict

    from kubetron_api.config import FAST_PATH_PIECES
    from kubetron_api.dims import ParallelDims

    fast = pieces_for_model(FastPath.parse("on"), PRESETS[preset], ParallelDims(2, tp=tp))
    off = {p for p in FAST_PATH_PIECES if not asdict(fast)[p]}
    assert off == dropped
