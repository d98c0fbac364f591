"""Failure causes on the real control plane: pod statuses written through the API the way the
kubelet (an OOM-killed container) and the node lifecycle controller (a lost node) write them.

An OOM-killed pod fails the job at once, with its cause and no restart; a pod on a lost node
restarts the group, and the next attempt's PyTorchJob keeps its pods off that node (and waits,
spending no restart, when no other node fits).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.cluster import Cluster
from devtools.cluster.kubetron import OperatorProcess, fake_gpu_job, wait_phase

pytestmark = pytest.mark.cluster
Obj = dict[str, Any]


def _apply(cluster: Cluster, ns: str, obj: Obj) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


def _pods(cluster: Cluster, ns: str, job: str, attempt: int) -> list[Obj]:
    selector = f"kubetron.io/job-name={job},kubetron.io/attempt={attempt}"
    out = cluster.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json").stdout
    return sorted(json.loads(out)["items"], key=lambda p: p["metadata"]["name"])


def _write_pod_status(cluster: Cluster, ns: str, name: str, status: Obj) -> None:
    patch = json.dumps({"status": status})
    cluster.kubectl(
        "patch", "pod", name, "-n", ns, "--subresource=status", "--type=merge", "-p", patch
    )


def _failures(op: OperatorProcess, ns: str, job: str) -> dict[str, float]:
    """kubetron_operator_job_failures_total of one job, by cause."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(op.metrics()):
        for s in family.samples:
            where = (s.labels.get("namespace"), s.labels.get("job"))
            if s.name == "kubetron_operator_job_failures_total" and where == (ns, job):
                out[s.labels["cause"]] = s.value
    return out


def _lose_node(cluster: Cluster, ns: str, pod: Obj) -> str:
    """Mark the pod as the node lifecycle controller does when its node stops reporting."""
    node, name = pod["spec"]["nodeName"], pod["metadata"]["name"]
    ready = {
        "type": "Ready",
        "status": "False",
        "reason": "NodeLost",
        "message": f"Node {node} which was running pod {name} is unresponsive",
        "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_pod_status(cluster, ns, name, {"conditions": [ready]})
    return str(node)


def _run(
    cluster: Cluster, ns: str, start_operator: Any, name: str, nodes: int, backoff_limit: int
) -> tuple[OperatorProcess, list[Obj]]:
    """An operator, and a job whose pods run until the test ends them, running: its pods."""
    op = start_operator(f"op-{name}")
    job = fake_gpu_job(name, nodes=nodes, complete_after="600s")
    job["spec"]["runPolicy"]["backoffLimit"] = backoff_limit
    _apply(cluster, ns, job)
    wait_phase(cluster, ns, name, "Running")
    return op, _pods(cluster, ns, name, 1)


def _attempt(cluster: Cluster, ns: str, job: str, attempt: int) -> Obj:
    def check() -> Obj | None:
        pj = cluster.get("pytorchjob", job, ns) or {}
        labels = pj.get("metadata", {}).get("labels") or {}
        return pj if labels.get("kubetron.io/attempt") == str(attempt) else None

    return cluster.wait_for(check, timeout=90, what=f"the PyTorchJob of attempt {attempt}")


def test_an_oom_killed_pod_fails_the_job_at_once(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    op, (pod,) = _run(kubetron, namespace, start_operator, "oom", nodes=1, backoff_limit=3)
    (container,) = pod["spec"]["containers"]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    term = {"exitCode": 137, "reason": "OOMKilled", "startedAt": now, "finishedAt": now}
    state = {"name": container["name"], "image": container["image"], "ready": False,
             "restartCount": 0, "state": {"terminated": term}}  # fmt: skip
    _write_pod_status(kubetron, namespace, pod["metadata"]["name"],
                      {"phase": "Failed", "containerStatuses": [state]})  # fmt: skip
    status = wait_phase(kubetron, namespace, "oom", "Failed")["status"]
    assert (status["attempt"], status["restarts"]) == (1, 0)
    assert status["failures"]["counts"] == {"OOMKilled": 1}
    last = status["failures"]["last"]
    assert (last["cause"], last["attempt"], last["pod"], last["node"]) == (
        "OOMKilled", 1, "oom-worker-0", pod["spec"]["nodeName"])  # fmt: skip
    cond = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "PodFailed"
    assert "exited with code 137 (OOMKilled)" in cond["message"]
    assert "raise spec.resources.memory" in cond["message"]
    assert "avoidedNodes" not in status
    time.sleep(6)  # a resync (5 s): still one attempt, no restart
    pj = kubetron.get("pytorchjob", "oom", namespace) or {}
    assert pj["metadata"]["labels"]["kubetron.io/attempt"] == "1"
    assert _failures(op, namespace, "oom") == {"OOMKilled": 1.0}


def test_a_lost_node_restarts_the_group_off_that_node(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    op, (pod,) = _run(kubetron, namespace, start_operator, "lost", nodes=1, backoff_limit=2)
    node = _lose_node(kubetron, namespace, pod)
    pj = _attempt(kubetron, namespace, "lost", 2)
    spec = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    not_in = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [node]}
    assert all(not_in in t["matchExpressions"] for t in required["nodeSelectorTerms"])
    status = wait_phase(kubetron, namespace, "lost", "Running", timeout=90)["status"]
    (moved,) = _pods(kubetron, namespace, "lost", 2)
    assert moved["spec"]["nodeName"] != node
    assert (status["attempt"], status["restarts"]) == (2, 1)
    assert status["failures"]["counts"] == {"NodeLost": 1}
    last = status["failures"]["last"]
    assert (last["cause"], last["attempt"], last["node"]) == ("NodeLost", 1, node)
    assert [(a["node"], a["cause"]) for a in status["avoidedNodes"]] == [(node, "NodeLost")]
    cond = next(c for c in status["conditions"] if c["type"] == "NodesAvoided")
    assert (cond["status"], cond["reason"]) == ("False", "OtherNodesFit")
    assert "lostSince" not in status["goodput"] and status["goodput"]["lostSeconds"] >= 0
    assert 0 <= float(status["goodput"]["ratio"]) <= 1
    assert _failures(op, namespace, "lost") == {"NodeLost": 1.0}


def test_with_no_other_node_the_next_attempt_waits_spending_no_restart(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    """Two pods on the cluster's two nodes: once one node is avoided, attempt 2's second pod
    fits nowhere; the job waits in Restarting with NodesAvoided, its restarts unchanged."""
    _, pods = _run(kubetron, namespace, start_operator, "full", nodes=2, backoff_limit=1)
    node = _lose_node(kubetron, namespace, pods[1])

    def waiting() -> Obj | None:
        status = (kubetron.get("megatronjob", "full", namespace) or {}).get("status") or {}
        conds = {c["type"]: c for c in status.get("conditions", [])}
        avoided = conds.get("NodesAvoided", {})
        return status if avoided.get("status") == "True" else None

    status = kubetron.wait_for(waiting, timeout=90, what="NodesAvoided True")
    assert (status["phase"], status["attempt"], status["restarts"]) == ("Restarting", 2, 1)
    cond = next(c for c in status["conditions"] if c["type"] == "NodesAvoided")
    assert cond["reason"] == "NoOtherNode" and f"avoids nodes {node}" in cond["message"]
    time.sleep(6)  # a resync: still waiting, no restart spent (backoffLimit=1 would fail it)
    status = (kubetron.get("megatronjob", "full", namespace) or {})["status"]
    assert (status["phase"], status["attempt"], status["restarts"]) == ("Restarting", 2, 1)
