"""The engine a GPU job runs: the TE-free fast path by default, Transformer Engine on request."""

from __future__ import annotations

import pytest

from kubetron_api.config import PRESETS, FastPath, TrainerConfig
from kubetron_trainer.__main__ import engine_name, pick_attention
from kubetron_trainer.models.build import AttentionBackend


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
        ("auto", "cuda", {"precision": "fp8"}, "auto"),  # fp8 needs TE
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
    assert engine_name("transformer-engine") == "transformer-engine"
    fast = "local spec + torch SDPA core attention, fast path: ce+norm+rope+cudnn+wgrad+adam"
    assert engine_name(fast) == "fast path (ce+norm+rope+cudnn+wgrad+adam)"
    assert engine_name("local spec + torch SDPA core attention") == "local spec"
