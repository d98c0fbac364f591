"""TensorBoard events of a run and its restart on CPU processes (gloo): gpt-tiny over 2 ranks
in tensor parallel (both know every number; rank 0 alone writes), attempt 0 trains with
checkpoints and dies after steps it never saved, attempt 1 resumes into the same directory.
Read back with TensorBoard's own reader, every scalar holds each step once, the steps attempt 0
wrote after its checkpoint replaced by attempt 1's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from devtools.training.launch import Launch, example_config, launch
from kubetron_api.wire import ATTEMPT_ENV, JOB_UID_ENV
from kubetron_trainer.observe import tensorboard as tb

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
EVERY_STEP = (tb.LOSS, tb.GRAD_NORM, tb.LEARNING_RATE, tb.TOKENS_PER_S, tb.TFLOPS, tb.STEP_TIME)


def attempt(cfg: dict[str, Any], workdir: Path, number: int) -> Launch:
    env = {JOB_UID_ENV: "uid-1", ATTEMPT_ENV: str(number)}
    started = launch(cfg, workdir, extra_env=env)
    codes = started.wait()
    assert codes == [0, 0], f"exit codes {codes}:\n{started.output()[-6000:]}"
    return started


def losses(started: Launch) -> dict[int, float]:
    return {s["step"]: s["loss"] for s in started.result()["steps"]}


def test_a_restart_continues_the_events_of_the_same_directory(tmp_path: Path) -> None:
    board = tmp_path / "ckpt" / "tensorboard"
    cfg = example_config(
        recipe={"trainIters": 6, "logInterval": 2, "eval": {"interval": 2, "iterations": 1}},
        parallelism={"tensor": 2},
        data={"split": "90,10,0"},
        checkpoint={"path": str(tmp_path / "ckpt" / "run"), "saveInterval": 2},
        metrics={"enabled": False},
        observability={"tensorboard": {"path": str(board)}},
        worldSize=2,
        gpusPerNode=2,
    )
    first = attempt(cfg, tmp_path / "a0", 0)
    # as if attempt 0 died after saving step 4: its steps 5 and 6 were logged, never saved
    ckpt = Path(cfg["checkpoint"]["path"])
    shutil.rmtree(ckpt / "iter_0000006")
    (ckpt / "latest").write_text("4\n")
    second = attempt(json.loads(json.dumps(cfg)) | {"recipe": cfg["recipe"] | {"trainIters": 8}},
                     tmp_path / "a1", 1)  # fmt: skip
    assert second.result()["resumed_from"] == 4

    files = sorted(board.iterdir())
    assert len(files) == 2  # one event file per attempt, both from rank 0 (its pid in the name)
    pids = {int(re.search(r"\.(\d+)\.\d+$", f.name).group(1)) for f in files}  # type: ignore[union-attr]
    assert pids == {first.procs[0].pid, second.procs[0].pid}

    acc = EventAccumulator(str(board))
    acc.Reload()
    got = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    assert set(got) == {*EVERY_STEP, tb.ATTEMPT, tb.VALIDATION_LOSS, tb.VALIDATION_PPL}
    for tag in EVERY_STEP:
        assert [s for s, _ in got[tag]] == list(range(1, 9)), tag
    want = {**{s: v for s, v in losses(first).items() if s <= 4}, **losses(second)}
    assert got[tb.LOSS] == [(s, pytest.approx(want[s], rel=1e-6)) for s in range(1, 9)]
    assert got[tb.ATTEMPT] == [(s, 0.0) for s in range(1, 5)] + [(s, 1.0) for s in range(5, 9)]
    evaluations = {e["step"]: e["loss"] for e in first.result()["validation"] if e["step"] <= 4}
    evaluations |= {e["step"]: e["loss"] for e in second.result()["validation"]}
    assert got[tb.VALIDATION_LOSS] == [
        (s, pytest.approx(evaluations[s], rel=1e-6)) for s in (2, 4, 6, 8)
    ]
