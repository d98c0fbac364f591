"""Faults during real training on the real node, and what the operator makes of them: a killed
trainer process, a deleted pod and a stopped rank each restart every pod of the job as the next
attempt, which resumes from the latest complete checkpoint and ends Succeeded with every step
trained once; a suspended job saves its current step and a resume continues from it. The killed
job also evaluates and writes TensorBoard events onto its checkpoint volume: read back with
TensorBoard's own reader, every scalar holds each step once across the restart.

The status names each failure's cause and node: a trainer OOM-killed at its memory limit fails
the job at once (no retry, the fix named); a pod cut off from its peers' network times out their
collectives, which restarts the group.

The jobs are the CPU example (2 pods x 2 processes, TP2 x DP2) run longer, each with its own
checkpoint claim; faults are injected through `kubectl exec` and `kubectl delete` once the
checkpoint of step 40 is written (devtools/cluster/faults.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from devtools.cluster import Cluster, deploy, faults
from kubetron_trainer.observe import tensorboard as tb
from tests.distributed.test_tensorboard_cpu import EVERY_STEP
from tests.e2e.test_train import assert_final_progress

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

ITERS, SAVE, GBS = 400, 20, 8  # the example's global batch
TIMEOUT = 600.0
FIRST_SAVE = rf"saved checkpoint of step {2 * SAVE}\b"
EVAL = 20  # validation every EVAL steps, on the mock data's validation split
BOARD = "tensorboard"  # under the example's checkpoint.path, the claim's root


@pytest.fixture(scope="module")
def life(cluster: Cluster) -> Iterator[str]:
    """A restricted namespace watched by a `helm install`ed operator reading progress every 2 s."""
    namespace, release = "e2e-life", "kubetron-life"
    restricted = {"pod-security.kubernetes.io/enforce": "restricted"}
    for ns in (namespace, release):
        metadata = {"name": ns, "labels": restricted}
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})
    deploy.install_operator(
        cluster, release, release, watch=[namespace], crds=False, progress_seconds=2
    )
    yield namespace
    deploy.uninstall_operator(cluster, release, release)
    cluster.kubectl("delete", "namespace", namespace, release, "--wait=false")


def start(cluster: Cluster, namespace: str, name: str, **changes: Any) -> Path:
    return faults.apply_long_job(cluster, namespace, name, ITERS, SAVE, **changes)


def events(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector",
        f"involvedObject.kind=MegatronJob,involvedObject.name={name}", "-o", "json",
    ).stdout  # fmt: skip
    return list(json.loads(out)["items"])


def restarted_once(
    cluster: Cluster, namespace: str, name: str, fault: Callable[[str], object], **changes: Any
) -> tuple[dict[str, Any], Path]:
    """Start the long job, apply `fault` to worker 1 once the checkpoint of step 40 is written,
    and wait for the end: Succeeded as attempt 2 after one restart. Returns the status and the
    checkpoint volume."""
    volume = start(cluster, namespace, name, **changes)
    faults.wait_for_log(cluster, namespace, f"{name}-worker-0", FIRST_SAVE)
    fault(f"{name}-worker-1")
    status = finished(cluster, namespace, name)["status"]
    assert (status["attempt"], status["restarts"]) == (2, 1)
    return status, volume


def finished(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    final = deploy.wait_final(cluster, namespace, name, TIMEOUT)
    assert final["status"]["phase"] == "Succeeded", json.dumps(final["status"], indent=1)
    return final


def resumed_and_trained_once(cluster: Cluster, namespace: str, name: str, volume: Path) -> int:
    """The last attempt resumed from a checkpoint at or after step 40 and trained every later
    step once, to the end; the final checkpoint's data position is exactly ITERS batches."""
    log = deploy.logs(cluster, namespace, f"{name}-worker-0")
    m = re.search(r"resumed from \S+ \(step (\d+)\)", log)
    assert m, log[-3000:]
    resumed = int(m[1])
    assert resumed >= 2 * SAVE, log[-3000:]
    assert [s for s, _, _ in deploy.steps(log)] == list(range(resumed + 1, ITERS + 1))
    meta = json.loads((volume / f"iter_{ITERS:07d}" / "kubetron.json").read_text())
    assert meta["consumedSamples"] == ITERS * GBS
    assert (volume / "latest").read_text().strip() == str(ITERS)
    return resumed


