"""The TrainJob backend for real: the CPU example trained on the real node through a Kubeflow
Trainer v2 TrainJob (Trainer v2 and JobSet controllers beside the control plane, the chart's
ClusterTrainingRuntime and the operator's TrainJob RBAC on).

A killed trainer process ends attempt 1; the operator deletes its TrainJob and creates attempt
2's, which resumes from the latest checkpoint and ends Succeeded. A suspended job suspends its
TrainJob: the pods save the current step on SIGTERM, and the resumed job continues from it in
the same attempt. `kubectl get mj` shows the progress the operator reads from the pod of index 0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.cluster import Cluster, deploy, faults
from kubetron_operator.backends import COMPLETION_INDEX_LABEL
from kubetron_operator.lifecycle import ATTEMPT_LABEL
from kubetron_operator.render_trainjob import NODE

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

ITERS, SAVE = 400, 20  # about 5 steps a second: attempt 2 runs over a minute
TIMEOUT = 600.0
FIRST_SAVE = rf"saved checkpoint of step {2 * SAVE}\b"
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def tj(cluster: Cluster) -> Iterator[str]:
    """Trainer v2 and JobSet running; a restricted namespace watched by a `helm install`ed
    operator with the TrainJob backend on, reading progress every 2 s."""
    namespace, release = "e2e-trainjob", "kubetron-tj"
    cluster.start_trainer_v2()
    restricted = {"pod-security.kubernetes.io/enforce": "restricted"}
    try:
        for ns in (namespace, release):
            metadata = {"name": ns, "labels": restricted}
            cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})
        deploy.install_operator(cluster, release, release, watch=[namespace], crds=False,
                                progress_seconds=2, train_job=True)  # fmt: skip
        yield namespace
        deploy.uninstall_operator(cluster, release, release)
        cluster.kubectl("delete", "namespace", namespace, release, "--wait=false")
    finally:
        cluster.stop_trainer_v2()


def start(cluster: Cluster, namespace: str, name: str) -> Path:
    return faults.apply_long_job(cluster, namespace, name, ITERS, SAVE, backend="TrainJob")


def pod(cluster: Cluster, namespace: str, name: str, index: int, attempt: int = 1) -> str:
    """The name of the job's pod of completion index `index` in `attempt`, once it exists."""

    def found() -> str | None:
        for p in deploy.pods(cluster, namespace, name):
            labels = p["metadata"]["labels"]
            if labels.get(COMPLETION_INDEX_LABEL) == str(index) and labels.get(
                ATTEMPT_LABEL
            ) == str(attempt):
                return str(p["metadata"]["name"])
        return None

    return cluster.wait_for(found, timeout=TIMEOUT, what=f"{name}'s pod {index} of {attempt}")


def progress_listed(cluster: Cluster, namespace: str, name: str, least: int) -> bool:
    """`kubectl get mj` shows the job Running at a step (at least `least`) the operator read
    from rank 0."""
    header, row = cluster.kubectl("get", "mj", name, "-n", namespace).stdout.splitlines()[:2]
    columns = dict(zip(header.split(), row.split(), strict=False))
    step = columns.get("STEP", "")
    return columns.get("PHASE") == "Running" and step.isdigit() and int(step) >= least


def finished(cluster: Cluster, namespace: str, name: str) -> Obj:
    final = deploy.wait_final(cluster, namespace, name, TIMEOUT)
    assert final["status"]["phase"] == "Succeeded", json.dumps(final["status"], indent=1)
    return final


def resumed_and_trained_once(log: str, volume: Path) -> int:
    """The attempt that logged `log` resumed from a checkpoint at or after step 40 and trained
    every later step once, to the end; returns the step it resumed from."""
    m = re.search(r"resumed from \S+ \(step (\d+)\)", log)
    assert m, log[-3000:]
    resumed = int(m[1])
    assert resumed >= 2 * SAVE, log[-3000:]
    assert [s for s, _, _ in deploy.steps(log)] == list(range(resumed + 1, ITERS + 1))
    assert (volume / "latest").read_text().strip() == str(ITERS)
    return resumed


def test_a_killed_trainer_restarts_the_trainjob_from_its_checkpoint(
    cluster: Cluster, tj: str
) -> None:
    name = "tj-kill"
    volume = start(cluster, tj, name)
    faults.wait_for_log(cluster, tj, pod(cluster, tj, name, 0), FIRST_SAVE, container=NODE)
    first = (cluster.get("trainjob", name, tj) or {})["metadata"]["uid"]
    faults.signal_rank(cluster, tj, pod(cluster, tj, name, 1), "KILL", container=NODE)
    # attempt 1 ended near step 40: only attempt 2 reaches half way
    cluster.wait_for(lambda: progress_listed(cluster, tj, name, ITERS // 2), timeout=TIMEOUT,
                     what=f"{name}'s step in `kubectl get mj`", interval=0.5)  # fmt: skip
    status = finished(cluster, tj, name)["status"]
    assert (status["attempt"], status["restarts"]) == (2, 1)
    assert status["failures"]["last"]["cause"] in ("Signal", "CollectiveTimeout"), status
    trainjob = cluster.get("trainjob", name, tj) or {}
    assert trainjob["metadata"]["uid"] != first
    assert trainjob["metadata"]["labels"][ATTEMPT_LABEL] == "2"
    log = deploy.logs(cluster, tj, pod(cluster, tj, name, 0, attempt=2), NODE)
    resumed_and_trained_once(log, volume)
    assert (volume / "attempt").read_text().split()[1] == "2"  # attempt 2 fenced the directory


def test_suspend_saves_and_resume_continues_in_the_same_attempt(cluster: Cluster, tj: str) -> None:
    name = "tj-suspend"
    volume = start(cluster, tj, name)
    faults.wait_for_log(cluster, tj, pod(cluster, tj, name, 0), FIRST_SAVE, container=NODE)
    faults.set_suspend(cluster, tj, name, True, TIMEOUT)
    assert (cluster.get("trainjob", name, tj) or {})["spec"]["suspend"] is True
    saved = int((volume / "latest").read_text())
    assert 2 * SAVE <= saved < ITERS
    faults.set_suspend(cluster, tj, name, False, TIMEOUT)
    status = finished(cluster, tj, name)["status"]
    assert (status["attempt"], status["restarts"]) == (1, 0)  # a suspend is no failure
    log = deploy.logs(cluster, tj, pod(cluster, tj, name, 0), NODE)
    assert resumed_and_trained_once(log, volume) == saved
