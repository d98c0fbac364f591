"""spec.observability.tensorboard: the operator's volume rule, the trainer config carrying it,
and the writer's tags (read back with TensorBoard's own reader)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kubetron_api.parse import parse_job
from kubetron_operator.plan import PlanError, plan
from kubetron_trainer.observe import tensorboard as tb
from kubetron_trainer.observe.metrics import StepStats
from tests.builders import job_dict

REFUSED = "spec.observability.tensorboard.path=/scratch/tb is on no volume the pods mount"
CKPT_VOLUME = {"path": "/ckpt", "volume": {"claimName": "runs"}}
MOUNTS = {"volumeMounts": [{"name": "runs", "mountPath": "/runs/"}]}


def job(board_path: str, checkpoint: dict[str, Any], resources: dict[str, Any]) -> Any:
    obj = job_dict("gpt-tiny", nodes=1, gpusPerNode=1, globalBatchSize=2, seqLength=128)
    spec = obj["spec"]
    spec["observability"] = {"tensorboard": {"path": board_path}}
    spec["checkpoint"] = checkpoint
    spec["resources"] |= resources
    return parse_job(obj)


@pytest.mark.parametrize(
    ("path", "checkpoint", "resources"),
    [
        ("/ckpt/tb", CKPT_VOLUME, {}),
        ("/ckpt", CKPT_VOLUME, {}),
        ("/runs/tb/job", {}, MOUNTS),
        ("/runs/tb", {"path": "/runs/ckpt"}, MOUNTS),
    ],
    ids=["under-checkpoint-volume", "the-checkpoint-path", "under-a-mount", "checkpoint-on-mount"],
)
def test_a_board_on_a_mounted_volume_is_carried_into_the_trainer_config(
    path: str, checkpoint: dict[str, Any], resources: dict[str, Any]
) -> None:
    board = plan(job(path, checkpoint, resources)).trainer_config.observability.tensorboard
    assert board is not None and board.path == path


@pytest.mark.parametrize(
    ("checkpoint", "resources"),
    [
        ({}, {}),
        ({"path": "/scratch"}, {}),  # a checkpoint path without its volume mounts nothing
        (CKPT_VOLUME, MOUNTS),
        ({}, {"volumeMounts": [{"name": "s", "mountPath": "/scratch/tb2"}]}),
        ({}, {"volumeMounts": [{"name": "s", "mountPath": "/scratch/t"}]}),  # not a prefix dir
    ],
)
def test_a_board_off_every_volume_is_refused_naming_the_field_and_the_fix(
    checkpoint: dict[str, Any], resources: dict[str, Any]
) -> None:
    with pytest.raises(PlanError) as info:
        plan(job("/scratch/tb", checkpoint, resources))
    [problem] = [p for p in info.value.problems if "tensorboard" in p]
    assert problem.startswith(REFUSED), problem
    assert "spec.checkpoint.volume" in problem and "spec.resources.volumeMounts" in problem


def test_no_board_by_default() -> None:
    cfg = plan(parse_job(job_dict("gpt-tiny", nodes=1, gpusPerNode=1, seqLength=128)))
    assert cfg.trainer_config.observability.tensorboard is None


def stats(step: int, mfu: float | None = 0.25, **extras: float) -> StepStats:
    return StepStats(step, 2.0 / step, 1.5, 1e-4 * step, 0.5, 256, 512.0, 3.0, mfu, extras)


def scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(path))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_the_writer_writes_every_step_number_under_its_tag(tmp_path: Path) -> None:
    board = tb.TensorBoard(str(tmp_path), 1, 3, torch.device("cpu"))
    board.record_step(stats(1, chosen_reward=0.5, rewards_margin=0.1), flush=True)
    board.record_step(stats(2, mfu=None, chosen_reward=0.7, rewards_margin=0.2), flush=False)
    board.record_validation(2, 1.25, 3.49)
    board.close()
    got = scalars(tmp_path)
    assert set(got) == {
        tb.LOSS,
        tb.GRAD_NORM,
        tb.LEARNING_RATE,
        tb.TOKENS_PER_S,
        tb.TFLOPS,
        tb.STEP_TIME,
        tb.MFU,
        tb.ATTEMPT,
        tb.RECIPE + "chosen_reward",
        tb.RECIPE + "rewards_margin",
        tb.VALIDATION_LOSS,
        tb.VALIDATION_PPL,
    }  # fmt: skip (no GPU: no memory tags)
    assert got[tb.LOSS] == [(1, 2.0), (2, 1.0)]
    assert got[tb.LEARNING_RATE] == [(1, pytest.approx(1e-4)), (2, pytest.approx(2e-4))]
    assert got[tb.MFU] == [(1, 0.25)]  # not measured at step 2 (no peak FLOPs known)
    assert got[tb.ATTEMPT] == [(1, 3.0), (2, 3.0)]
    assert got[tb.RECIPE + "chosen_reward"] == [(1, 0.5), (2, pytest.approx(0.7))]
    assert got[tb.VALIDATION_LOSS] == [(2, 1.25)]


def test_a_restart_appends_and_hides_the_steps_after_its_checkpoint(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    first = tb.TensorBoard(str(tmp_path), 1, 0, cpu)
    for step in range(1, 6):  # the attempt saved step 3, then died after step 5
        first.record_step(stats(step), flush=True)
    first.close()
    second = tb.TensorBoard(str(tmp_path), 4, 1, cpu)  # resumed from step 3
    for step in range(4, 8):
        second.record_step(stats(step), flush=True)
    second.close()
    assert len(list(tmp_path.iterdir())) == 2  # one event file per attempt, one directory
    got = scalars(tmp_path)
    assert [s for s, _ in got[tb.LOSS]] == list(range(1, 8))
    assert got[tb.ATTEMPT] == [(s, 0.0) for s in range(1, 4)] + [(s, 1.0) for s in range(4, 8)]
