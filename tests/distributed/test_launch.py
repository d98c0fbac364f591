"""The pod command end to end: launcher -> real torchrun -> trainer workers -> the pod's code.

torchrun alone exits 1 for both cases below; the PyTorchJob's ExitCode policy needs 2 (do not
restart) and 143 (restart after preemption).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.ports import free_port
from devtools.training.launch import ROOT, example_config

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
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}  # as in a pod
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )


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


SLOW_SAVER = """
import os, signal, sys, time
def save_and_exit(signum, frame):
    time.sleep(float(os.environ["SAVE_SECONDS"]))  # a checkpoint longer than torchrun's 30 s
    open(os.path.join(os.environ["OUT"], "saved-" + os.environ["RANK"]), "w").close()
    sys.exit(143)
signal.signal(signal.SIGTERM, save_and_exit)
open(os.path.join(os.environ["OUT"], "started-" + os.environ["RANK"]), "w").close()
while True:
    time.sleep(1)
"""


@pytest.mark.slow
def test_sigterm_gives_workers_more_than_torchruns_30_seconds(tmp_path: Path) -> None:
    """The pod's grace period, not torchrun's 30 s, bounds a save on SIGTERM: the launcher
    signals the workers itself, and they finish a 35-second save."""
    script = tmp_path / "saver.py"
    script.write_text(SLOW_SAVER)
    argv = [
        sys.executable, "-m", "kubetron_trainer.launch", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
    ]  # fmt: skip
    env = {**os.environ, "OUT": str(tmp_path), "SAVE_SECONDS": "35"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("started-*"))) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert sorted(p.name for p in tmp_path.glob("saved-*")) == ["saved-0", "saved-1"], out
    assert proc.returncode == 143, out


RANK_REPORTER = """
import os
name = "rank-" + os.environ["RANK"]
open(os.path.join(os.environ["OUT"], name), "w").write(os.environ["KUBETRON_REPLICA_INDEX"])
"""


def test_the_launcher_gives_torchrun_the_node_rank_of_its_replica_index(tmp_path: Path) -> None:
    """Four launchers, as in four pods of one template: each reads its replica index and the
    operator's node order, and torchrun's ranks follow the order (pod 1 holds node rank 2)."""
    script = tmp_path / "report.py"
    script.write_text(RANK_REPORTER)
    port = str(free_port())
    procs = []
    for index in range(4):
        env = {**os.environ, "OUT": str(tmp_path), "KUBETRON_REPLICA_INDEX": str(index),
               "KUBETRON_NODE_RANKS": "0,2,1,3", "PET_NNODES": "4", "PET_NPROC_PER_NODE": "1",
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port}  # fmt: skip
        env.pop("PET_NODE_RANK", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kubetron_trainer.launch", str(script)], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    assert "pod 1 of 0,2,1,3: node rank 2" in outs[1], outs[1]
    # the pod (replica index) each global rank ran in: ranks 1 and 2 swapped pods
    found = {p.name: p.read_text() for p in tmp_path.glob("rank-*")}
    assert found == {"rank-0": "0", "rank-1": "2", "rank-2": "1", "rank-3": "3"}, found
