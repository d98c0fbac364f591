"""The trainer end to end on CPU: 4 processes over gloo, gpt-tiny from the CPU example.

One TP2 x DP2 run on an indexed dataset (built with the byte tokenizer) is shared by the
training, metrics and resume tests; the others start their own runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.hf_tokenizer import paragraphs
from devtools.training.launch import (
    ROOT,
    Launch,
    example_config,
    launch,
    run,
    scrape,
    wait_for_line,
)

pytestmark = pytest.mark.distributed
STEPS, SAVE_EVERY = 20, 10


def tokenize(tmp: Path) -> str:
    text = tmp / "text.txt"
    text.write_text(paragraphs(300))
    prefix = tmp / "data" / "text"
    cmd = [sys.executable, "-m", "kubetron_trainer.tools.prepare", str(text), "--append-eod"]
    cmd += ["--workers", "1", "--output-prefix", str(prefix)]
    subprocess.run(cmd, check=True, cwd=ROOT / "trainer")
    return str(prefix)


def losses(started: Launch) -> list[float]:
    return [s["loss"] for s in started.result()["steps"]]


@pytest.fixture(scope="module")
def tp2_dp2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """TP2 x DP2 on indexed text: 20 steps, checkpoints at 10 and 20, metrics scraped at the end."""
    tmp = tmp_path_factory.mktemp("tp2dp2")
    cfg = example_config(
        recipe={
            "trainIters": STEPS,
            "logInterval": 1,
            "lrSchedule": {"warmupIters": 2, "decayIters": STEPS},
        },
        data={"type": "indexed", "paths": [{"prefix": tokenize(tmp)}]},
        checkpoint={"path": str(tmp / "ckpt"), "saveInterval": SAVE_EVERY},
    )
    started = launch(cfg, tmp / "run", "--metrics-linger", "8")
    wait_for_line(started, "done:")
    text = scrape(cfg["metrics"]["port"])
    codes = started.wait()
    assert codes == [0, 0, 0, 0], started.output()[-6000:]
    return {"cfg": cfg, "run": started, "metrics": text, "tmp": tmp}


def test_tp2_dp2_trains_on_indexed_data_and_loss_falls(tp2_dp2: dict[str, Any]) -> None:
    result = tp2_dp2["run"].result()
    loss = losses(tp2_dp2["run"])
    assert len(loss) == STEPS and result["resumed_from"] == 0
    assert loss[0] == pytest.approx(6.24, abs=0.1)  # ln(512): an untrained model
    assert sum(loss[-3:]) / 3 < loss[0] - 1.0, loss
    assert "SDPA" in result["attention"]
    ckpt = Path(tp2_dp2["cfg"]["checkpoint"]["path"])
    assert (ckpt / "latest").read_text().strip() == str(STEPS)
    assert {p.name for p in ckpt.iterdir()} == {"latest", "iter_0000010", "iter_0000020"}


def test_metrics_endpoint_serves_documented_metrics(tp2_dp2: dict[str, Any]) -> None:
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(tp2_dp2["metrics"])
        for s in family.samples
    }
    job = (("job", "gpt-tiny-cpu"),)
    last = tp2_dp2["run"].result()["steps"][-1]
    cfg = tp2_dp2["cfg"]["recipe"]
    assert samples[("kubetron_train_step", job)] == STEPS
    assert samples[("kubetron_train_loss", job)] == pytest.approx(last["loss"], rel=1e-6)
    assert samples[("kubetron_train_learning_rate", job)] == pytest.approx(last["lr"])
    assert samples[("kubetron_train_grad_norm", job)] == pytest.approx(last["grad_norm"])
    tokens = STEPS * cfg["globalBatchSize"] * cfg["seqLength"]
    assert samples[("kubetron_train_tokens_total", job)] == pytest.approx(tokens)
    assert samples[("kubetron_train_step_duration_seconds_count", job)] == STEPS
    assert samples[("kubetron_train_step_duration_seconds_sum", job)] > 0
    assert samples[("kubetron_checkpoint_save_duration_seconds_count", job)] == 2
    assert samples[("kubetron_data_wait_seconds_count", job)] == STEPS
    assert 0 < samples[("kubetron_train_tokens_per_second", job)] < 1e7
    assert 0 < samples[("kubetron_train_model_tflops_per_gpu", job)] < 10
    # No peak is known for a CPU, so MFU stays unset; GPU memory exists only on CUDA.
    names = {name for name, _ in samples}
    assert "kubetron_train_mfu_ratio" not in names
    assert "kubetron_gpu_memory_allocated_bytes" not in names


def test_resume_from_checkpoint_gives_uninterrupted_losses(
    tp2_dp2: dict[str, Any], tmp_path: Path
) -> None:
    # As if the job died after saving step 10: latest -> 10, step 20 never written.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tp2_dp2["cfg"]["checkpoint"]["path"], ckpt)
    shutil.rmtree(ckpt / "iter_0000020")
    (ckpt / "latest").write_text("10\n")
    cfg = json.loads(json.dumps(tp2_dp2["cfg"]))
    cfg["checkpoint"]["path"] = str(ckpt)
    cfg["metrics"]["enabled"] = False
    resumed = run(cfg, tmp_path / "run")
    assert resumed.result()["resumed_from"] == SAVE_EVERY
    assert resumed.result()["rng"] == "restored"  # the same shape: every rank's RNG states
    assert resumed.result()["first_sample"] == SAVE_EVERY * cfg["recipe"]["globalBatchSize"]
    assert losses(resumed) == losses(tp2_dp2["run"])[SAVE_EVERY:]


def test_dp4_trains_on_mock_data_and_loss_falls(tmp_path: Path) -> None:
    cfg = example_config(
        recipe={"trainIters": 10, "logInterval": 5},
        parallelism={"tensor": 1},
        checkpoint={"path": None},
        metrics={"enabled": False},
    )
    loss = losses(run(cfg, tmp_path / "dp4"))
    assert loss[0] == pytest.approx(6.24, abs=0.1)
    assert max(loss[-3:]) < loss[0] - 0.03, loss  # mock data: slow but steady


def test_global_parallel_state_gives_the_same_losses(
    tp2_dp2: dict[str, Any], tmp_path: Path
) -> None:
    # The same first steps (the LR schedule is pinned by decayIters) on Megatron's own groups.
    cfg = json.loads(json.dumps(tp2_dp2["cfg"]))
    cfg["recipe"]["trainIters"] = 6
    cfg["checkpoint"]["path"] = None
    cfg["metrics"]["enabled"] = False
    theirs = run(cfg, tmp_path / "global", groups="global")
    assert theirs.result()["groups"] == "global"
    assert losses(theirs) == losses(tp2_dp2["run"])[:6]


def test_sigterm_saves_and_exits_retryable(tmp_path: Path) -> None:
    cfg = example_config(
        recipe={"trainIters": 5000, "logInterval": 1},
        checkpoint={"path": str(tmp_path / "ckpt"), "saveInterval": 1000},
        metrics={"enabled": False},
    )
    codes_dir = tmp_path / "codes"
    started = launch(cfg, tmp_path / "run", extra_env={"KUBETRON_EXIT_CODE_DIR": str(codes_dir)})
    wait_for_line(started, "step 3/5000")
    started.procs[0].send_signal(signal.SIGTERM)  # one rank is enough: the ranks agree
    codes = started.wait()
    assert codes == [143] * 4, started.output()[-4000:]
    saved = int((tmp_path / "ckpt" / "latest").read_text())
    assert 3 <= saved < 1000
    assert (tmp_path / "ckpt" / f"iter_{saved:07d}" / "metadata.json").is_file()
    meta = json.loads((tmp_path / "ckpt" / f"iter_{saved:07d}" / "kubetron.json").read_text())
    assert (meta["step"], meta["consumedSamples"]) == (saved, saved * 8)
    assert "exiting 143 (retryable)" in started.output()
    records = [p.read_text().partition("\n") for p in codes_dir.iterdir()]
    assert sorted(code for code, _, _ in records) == ["143"] * 4  # first line: the code
    assert all("SIGTERM" in message for _, _, message in records)  # then why (the pod's message)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"recipe": {"microBatchSize": 0}}, "recipe.microBatchSize"),
        ({"parallelism": {"tensor": 3}}, "spec.parallelism.tensor=3"),
        (
            {
                "data": {"type": "indexed", "paths": [{"prefix": "/nonexistent/x"}]},
                "parallelism": {"tensor": 1},
            },
            "data.paths[0].prefix",
        ),
    ],
)
def test_bad_config_exits_2_naming_the_field(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    cfg = example_config(**change)
    cfg["worldSize"] = 1
    cfg["gpusPerNode"] = 1 if "tensor" not in json.dumps(change) else 4
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "kubetron_trainer", "--config", str(config)],
        cwd=ROOT / "trainer",
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'trainer'}:{ROOT / 'operator'}"},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert field in proc.stdout + proc.stderr


def test_sigterm_while_lingering_for_metrics_exits_0(tmp_path: Path) -> None:
    # Training is complete; a SIGTERM (pod deleted) must end the linger, not be ignored.
    cfg = example_config(
        recipe={"trainIters": 2}, checkpoint={"path": None}, worldSize=2, gpusPerNode=2
    )
    started = launch(cfg, tmp_path / "run", "--metrics-linger", "600")
    wait_for_line(started, "done:")
    for proc in started.procs:  # as torchrun forwards it to every worker
        proc.send_signal(signal.SIGTERM)
    assert started.wait(timeout=60) == [0, 0], started.output()[-4000:]


def test_a_run_without_a_metrics_directory_removes_the_one_it_made(tmp_path: Path) -> None:
    """Outside a pod (no PROMETHEUS_MULTIPROC_DIR from the operator) the trainer makes
    /tmp/kubetron-metrics-<job>-<port> and removes it after a successful run."""
    import glob

    job = f"nodir-{os.getpid()}"
    cfg = example_config(
        recipe={"trainIters": 2}, checkpoint={"path": None}, worldSize=2, gpusPerNode=2,
        jobName=job,
    )  # fmt: skip
    env: dict[str, str | None] = {"PROMETHEUS_MULTIPROC_DIR": None}
    started = launch(cfg, tmp_path / "run", "--metrics-linger", "3", extra_env=env)
    deadline = time.monotonic() + 120
    while not glob.glob(f"/tmp/kubetron-metrics-{job}-*/*.db"):  # written while it runs
        assert time.monotonic() < deadline and started.procs[0].poll() is None, started.output()
        time.sleep(0.2)
    assert started.wait() == [0, 0], started.output()[-3000:]
    assert "metrics" not in {p.name for p in (tmp_path / "run").iterdir()}
    assert glob.glob(f"/tmp/kubetron-metrics-{job}-*") == []
