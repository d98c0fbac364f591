"""The operator rides out restarts of its control plane (devtools.cluster.outage).

kube-apiserver and etcd are stopped and started again with the same flags and data while a job
runs and while the operator replaces a failed attempt; etcd is compacted so that the operator's
watches expire (410 Gone); the leading replica is killed halfway through a group restart. Each
time: the watches resume by themselves (the operators here resync only every 10 minutes, so
only a watch event can make them act), a running job's pods are left alone, and every failure
starts exactly one next attempt -- status.attempt and status.restarts exact, one PyTorchJob and
one set of pods per attempt.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from devtools.cluster import Cluster, outage
from devtools.cluster.kubetron import OPERATOR_NS, OperatorProcess, fake_gpu_job, wait_phase

pytestmark = pytest.mark.cluster
Obj = dict[str, Any]
ATTEMPT = "kubetron.io/attempt"
SETTLE = 8.0  # seconds a settled job must stay as it is: longer than the operators' backoffs


def _apply(cluster: Cluster, ns: str, obj: Obj) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


def _job_pods(cluster: Cluster, ns: str, job: str) -> list[Obj]:
    """Every pod of the job, of any attempt (also those being deleted)."""
    out = cluster.kubectl(
        "get", "pods", "-n", ns, "-l", f"kubetron.io/job-name={job}", "-o", "json"
    ).stdout
    return list(json.loads(out)["items"])


def _uids(pods: list[Obj]) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}


def _operator(
    start_operator: Callable[..., OperatorProcess], ns: str, name: str
) -> OperatorProcess:
    """An operator that acts on watch events alone (its resync is 10 minutes away), leading a
    lease of the test's own whose renew deadline outlasts a restart on a busy machine."""
    return start_operator(
        name, "--resync-period", "600", "--lease-name", f"lease-{ns}",
        "--lease-duration", "60", "--renew-deadline", "45", "--retry-period", "1",
    )  # fmt: skip


def _running(cluster: Cluster, ns: str, name: str, nodes: int) -> list[Obj]:
    """A job whose pods run until the test ends them, Running: its pods."""
    job = fake_gpu_job(name, nodes=nodes, complete_after="600s")
    job["spec"]["runPolicy"]["backoffLimit"] = 3
    _apply(cluster, ns, job)
    wait_phase(cluster, ns, name, "Running", timeout=90)
    pods = _job_pods(cluster, ns, name)
    assert len(pods) == nodes
    return pods