def test_a_killed_trainer_restarts_every_pod_from_the_last_checkpoint(
    cluster: Cluster, life: str
) -> None:
    name = "life-kill"
    board = f"{deploy.example_job()['spec']['checkpoint']['path']}/{BOARD}"
    killed: list[int] = []

    def kill(pod: str) -> None:
        killed.append(faults.signal_rank(cluster, life, pod, "KILL"))

    status, volume = restarted_once(
        cluster, life, name, kill,
        recipe={"eval": {"interval": EVAL, "iterations": 1}}, data={"split": "90,10,0"},
        observability={"tensorboard": {"path": board}},
    )  # fmt: skip
    assert killed == [3]  # worker 1 holds global ranks 2 and 3
    assert sum(status["failures"]["counts"].values()) == 1, status["failures"]
    assert status["failures"]["last"]["node"] == deploy.real_node(cluster).name
    restarting = next(c for c in status["conditions"] if c["type"] == "Restarting")
    assert (restarting["status"], restarting["message"]) == ("False", "attempt 2 runs")
    warnings = [e for e in events(cluster, life, name) if e["type"] == "Warning"]
    assert any(
        e["reason"] == "PodFailed"
        and "attempt 1 ended: pod life-kill-" in e["message"]
        and "restarting every pod as attempt 2" in e["message"]
        for e in warnings
    ), warnings
    resumed = resumed_and_trained_once(cluster, life, name, volume)
    # the final progress is the second attempt's end, from its rank 0's exit report
    log = deploy.logs(cluster, life, f"{name}-worker-0")
    assert_final_progress(status, log, ITERS)
    assert_tensorboard(volume / BOARD, log, resumed)
    meta = json.loads((volume / f"iter_{ITERS:07d}" / "kubetron.json").read_text())
    assert meta["attempt"] == 2
    assert (volume / "attempt").read_text().split()[1] == "2"  # attempt 2 fenced the directory


def assert_tensorboard(board: Path, log: str, resumed: int) -> None:
    """Two event files (rank 0 of each attempt); every step's scalars once, from 1 to ITERS,
    those after `resumed` being the second attempt's (its logged losses, attempt 2); the
    validation loss at every EVAL steps."""
    assert len(list(board.iterdir())) == 2, sorted(board.iterdir())
    acc = EventAccumulator(str(board))
    acc.Reload()
    got = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    assert set(got) == {*EVERY_STEP, tb.ATTEMPT, tb.VALIDATION_LOSS, tb.VALIDATION_PPL}
    for tag in EVERY_STEP:
        assert [s for s, _ in got[tag]] == list(range(1, ITERS + 1)), tag
    attempts = [(s, 1.0 if s <= resumed else 2.0) for s in range(1, ITERS + 1)]
    assert got[tb.ATTEMPT] == attempts
    logged = {step: loss for step, loss, _ in deploy.steps(log)}  # the log's 4 decimals
    after = [(s, v) for s, v in got[tb.LOSS] if s > resumed]
    assert [s for s, _ in after] == sorted(logged)
    assert all(v == pytest.approx(logged[s], abs=5.1e-5) for s, v in after), after
    evals = list(range(EVAL, ITERS + 1, EVAL))
    assert [s for s, _ in got[tb.VALIDATION_LOSS]] == evals
    assert [s for s, _ in got[tb.VALIDATION_PPL]] == evals


