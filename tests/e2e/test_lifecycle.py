"""Faults during real training on the real node, and what the operator makes of them: a killed
trainer process, a deleted pod and a stopped rank each restart every pod of the job as the next
attempt, which resumes from the latest complete checkpoint and ends Succeeded with every step
trained once; a suspended job saves its current step and a resume continues from it.

The jobs are the CPU example (2 pods x 2 processes, TP2 x DP2) run longer, each with its own
checkpoint claim; faults are injected through `kubectl exec` and `kubectl delete` once the
checkpoint of step 40 is written (devtools/cluster/faults.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.cluster import Cluster, deploy, faults
from tests.e2e.test_train import assert_final_progress

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

ITERS, SAVE, GBS = 400, 20, 8  # the example's global batch
TIMEOUT = 600.0
FIRST_SAVE = rf"saved checkpoint of step {2 * SAVE}\b"


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
    volume = start(cluster, life, name)
    faults.wait_for_log(cluster, life, f"{name}-worker-0", FIRST_SAVE)
    rank = faults.signal_rank(cluster, life, f"{name}-worker-1", "KILL")
    assert rank == 3  # worker 1 holds global ranks 2 and 3
    status = finished(cluster, life, name)["status"]
    assert (status["attempt"], status["restarts"]) == (2, 1)
    restarting = next(c for c in status["conditions"] if c["type"] == "Restarting")
    assert (restarting["status"], restarting["message"]) == ("False", "attempt 2 runs")
    warnings = [e for e in events(cluster, life, name) if e["type"] == "Warning"]
    assert any(
        e["reason"] == "PodFailed"
        and "attempt 1 ended: pod life-kill-" in e["message"]
        and "restarting every pod as attempt 2" in e["message"]
        for e in warnings
    ), warnings
    resumed_and_trained_once(cluster, life, name, volume)
    # the final progress is the second attempt's end, from its rank 0's exit report
    assert_final_progress(status, deploy.logs(cluster, life, f"{name}-worker-0"), ITERS)
    meta = json.loads((volume / f"iter_{ITERS:07d}" / "kubetron.json").read_text())
    assert meta["attempt"] == 2
    assert (volume / "attempt").read_text().split()[1] == "2"  # attempt 2 fenced the directory


def test_a_deleted_pod_restarts_every_pod(cluster: Cluster, life: str) -> None:
    """The deleted pod's SIGTERM reaches every rank at the next step boundary: all save that
    step, then the operator replaces the attempt, which resumes from it."""
    name = "life-delete"
    volume = start(cluster, life, name)
    faults.wait_for_log(cluster, life, f"{name}-worker-0", FIRST_SAVE)
    cluster.kubectl("delete", "pod", "-n", life, f"{name}-worker-1", "--wait=false")
    status = finished(cluster, life, name)["status"]
    assert (status["attempt"], status["restarts"]) == (2, 1)
    reasons = {e["reason"] for e in events(cluster, life, name) if e["type"] == "Warning"}
    assert reasons & {"PodDeleted", "PodFailed"}, reasons
    resumed_and_trained_once(cluster, life, name, volume)


def test_a_stopped_rank_passes_the_progress_deadline_and_restarts_the_group(
    cluster: Cluster, life: str
) -> None:
    name = "life-stop"
    volume = start(cluster, life, name, runPolicy={"progressDeadlineSeconds": 40})
    faults.wait_for_log(cluster, life, f"{name}-worker-0", FIRST_SAVE)
    faults.signal_rank(cluster, life, f"{name}-worker-1", "STOP")  # hangs every collective
    status = finished(cluster, life, name)["status"]
    assert (status["attempt"], status["restarts"]) == (2, 1)
    deadline = [e for e in events(cluster, life, name) if e["reason"] == "ProgressDeadlineExceeded"]
    assert deadline and "has not advanced for" in deadline[0]["message"], deadline
    assert "spec.runPolicy.progressDeadlineSeconds=40" in deadline[0]["message"]
    resumed_and_trained_once(cluster, life, name, volume)


def test_suspend_saves_the_current_step_and_resume_continues_from_it(
    cluster: Cluster, life: str
) -> None:
    name = "life-suspend"
    volume = start(cluster, life, name)
    faults.wait_for_log(cluster, life, f"{name}-worker-0", FIRST_SAVE)
    patch = json.dumps({"spec": {"runPolicy": {"suspend": True}}})
    cluster.kubectl("patch", "mj", name, "-n", life, "--type", "merge", "-p", patch)
    cluster.wait_for(
        lambda: (
            (cluster.get("megatronjob", name, life) or {}).get("status", {}).get("phase")
            == "Suspended"
            and not deploy.pods(cluster, life, name)
        ),
        timeout=TIMEOUT,
        what=f"{name} Suspended with its pods gone",
    )
    saved = int((volume / "latest").read_text())
    assert 2 * SAVE <= saved < ITERS
    patch = json.dumps({"spec": {"runPolicy": {"suspend": False}}})
    cluster.kubectl("patch", "mj", name, "-n", life, "--type", "merge", "-p", patch)
    status = finished(cluster, life, name)["status"]
    assert (status["attempt"], status["restarts"]) == (1, 0)  # a suspend is no failure
    assert resumed_and_trained_once(cluster, life, name, volume) == saved
