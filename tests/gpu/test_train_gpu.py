"""The trainer on one CUDA GPU: a qwen3-0.6b-shaped model in bf16, Megatron DDP + dist optimizer.

Skipped where CUDA is absent (never faked). Trains a few steps with the torch SDPA core
attention and with Megatron's unfused DotProductAttention (at a short sequence, where the unfused
path fits), and compares decentralized groups with Megatron's global `parallel_state`.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from devtools.training.launch import run
from kubetron_api.config import PRESETS, RecipeSpec, TrainerConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
STEPS = 8
CHECKPOINTS: dict[tuple[str, str], Path] = {}


def qwen3_small_config(checkpoint: Path | None = None) -> dict[str, Any]:
    """qwen3-0.6b's widths (heads, GQA, qk-norm, RoPE, vocab) with 4 of its 28 layers."""
    arch = PRESETS["qwen3-0.6b"].model_copy(update={"num_layers": 4})
    recipe = RecipeSpec.model_validate(
        {
            "trainIters": STEPS,
            "globalBatchSize": 4,
            "microBatchSize": 2,
            "seqLength": 256,
            "precision": "bf16",
            "optimizer": {"lr": 1e-3, "minLr": 1e-4},
            "lrSchedule": {"warmupIters": 1},
            "logInterval": 1,
        }
    )
    cfg = TrainerConfig(job_name="gpu-test", model=arch, preset="qwen3-0.6b", recipe=recipe)
    out = cfg.model_dump(mode="json", by_alias=True)
    out["metrics"]["enabled"] = False
    out["checkpoint"] = {"path": str(checkpoint) if checkpoint else None, "saveInterval": 4}
    return out


@functools.cache
def losses(attention: str, groups: str) -> list[float]:
    """Each (attention, groups) run once per session; the tests compare them."""
    tmp = Path(tempfile.mkdtemp(prefix="kubetron-gpu-"))
    # Only the run the resume test continues saves: a distributed-optimizer save of this
    # 152k-vocabulary model gathers about 3 GB of optimizer state through the CPU.
    ckpt = tmp / "ckpt" if (attention, groups) == ("sdpa", "decentralized") else None
    if ckpt is not None:
        CHECKPOINTS[(attention, groups)] = ckpt
    started = run(
        qwen3_small_config(ckpt),
        tmp / f"{attention}-{groups}",
        "--device",
        "cuda",
        "--attention",
        attention,
        groups=groups,
    )
    return [s["loss"] for s in started.result()["steps"]]


@pytest.mark.parametrize("attention", ["sdpa", "unfused"])
def test_qwen3_shape_trains_in_bf16_and_groups_agree(attention: str) -> None:
    ours = losses(attention, "decentralized")
    theirs = losses(attention, "global")
    assert len(ours) == STEPS
    assert ours[0] == pytest.approx(12.0, abs=0.6)  # ln(151936) = 11.93: untrained
    assert sum(ours[-3:]) / 3 < ours[0] - 0.05, ours  # a 151936-token vocab learns slowly
    # Same seeds, same groups' ranks: equal up to the GPU kernels' own nondeterminism.
    assert ours == pytest.approx(theirs, rel=2e-3), (ours, theirs)


def test_sdpa_and_unfused_attention_agree() -> None:
    sdpa = losses("sdpa", "decentralized")
    unfused = losses("unfused", "decentralized")
    assert sdpa[0] == pytest.approx(unfused[0], rel=1e-2)
    assert sdpa[-1] == pytest.approx(unfused[-1], rel=5e-2)


def test_resume_with_distributed_optimizer_gives_uninterrupted_losses(tmp_path: Path) -> None:
    full = losses("sdpa", "decentralized")
    ckpt = CHECKPOINTS[("sdpa", "decentralized")]
    assert (ckpt / "latest").read_text().strip() == str(STEPS)
    shutil.rmtree(ckpt / f"iter_{STEPS:07d}")
    (ckpt / "latest").write_text("4\n")
    resumed = run(qwen3_small_config(ckpt), tmp_path / "resumed", "--device", "cuda")
    assert resumed.result()["resumed_from"] == 4
    assert [s["loss"] for s in resumed.result()["steps"]] == pytest.approx(full[4:], rel=2e-3)
