"""fp8 on the fast path: the decisions and refusals (CPU only).

Where kubetron's fp8 GEMMs run, where they are refused and why, what the rules ask of the
image, the engine label, Megatron's config and the layer spec. The GEMMs themselves are tested
on a Hopper GPU only (tests/gpu/test_fp8.py): a GPU is never faked for them. Here a GPU's
capability is stubbed only to reach the decision that reads it.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from kubetron_api.config import PRESETS, TrainerConfig
from kubetron_api.dims import ParallelDims
from kubetron_api.exitcodes import ConfigError
from kubetron_api.rules import missing_transformer_engine, transformer_engine_uses
from kubetron_api.wire import LayerEngine
from kubetron_operator.plan import plan
from kubetron_operator.progress import engine_label
from kubetron_trainer.__main__ import prepare
from kubetron_trainer.models.fast_path import EngineChoice, decide_fast_path, fp8_model_refusal
from kubetron_trainer.runtime.topology import Topology
from tests.builders import make_job

GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")


def config(preset: str = "qwen3-0.6b", seq: int = 64, **recipe: object) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "model": PRESETS[preset].model_dump(),
        "recipe": {"seqLength": seq, "precision": "fp8", **recipe},
    })  # fmt: skip


@pytest.fixture
def capability(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The capability `torch.cuda` reports for GPU (a list to set; Hopper by default)."""
    value = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: value[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    return value


def test_fp8_is_refused_on_the_cpu_with_the_reason() -> None:
    cfg = config()
    with pytest.raises(ConfigError, match=r"need an NVIDIA GPU \(Hopper or newer\); this is cpu"):
        decide_fast_path(cfg.recipe.fast, cfg, ParallelDims(1), CPU, "sdpa")


def test_the_trainer_on_the_cpu_refuses_fp8_before_joining() -> None:
    job = make_job("gpt-tiny", gpusPerNode=2, seqLength=64, precision="fp8")
    args = argparse.Namespace(fast_path=None, device="cpu", attention="auto")
    with pytest.raises(ConfigError, match=r"spec\.recipe\.precision: fp8 on the fast path"):
        prepare(plan(job).trainer_config, Topology.single_process(), args)


def test_fp8_is_refused_before_hopper(capability: list[tuple[int, int]]) -> None:
    capability[0] = (8, 0)
    cfg = config()
    with pytest.raises(ConfigError, match=r"compute capability 9\.0 \(Hopper\).*A100 has 8\.0"):
        decide_fast_path(cfg.recipe.fast, cfg, ParallelDims(1), GPU)


def test_on_hopper_the_fast_path_runs_fp8_and_says_so(capability: list[tuple[int, int]]) -> None:
    cfg = config(fastPath="norm,rope")
    choice = decide_fast_path(cfg.recipe.fast, cfg, ParallelDims(1), GPU)
    assert choice == EngineChoice("sdpa", cfg.recipe.fast, fp8=True)
    assert choice.engine == LayerEngine("fast-path", ("norm", "rope", "fp8"))
    assert choice.engine.to_label() == "fast path (norm+rope+fp8)"
    assert LayerEngine.from_label("fast path (norm+rope+fp8)") == choice.engine
    assert engine_label("fast path (norm+rope+fp8)") == "fast path (norm+rope+fp8)"  # status


def test_bf16_runs_no_fp8(capability: list[tuple[int, int]]) -> None:
    cfg = config(precision="bf16")
    assert not decide_fast_path(cfg.recipe.fast, cfg, ParallelDims(1), GPU).fp8


def test_fp8_with_other_attention_is_refused(capability: list[tuple[int, int]]) -> None:
    cfg = config()
    with pytest.raises(ConfigError, match="unfused attention runs no fast path"):
        decide_fast_path(cfg.recipe.fast, cfg, ParallelDims(1), GPU, "unfused")


def test_moe_experts_are_refused() -> None:
    cfg = config("qwen3-30b-a3b")
    why = fp8_model_refusal(cfg.model, cfg.recipe, ParallelDims(1))
    assert why is not None and "dense models, not MoE experts" in why


def test_dimensions_that_are_not_multiples_of_16_are_named() -> None:
    cfg = config(seq=72)  # 72 tokens a micro-batch
    arch = cfg.model.model_copy(update={"ffn_hidden_size": 3000})
    why = fp8_model_refusal(arch, cfg.recipe, ParallelDims(1))
    assert why is not None and "multiples of 16" in why
    assert "fc2 inputs per rank 3000" in why and "fc1" not in why  # fc1: 6000 = 16 * 375
    assert "tokens per micro-batch (seqLength x microBatchSize) 72" in why
    assert fp8_model_refusal(config().model, config().recipe, ParallelDims(1)) is None


def test_per_rank_dimensions_count_under_tensor_parallelism() -> None:
    cfg = config()
    arch = cfg.model.model_copy(update={"ffn_hidden_size": 3072 + 48})  # 3120 / 2 = 1560
    why = fp8_model_refusal(arch, cfg.recipe, ParallelDims(2, tp=2))
    assert why is not None and "fc2 inputs per rank 1560" in why


def test_fp8_needs_transformer_engine_only_with_the_fast_path_off() -> None:
    on, off = config().recipe, config(fastPath="off").recipe
    p = config().parallelism
    assert transformer_engine_uses(on, p) == []
    assert missing_transformer_engine(off, p)[0].startswith(
        "spec.recipe.precision=fp8 needs Transformer Engine's fp8 GEMMs when "
        "spec.recipe.fastPath is off"
    )
    assert plan(make_job(precision="fp8")).requirements == ()
    assert plan(make_job(precision="fp8", fastPath="off")).requirements == ("transformer-engine",)


def test_megatron_is_asked_for_te_fp8_only_without_our_own() -> None:
    from kubetron_trainer.models.megatron_config import transformer_config

    cfg = config("gpt-tiny")
    ours = transformer_config(cfg, ParallelDims(1), CPU, own_fp8=True)
    assert ours.fp8 is None and ours.bf16


def test_the_layer_spec_takes_the_fp8_linear_layers() -> None:
    from kubetron_trainer.models.fp8 import Fp8ColumnParallelLinear, Fp8RowParallelLinear
    from kubetron_trainer.models.spec import layer_spec

    spec = layer_spec(PRESETS["qwen3-0.6b"], "sdpa", config().recipe.fast, fp8=True)
    attention = spec.layer.submodules.self_attention.submodules
    mlp = spec.layer.submodules.mlp.keywords["submodules"]
    assert (attention.linear_qkv, attention.linear_proj) == (
        Fp8ColumnParallelLinear,
        Fp8RowParallelLinear,
    )
    assert (mlp.linear_fc1, mlp.linear_fc2) == (Fp8ColumnParallelLinear, Fp8RowParallelLinear)
    assert mlp.activation_func is not None  # the swiglu piece kept
    assert "fp8 GEMMs" in spec.name
    plain = layer_spec(PRESETS["qwen3-0.6b"], "sdpa", config().recipe.fast)
    assert "fp8" not in plain.name