def test_a_deleted_pod_restarts_every_pod(cluster: Cluster, life: str) -> None:
    """The deleted pod's SIGTERM reaches every rank at the next step boundary: all save that
    step, then the operator replaces the attempt, which resumes from it."""
    name = "life-delete"
    _, volume = restarted_once(
        cluster, life, name,
        lambda pod: cluster.kubectl("delete", "pod", "-n", life, pod, "--wait=false"),
    )  # fmt: skip
    reasons = {e["reason"] for e in events(cluster, life, name) if e["type"] == "Warning"}
    assert reasons & {"PodDeleted", "PodFailed"}, reasons
    resumed_and_trained_once(cluster, life, name, volume)


def test_a_stopped_rank_passes_the_progress_deadline_and_restarts_the_group(
    cluster: Cluster, life: str
) -> None:
    name = "life-stop"
    status, volume = restarted_once(
        cluster, life, name,
        lambda pod: faults.signal_rank(cluster, life, pod, "STOP"),  # hangs every collective
        runPolicy={"progressDeadlineSeconds": 40},
    )  # fmt: skip
    deadline = [e for e in events(cluster, life, name) if e["reason"] == "ProgressDeadlineExceeded"]
    assert deadline and "has not advanced for" in deadline[0]["message"], deadline
    assert "spec.runPolicy.progressDeadlineSeconds=40" in deadline[0]["message"]
    assert status["failures"]["counts"] == {"Hang": 1}, status["failures"]
    resumed_and_trained_once(cluster, life, name, volume)


def test_suspend_saves_the_current_step_and_resume_continues_from_it(
    cluster: Cluster, life: str
) -> None:
    name = "life-suspend"
    volume = start(cluster, life, name)
    faults.wait_for_log(cluster, life, f"{name}-worker-0", FIRST_SAVE)
    faults.set_suspend(cluster, life, name, True, TIMEOUT)
    saved = int((volume / "latest").read_text())
    assert 2 * SAVE <= saved < ITERS
    faults.set_suspend(cluster, life, name, False, TIMEOUT)
    status = finished(cluster, life, name)["status"]
    assert (status["attempt"], status["restarts"]) == (1, 0)  # a suspend is no failure
    assert resumed_and_trained_once(cluster, life, name, volume) == saved


def test_an_oom_killed_trainer_fails_the_job_at_once_naming_the_fix(
    cluster: Cluster, life: str
) -> None:
    """Two trainer processes do not fit 600 MiB: the kernel kills one at the pod's limit."""
    name = "life-oom"
    start(cluster, life, name, resources={"memory": "600Mi", "sharedMemory": "64Mi"})
    status = deploy.wait_final(cluster, life, name, TIMEOUT)["status"]
    assert status["phase"] == "Failed", json.dumps(status, indent=1)
    assert (status["attempt"], status["restarts"]) == (1, 0)  # no retry burned
    assert status["failures"]["counts"] == {"OOMKilled": 1}
    last = status["failures"]["last"]
    assert (last["cause"], last["attempt"]) == ("OOMKilled", 1)
    assert last["node"] == deploy.real_node(cluster).name and last["pod"].startswith(name)
    assert "spec.resources.memory" in last["message"], last
    assert "spec.recipe.microBatchSize" in last["message"], last


def test_a_pod_cut_off_from_its_peers_restarts_the_group_on_a_collective_timeout(
    cluster: Cluster, life: str
) -> None:
    name = "life-cutoff"
    status, volume = restarted_once(
        cluster, life, name, lambda pod: faults.drop_pod_traffic(cluster, life, pod),
        runPolicy={"collectiveTimeoutSeconds": 60},
    )  # fmt: skip
    assert status["failures"]["counts"] == {"CollectiveTimeout": 1}, status["failures"]
    assert status["failures"]["last"]["node"] == deploy.real_node(cluster).name
    resumed_and_trained_once(cluster, life, name, volume)
