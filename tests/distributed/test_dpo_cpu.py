"""Preference tuning (recipe dpo) on CPU processes (gloo), two models of different shapes in one
job: a tiny random Qwen3 policy (transformers, fp32) in TP2 x DP2 and another tiny Qwen3 as
its frozen reference in DP4 on the same four ranks, then the reference on a slice of its own.
The trainer's first DPO loss and rewards are the formula on transformers' log-probabilities of
the same pairs; the loss falls and the reward accuracy rises as the policy trains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from devtools.training.launch import example_config, run
from kubetron_trainer.data.batches import MockPreferenceDataset
from tests.hf_models import PRESET, model_spec, save_hf_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
VOCAB, SEQ, GBS, BETA, SMOOTH = 512, 32, 4, 0.1, 0.1


def dpo_config(
    policy: Path, reference: Path, policy_shape: dict[str, Any], reference_shape: dict[str, Any],
    steps: int, smoothing: float = SMOOTH, lr: float = 2e-3, world: int = 4,
) -> dict[str, Any]:  # fmt: skip
    arch = model_spec("qwen3", VOCAB).resolve().model_dump(mode="json", by_alias=True)
    preset = PRESET["qwen3"]
    cfg = example_config(
        recipe={
            "kind": "dpo", "trainIters": steps, "globalBatchSize": GBS, "microBatchSize": 1,
            "seqLength": SEQ, "logInterval": 1, "dpo": {"beta": BETA, "labelSmoothing": smoothing},
            "lrSchedule": {"style": "constant", "warmupIters": 0},
        },
        checkpoint={"path": None}, metrics={"enabled": False}, worldSize=world,
        gpusPerNode=world,
        preset=preset, weights=str(policy),
    )  # fmt: skip
    cfg["recipe"]["optimizer"] |= {"lr": lr, "minLr": 0.0, "weightDecay": 0.0}
    cfg["model"] = arch
    cfg["parallelism"] |= {"tensor": policy_shape["tensor"]}
    cfg["models"] = [
        {"name": "policy", "model": arch, "preset": preset, "weights": str(policy),
         "trainable": True, "parallelism": {"tensor": policy_shape["tensor"]},
         "ranks": policy_shape["ranks"]},
        {"name": "reference", "model": arch, "preset": preset, "weights": str(reference),
         "trainable": False, "parallelism": {"tensor": reference_shape["tensor"]},
         "ranks": reference_shape["ranks"]},
    ]  # fmt: skip
    return cfg


def logps(model: Any, sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' log-probability of each row's masked tokens ([2]: chosen, rejected)."""
    with torch.no_grad():
        logits = model(input_ids=sample["tokens"]).logits.double()
    per_token = torch.log_softmax(logits, -1).gather(-1, sample["labels"][..., None])[..., 0]
    return (per_token * sample["loss_mask"].double()).sum(-1)


def expected_first_step(policy: Any, reference: Any) -> dict[str, float]:
    """DPO's sigmoid loss (with label smoothing) and the rewards over the first global batch."""
    data = MockPreferenceDataset(VOCAB, SEQ, GBS, seed=1234)
    ratios = torch.stack([logps(policy, data[i]) - logps(reference, data[i]) for i in range(GBS)])
    margin = BETA * (ratios[:, 0] - ratios[:, 1])
    loss = -(1 - SMOOTH) * F.logsigmoid(margin) - SMOOTH * F.logsigmoid(-margin)
    return {
        "loss": float(loss.mean()), "chosen_reward": float(BETA * ratios[:, 0].mean()),
        "rejected_reward": float(BETA * ratios[:, 1].mean()),
        "reward_margin": float(margin.mean()),
        "reward_accuracy": float((margin > 0).double().mean()),
    }  # fmt: skip


def make_dpo_weights(root: Path) -> tuple[Path, Path, dict[str, float]]:
    """Two tiny Qwen3 checkpoints (policy, reference) under `root` and the first step's
    expected numbers, from the models as transformers loads them back (what the trainer
    reads)."""
    import transformers

    save_hf_model("qwen3", VOCAB, root / "policy", seed=0)
    save_hf_model("qwen3", VOCAB, root / "reference", seed=1)
    policy, reference = (
        transformers.AutoModelForCausalLM.from_pretrained(root / name).eval()
        for name in ("policy", "reference")
    )
    return root / "policy", root / "reference", expected_first_step(policy, reference)


@pytest.fixture(scope="module")
def dpo_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, float]]:
    return make_dpo_weights(tmp_path_factory.mktemp("dpo-weights"))


def first_step(result: dict[str, Any]) -> dict[str, float]:
    step = result["steps"][0]
    return {"loss": step["loss"], **step["extras"]}


EVERY = {"first": 0, "count": 4}


def test_dpo_colocated_first_step_matches_the_formula(
    dpo_weights: tuple[Path, Path, dict[str, float]], tmp_path: Path
) -> None:
    policy, reference, expected = dpo_weights
    cfg = dpo_config(policy, reference, {"tensor": 2, "ranks": EVERY},
                     {"tensor": 1, "ranks": EVERY}, steps=1)  # fmt: skip
    started = run(cfg, tmp_path / "run")
    got = first_step(started.result())
    assert got == pytest.approx(expected, abs=1e-5), (got, expected)
    assert expected["loss"] != pytest.approx(math.log(2), abs=1e-3)  # the models differ
    out = started.output()
    assert "model policy: ranks 0-3, " in out and "model reference: ranks 0-3, " in out


