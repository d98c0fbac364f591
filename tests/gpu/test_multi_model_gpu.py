"""Several models in one job on one GPU: the CPU tests' DPO and distillation jobs through the
GPU path (Megatron's DDP, distributed optimizer and schedule with the recipe's loss, frozen
models forward only), policy and reference, or teacher and student, co-located on the one GPU.
In fp32 the first losses are the formulas on transformers' outputs; in bf16 with the fast path
(its fused cross-entropy left out: the recipes read per-token log-probabilities and logits)
the policy trains.

Skipped without a CUDA GPU (never faked).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from devtools.training.launch import run
from tests.distributed.test_distill_cpu import distill_config, make_distill_weights
from tests.distributed.test_dpo_cpu import dpo_config, first_step, make_dpo_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ONE = {"tensor": 1, "ranks": {"first": 0, "count": 1}}
Weights = tuple[Path, Path, dict[str, float]]


@pytest.fixture(scope="module")
def dpo(tmp_path_factory: pytest.TempPathFactory) -> Weights:
    return make_dpo_weights(tmp_path_factory.mktemp("dpo-weights"))


def test_dpo_on_one_gpu_matches_the_formula(dpo: Weights, tmp_path: Path) -> None:
    policy, reference, expected = dpo
    cfg = dpo_config(policy, reference, ONE, ONE, steps=2, world=1)
    cfg["recipe"]["fastPath"] = "off"  # fp32: the fast path's cuDNN attention has no fp32 kernel
    started = run(cfg, tmp_path / "run", "--device", "cuda")
    got = first_step(started.result())
    assert got == pytest.approx(expected, abs=1e-4), (got, expected)


def test_dpo_in_bf16_on_the_fast_path_trains(dpo: Weights, tmp_path: Path) -> None:
    cfg = dpo_config(dpo[0], dpo[0], ONE, ONE, steps=30, smoothing=0.0, lr=5e-3, world=1)
    cfg["recipe"]["precision"] = "bf16"
    started = run(cfg, tmp_path / "run", "--device", "cuda")
    result = started.result()
    losses = [s["loss"] for s in result["steps"]]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[0] == pytest.approx(math.log(2), abs=1e-2)
    assert sum(losses[-10:]) / 10 < math.log(2) - 0.05, losses
    assert "fast path (" in started.output() and "(ce+" not in started.output()
    assert result["peak_memory_gib"] is not None


def test_distillation_on_one_gpu_matches_the_kl(tmp_path: Path) -> None:
    teacher, student, expected = make_distill_weights(tmp_path / "weights")
    cfg = distill_config(teacher, student, 1, 1, steps=2, world=1)
    cfg["recipe"]["fastPath"] = "off"  # fp32: the fast path's cuDNN attention has no fp32 kernel
    result = run(cfg, tmp_path / "run", "--device", "cuda").result()
    first = result["steps"][0]
    got = {"loss": first["loss"], **first["extras"]}
    assert got == pytest.approx(expected, abs=1e-4), (got, expected)
