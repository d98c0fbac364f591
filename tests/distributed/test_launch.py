"""The pod command end to end: launcher -> real torchrun -> trainer workers -> the pod's code.

torchrun alone exits 1 for both cases below; the PyTorchJob's ExitCode policy needs 2 (do not
restart) and 143 (restart after preemption).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.train_harness import ROOT, example_config
from tests.ports import free_port

pytestmark = pytest.mark.distributed


def _launch(cfg: dict[str, object], tmp_path: Path, nproc: int) -> subprocess.Popen[str]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    argv = [
        sys.executable, "-m", "kubetron_trainer.launch",
        "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "kubetron_trainer", "--config", str(path), "--device", "cpu",
    ]  # fmt: skip
    log = (tmp_path / "launch.log").open("w")
    return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)


def test_bad_config_gives_the_workers_permanent_code(tmp_path: Path) -> None:
    cfg = example_config()
    cfg["worldSize"] = 4  # but two processes start
    proc = _launch(cfg, tmp_path, nproc=2)
    assert proc.wait(timeout=300) == 2, (tmp_path / "launch.log").read_text()[-3000:]


def test_sigterm_to_the_pod_command_exits_retryable(tmp_path: Path) -> None:
    cfg = example_config(
        recipe={"trainIters": 100000, "logInterval": 1},
        checkpoint={"path": str(tmp_path / "ckpt"), "saveInterval": 100000},
        parallelism={"tensor": 2},
    )
    cfg["worldSize"] = 2
    cfg["gpusPerNode"] = 2
    cfg["recipe"]["globalBatchSize"] = 2
    proc = _launch(cfg, tmp_path, nproc=2)
    log = tmp_path / "launch.log"
    deadline = time.monotonic() + 240
    while "step 2/" not in log.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 143, log.read_text()[-3000:]
    assert (tmp_path / "ckpt" / "latest").exists()