def test_dpo_policy_learns_to_prefer_the_chosen_responses(
    dpo_weights: tuple[Path, Path, dict[str, float]], tmp_path: Path
) -> None:
    """Policy and reference start from the same weights, as in practice: the first loss is
    ln 2 and every reward 0; training raises the chosen rows' margin over the rejected ones."""
    policy = dpo_weights[0]
    cfg = dpo_config(policy, policy, {"tensor": 2, "ranks": EVERY},
                     {"tensor": 1, "ranks": EVERY}, steps=30, smoothing=0.0, lr=5e-3)  # fmt: skip
    steps = run(cfg, tmp_path / "run").result()["steps"]
    losses = [s["loss"] for s in steps]
    accuracy = [s["extras"]["reward_accuracy"] for s in steps]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert len(steps) == 30
    # four pairs a step are noisy: compare the first and the last ten steps
    assert sum(losses[-10:]) / 10 < math.log(2) - 0.05, losses
    early, late = sum(accuracy[:10]) / 10, sum(accuracy[-10:]) / 10
    assert late > early and late >= 0.65, accuracy


def test_dpo_with_the_reference_on_its_own_slice_gives_the_same_first_loss(
    dpo_weights: tuple[Path, Path, dict[str, float]], tmp_path: Path
) -> None:
    policy, reference, expected = dpo_weights
    cfg = dpo_config(policy, reference, {"tensor": 2, "ranks": {"first": 0, "count": 2}},
                     {"tensor": 1, "ranks": {"first": 2, "count": 2}}, steps=2)  # fmt: skip
    started = run(cfg, tmp_path / "run")
    got = first_step(started.result())
    assert got == pytest.approx(expected, abs=1e-5), (got, expected)
    out = started.output()
    assert "model policy: ranks 0-1, " in out and "model reference: ranks 2-3, " in out


def test_dpo_resumes_at_another_policy_shape(
    dpo_weights: tuple[Path, Path, dict[str, float]], tmp_path: Path
) -> None:
    """Four steps with the policy in TP2 x DP2, saved; resumed with the policy in DP4 it goes on
    from step 4 as the uninterrupted TP2 x DP2 run does (its own checkpoint subdirectory, the
    reference reloaded from its weights)."""
    policy, reference, _ = dpo_weights

    def job(tensor: int, steps: int, ckpt: Path | None) -> dict[str, Any]:
        cfg = dpo_config(policy, reference, {"tensor": tensor, "ranks": EVERY},
                         {"tensor": 1, "ranks": EVERY}, steps=steps)  # fmt: skip
        cfg["checkpoint"] = {"path": str(ckpt) if ckpt else None, "saveInterval": 4}
        return cfg

    straight = run(job(2, 6, None), tmp_path / "straight").result()["steps"]
    ckpt = tmp_path / "ckpt"
    run(job(2, 4, ckpt), tmp_path / "first")
    assert (ckpt / "policy" / "latest").read_text().strip() == "4"
    assert not (ckpt / "reference").exists()  # a frozen model is its weights
    resumed = run(job(1, 6, ckpt), tmp_path / "resumed").result()
    assert resumed["resumed_from"] == 4 and resumed["start"] == "checkpoint"
    got = [s["loss"] for s in resumed["steps"]]
    want = [s["loss"] for s in straight[4:]]
    assert got == pytest.approx(want, abs=2e-4), (got, want)

    # a new job's policy may start from that checkpoint (spec.models[].weights names it)
    cfg = job(2, 1, None)
    cfg["models"][0]["weights"] = cfg["weights"] = str(ckpt / "policy")
    tuned = run(cfg, tmp_path / "from-checkpoint").result()
    assert tuned["start"] == "weights" and tuned["resumed_from"] == 0
    assert tuned["steps"][0]["loss"] != pytest.approx(straight[0]["loss"], abs=1e-4)


def test_dpo_on_slices_saves_and_resumes(
    dpo_weights: tuple[Path, Path, dict[str, float]], tmp_path: Path
) -> None:
    """The reference's ranks join the policy's saves (Megatron's save spans the job) and stay
    out of its loads (over the policy's slice alone)."""
    policy, reference, _ = dpo_weights

    def job(steps: int) -> dict[str, Any]:
        cfg = dpo_config(policy, reference, {"tensor": 2, "ranks": {"first": 0, "count": 2}},
                         {"tensor": 1, "ranks": {"first": 2, "count": 2}}, steps=steps)  # fmt: skip
        cfg["checkpoint"] = {"path": str(tmp_path / "ckpt"), "saveInterval": 2}
        return cfg

    first = run(job(2), tmp_path / "first").result()
    assert (tmp_path / "ckpt" / "policy" / "latest").read_text().strip() == "2"
    resumed = run(job(3), tmp_path / "resumed").result()
    assert resumed["resumed_from"] == 2 and len(resumed["steps"]) == 1
    assert resumed["steps"][0]["loss"] != pytest.approx(first["steps"][0]["loss"], abs=1e-6)