def _fail(cluster: Cluster, ns: str, pod: Obj) -> None:
    """The pod's container killed (exit 137: retryable), written as the kubelet writes it."""
    (container,) = pod["spec"]["containers"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    term = {"exitCode": 137, "reason": "Error", "startedAt": now, "finishedAt": now}
    state = {"name": container["name"], "image": container["image"], "ready": False,
             "restartCount": 0, "state": {"terminated": term}}  # fmt: skip
    patch = json.dumps({"status": {"phase": "Failed", "containerStatuses": [state]}})
    cluster.kubectl("patch", "pod", pod["metadata"]["name"], "-n", ns, "--subresource=status",
                    "--type=merge", "-p", patch)  # fmt: skip


def _exactly(cluster: Cluster, ns: str, name: str, attempt: int, nodes: int) -> Obj:
    """The job Running on `attempt` (restarts = attempt - 1, one failure per restart), and so
    it stays: one PyTorchJob and `nodes` pods, all of that attempt, none re-created; returns
    the status."""
    cluster.wait_for(
        lambda: _on_attempt(cluster, ns, name, attempt, nodes),
        timeout=120,
        what=f"{ns}/{name} Running on attempt {attempt} with {nodes} pods of it alone",
    )
    first = _uids(_job_pods(cluster, ns, name))
    first_job = (cluster.get("pytorchjob", name, ns) or {})["metadata"]["uid"]
    time.sleep(SETTLE)
    status = (cluster.get("megatronjob", name, ns) or {})["status"]
    assert (status["phase"], status["attempt"], status["restarts"]) == (
        "Running", attempt, attempt - 1)  # fmt: skip
    failures = (status.get("failures") or {}).get("counts") or {}
    assert sum(failures.values()) == attempt - 1, failures
    pj = cluster.get("pytorchjob", name, ns) or {}
    assert pj["metadata"]["labels"][ATTEMPT] == str(attempt)
    assert pj["metadata"]["uid"] == first_job, "PyTorchJob re-created while settled"
    assert _uids(_job_pods(cluster, ns, name)) == first, "pods re-created while settled"
    return status


def _on_attempt(cluster: Cluster, ns: str, name: str, attempt: int, nodes: int) -> bool:
    status = (cluster.get("megatronjob", name, ns) or {}).get("status") or {}
    if (status.get("phase"), status.get("attempt")) != ("Running", attempt):
        return False
    pods = _job_pods(cluster, ns, name)
    attempts = [p["metadata"]["labels"].get(ATTEMPT) for p in pods]
    running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
    return attempts == [str(attempt)] * nodes and len(running) == nodes


def _watch_expired(cluster: Cluster, url: str) -> bool:
    """The API server answers a watch from an expired resourceVersion with 410 Gone (an ERROR
    event in the stream, or the status of the request itself)."""
    done = cluster.kubectl("get", "--raw", f"{url}&timeoutSeconds=2", check=False)
    if done.returncode != 0:
        return "410" in done.stderr or "too old resource version" in done.stderr
    event = json.loads(done.stdout.splitlines()[0])
    return bool(event["type"] == "ERROR" and event["object"]["code"] == 410)


def _lease_renewed_after(cluster: Cluster, ns: str, since: datetime) -> None:
    """The leader renews its lease again once the API server is back (it is still leading)."""

    def renewed() -> bool:
        lease = cluster.get("lease", f"lease-{ns}", OPERATOR_NS) or {}
        stamp = lease.get("spec", {}).get("renewTime")
        return bool(stamp) and datetime.fromisoformat(stamp.replace("Z", "+00:00")) > since

    cluster.wait_for(renewed, timeout=30, what="the leader to renew its lease after the restart")


@pytest.mark.parametrize("component", outage.RESTARTABLE)
def test_a_running_job_rides_out_a_restart(
    kubetron: Cluster, namespace: str, start_operator: Any, component: str
) -> None:
    """Restarted under a running job: its pods stay, no attempt starts; afterwards a new job
    is reconciled and a pod failure restarts the group exactly once."""
    op = _operator(start_operator, namespace, "op-restart")
    before = _uids(_running(kubetron, namespace, "steady", nodes=1))
    outage.restart(kubetron, component)
    back = datetime.now(UTC)
    _apply(kubetron, namespace, fake_gpu_job("after", nodes=1, complete_after="600s"))
    wait_phase(kubetron, namespace, "after", "Running", timeout=90)
    _exactly(kubetron, namespace, "steady", attempt=1, nodes=1)
    assert _uids(_job_pods(kubetron, namespace, "steady")) == before
    _lease_renewed_after(kubetron, namespace, back)
    (pod,) = _job_pods(kubetron, namespace, "steady")
    _fail(kubetron, namespace, pod)
    _exactly(kubetron, namespace, "steady", attempt=2, nodes=1)
    assert op.is_leader()


@pytest.mark.parametrize("component", outage.RESTARTABLE)
def test_a_group_restart_rides_out_a_restart(
    kubetron: Cluster, namespace: str, start_operator: Any, component: str
) -> None:
    """Restarted right after a pod failed, while the operator replaces the attempt: one next
    attempt, not two, and none skipped."""
    _operator(start_operator, namespace, "op-midrestart")
    pods = _running(kubetron, namespace, "mid", nodes=2)
    _fail(kubetron, namespace, pods[0])
    outage.restart(kubetron, component)
    _exactly(kubetron, namespace, "mid", attempt=2, nodes=2)


def test_an_expired_watch_relists_without_losing_an_event(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    """etcd compacted past every resourceVersion the operator watched from, while the API
    server is down: its watches are answered 410 Gone (checked with a watch from a version the
    operator had seen), it lists again, and the pod failure written just before the outage and
    the job created just after it are both acted on, the failure exactly once."""
    _operator(start_operator, namespace, "op-expired")
    (pod,) = _running(kubetron, namespace, "expired", nodes=1)
    jobs = f"/apis/kubetron.io/v1alpha1/namespaces/{namespace}/megatronjobs"
    old_version = json.loads(kubetron.kubectl("get", "--raw", jobs).stdout)["metadata"][
        "resourceVersion"
    ]
    _fail(kubetron, namespace, pod)
    with outage.down(kubetron, "kube-apiserver"):
        compacted = outage.compact_etcd(kubetron)
    assert compacted > int(old_version)
    assert _watch_expired(kubetron, f"{jobs}?watch=1&resourceVersion={old_version}")
    _apply(kubetron, namespace, fake_gpu_job("late", nodes=1, complete_after="600s"))
    wait_phase(kubetron, namespace, "late", "Running", timeout=90)
    _exactly(kubetron, namespace, "expired", attempt=2, nodes=1)


def test_a_new_leader_finishes_a_group_restart_once(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    """The leader killed (SIGKILL) once it recorded attempt 2 and before attempt 2 runs: the
    standby takes the lease and finishes the restart, starting no attempt 3."""
    flags = ("--resync-period", "600", "--lease-name", f"lease-{namespace}",
             "--lease-duration", "6", "--renew-deadline", "4", "--retry-period", "1")  # fmt: skip
    a, b = start_operator("op-a", *flags), start_operator("op-b", *flags)
    kubetron.wait_for(lambda: a.is_leader() or b.is_leader(), timeout=30, what="a leader")
    leader, standby = (a, b) if a.is_leader() else (b, a)
    pods = _running(kubetron, namespace, "handover", nodes=2)
    _fail(kubetron, namespace, pods[1])

    def restarting() -> bool:
        status = (kubetron.get("megatronjob", "handover", namespace) or {}).get("status") or {}
        return status.get("attempt") == 2

    kubetron.wait_for(restarting, timeout=60, what="attempt 2 recorded", interval=0.05)
    leader.kill(signal.SIGKILL)
    status = (kubetron.get("megatronjob", "handover", namespace) or {})["status"]
    assert status["phase"] == "Restarting", status  # killed before attempt 2 ran
    kubetron.wait_for(standby.is_leader, timeout=30, what="the standby to take the lease")
    _exactly(kubetron, namespace, "handover", attempt=2, nodes=2)
