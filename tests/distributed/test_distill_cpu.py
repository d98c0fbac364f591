"""Distillation (recipe distill) on CPU processes (gloo): a tiny random Qwen3 teacher and a
smaller tiny Qwen3 student (transformers, fp32, the same vocabulary) co-located on two ranks in
two shape pairs (teacher TP2 with student DP2, teacher DP2 with student TP2). The trainer's first
loss is the temperature-scaled KL divergence of the student's from the teacher's token
distribution computed from transformers' logits of the same samples (mixed with the student's
language-model loss by klWeight), and the student learns the teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from devtools.training.launch import example_config, run
from kubetron_api.config import ModelSpec
from kubetron_trainer.data.batches import MockDataset
from tests.hf_models import OVERRIDES, PRESET, hf_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
VOCAB, SEQ, GBS, TEMPERATURE, KL_WEIGHT = 512, 32, 4, 2.0, 0.75
STUDENT = {**OVERRIDES, "numLayers": 1, "hiddenSize": 32, "ffnHiddenSize": 64, "kvChannels": 8}


def spec(overrides: dict[str, Any]) -> ModelSpec:
    return ModelSpec.model_validate(
        {"preset": PRESET["qwen3"], "overrides": {**overrides, "vocabSize": VOCAB}}
    )


def distill_config(
    teacher: Path, student: Path, teacher_tp: int, student_tp: int, steps: int, world: int = 2
) -> dict[str, Any]:
    preset = PRESET["qwen3"]
    cfg = example_config(
        recipe={
            "kind": "distill", "trainIters": steps, "globalBatchSize": GBS, "microBatchSize": 1,
            "seqLength": SEQ, "logInterval": 1,
            "distill": {"temperature": TEMPERATURE, "klWeight": KL_WEIGHT},
            "lrSchedule": {"style": "constant", "warmupIters": 0},
        },
        checkpoint={"path": None}, metrics={"enabled": False}, worldSize=world,
        gpusPerNode=world,
        preset=preset, weights=str(student),
    )  # fmt: skip
    cfg["recipe"]["optimizer"] |= {"lr": 3e-3, "minLr": 0.0, "weightDecay": 0.0}
    student_arch = spec(STUDENT).resolve().model_dump(mode="json", by_alias=True)
    teacher_arch = spec(OVERRIDES).resolve().model_dump(mode="json", by_alias=True)
    cfg["model"] = student_arch
    every = {"first": 0, "count": world}
    cfg["models"] = [
        {"name": "teacher", "model": teacher_arch, "preset": preset, "weights": str(teacher),
         "trainable": False, "parallelism": {"tensor": teacher_tp}, "ranks": every},
        {"name": "student", "model": student_arch, "preset": preset, "weights": str(student),
         "trainable": True, "parallelism": {"tensor": student_tp}, "ranks": every},
    ]  # fmt: skip
    return cfg


def expected_first_loss(teacher: Any, student: Any) -> dict[str, float]:
    """T^2 KL(teacher || student) at temperature T and the student's cross-entropy, each the
    mean over the first global batch's tokens, from transformers' logits."""
    data = MockDataset(VOCAB, SEQ, GBS, seed=1234)
    tokens = torch.stack([data[i]["tokens"] for i in range(GBS)])
    labels = torch.stack([data[i]["labels"] for i in range(GBS)])
    with torch.no_grad():
        t = teacher(input_ids=tokens).logits.double()
        s = student(input_ids=tokens).logits.double()
    log_p = torch.log_softmax(t / TEMPERATURE, -1)
    log_q = torch.log_softmax(s / TEMPERATURE, -1)
    kl = TEMPERATURE**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    lm = -torch.log_softmax(s, -1).gather(-1, labels[..., None]).mean()
    loss = KL_WEIGHT * kl + (1 - KL_WEIGHT) * lm
    return {"loss": float(loss), "distill_kl": float(kl), "distill_lm_loss": float(lm)}


def make_distill_weights(root: Path) -> tuple[Path, Path, dict[str, float]]:
    """The teacher's and the student's tiny Qwen3 checkpoints under `root` and the first
    step's expected numbers, from the models as transformers loads them back."""
    import transformers

    for name, overrides, seed in (("teacher", OVERRIDES, 0), ("student", STUDENT, 1)):
        hf_model("qwen3", spec(overrides).resolve(), seed).save_pretrained(root / name)
    teacher, student = (
        transformers.AutoModelForCausalLM.from_pretrained(root / name).eval()
        for name in ("teacher", "student")
    )
    return root / "teacher", root / "student", expected_first_loss(teacher, student)


Weights = tuple[Path, Path, dict[str, float]]


@pytest.fixture(scope="module")
def distill_weights(tmp_path_factory: pytest.TempPathFactory) -> Weights:
    return make_distill_weights(tmp_path_factory.mktemp("distill-weights"))


@pytest.mark.parametrize(("teacher_tp", "student_tp"), [(2, 1), (1, 2)])
def test_first_distillation_loss_is_the_kl_of_the_transformers_logits(
    distill_weights: tuple[Path, Path, dict[str, float]],
    tmp_path: Path,
    teacher_tp: int,
    student_tp: int,
) -> None:
    teacher, student, expected = distill_weights
    steps = 12 if teacher_tp == 2 else 1
    cfg = distill_config(teacher, student, teacher_tp, student_tp, steps)
    result = run(cfg, tmp_path / "run").result()
    first = result["steps"][0]
    got = {"loss": first["loss"], **first["extras"]}
    assert got == pytest.approx(expected, abs=1e-5), (got, expected)
    if steps > 1:  # the student moves towards the teacher
        kl = [s["extras"]["distill_kl"] for s in result["steps"]]
        assert sum(kl[-3:]) / 3 < 0.9 * kl[0], kl
