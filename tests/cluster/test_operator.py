"""The operator end to end on the real control plane, running as its ServiceAccount.

API server, etcd, controller-manager (garbage collection), scheduler, kwok fake GPU nodes and
the real Kubeflow training-operator: MegatronJob -> ConfigMap + PyTorchJob -> pods on fake
nodes -> status mirrored back.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from devtools.cluster import Cluster
from devtools.cluster.kubetron import OPERATOR_NS, OPERATOR_SA, fake_gpu_job, wait_phase
from devtools.ports import free_port
from kubetron_api.parse import parse_job
from kubetron_operator.plan import plan
from kubetron_operator.render import render

pytestmark = pytest.mark.cluster
SELECTOR = "app.kubernetes.io/managed-by=kubetron-operator"


def _apply(cluster: Cluster, ns: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


def _items(cluster: Cluster, kind: str, ns: str, selector: str = SELECTOR) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", kind, "-n", ns, "-l", selector, "-o", "json").stdout
    return list(json.loads(out)["items"])


def _events(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    ).stdout
    return [e for e in json.loads(out)["items"] if e["involvedObject"]["kind"] == "MegatronJob"]


def test_lifecycle_to_succeeded(kubetron: Cluster, namespace: str, start_operator: Any) -> None:
    op = start_operator()
    _apply(kubetron, namespace, fake_gpu_job("life", complete_after="3s"))
    pj = kubetron.wait_for(
        lambda: kubetron.get("pytorchjob", "life", namespace), timeout=30, what="PyTorchJob"
    )
    stored = kubetron.get("megatronjob", "life", namespace)
    assert stored is not None
    job = parse_job(stored)
    want_cm, want_pj = render(job, plan(job))
    cm = kubetron.get("configmap", "life-config", namespace)
    assert cm is not None and cm["data"] == want_cm["data"]
    assert pj["spec"]["pytorchReplicaSpecs"] == want_pj["spec"]["pytorchReplicaSpecs"]
    assert pj["spec"]["nprocPerNode"] == "8"
    (ref,) = pj["metadata"]["ownerReferences"]
    assert ref["uid"] == stored["metadata"]["uid"] and ref["controller"] is True

    pods = kubetron.wait_for(
        lambda: (
            (p := _items(kubetron, "pods", namespace, "kubetron.io/job-name=life"))
            and len(p) == 2
            and all(x["spec"].get("nodeName") for x in p)
            and p
        ),
        timeout=60,
        what="2 pods bound to fake GPU nodes",
    )
    assert {p["spec"]["nodeName"] for p in pods} <= set(kubetron.node_names())
    done = wait_phase(kubetron, namespace, "life", "Succeeded")
    status = done["status"]
    assert status["startTime"] and status["completionTime"]
    assert status["worldSize"] == 16 and status["parallelism"]["data"] == 16
    assert status["observedGeneration"] == done["metadata"]["generation"]
    assert "kopf" not in status and not any(
        k.startswith("kopf.") for k in done["metadata"].get("annotations", {})
    )
    reasons = {e["reason"] for e in _events(kubetron, namespace, "life")}
    assert "Succeeded" in reasons
    assert (op.sample("kubetron_operator_reconciles_total", result="success") or 0) > 0
    phases = op.sample("kubetron_megatronjobs", namespace=namespace, phase="Succeeded")
    assert phases == 1.0


def test_permanent_pod_failure_fails_the_job(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    start_operator()
    _apply(kubetron, namespace, fake_gpu_job("boom", nodes=1, complete_after="2s", exit_code=3))
    failed = wait_phase(kubetron, namespace, "boom", "Failed")
    cond = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert "pod boom-worker-0 container pytorch exited with code 3" in cond["message"], cond
    assert failed["status"]["attempt"] == 1 and failed["status"]["restarts"] == 0
    warnings = [e for e in _events(kubetron, namespace, "boom") if e["type"] == "Warning"]
    assert warnings, "a Warning event is expected for the Failed phase"


def test_retryable_failures_restart_the_group_until_the_backoff_limit(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    """Every attempt's pods exit 137 (killed: retryable): the operator replaces the whole
    PyTorchJob as attempt 2 and 3, then fails the job once backoffLimit=2 restarts are used."""
    start_operator()
    job = fake_gpu_job("again", nodes=2, complete_after="3s", exit_code=137)
    job["spec"]["runPolicy"]["backoffLimit"] = 2
    _apply(kubetron, namespace, job)
    failed = wait_phase(kubetron, namespace, "again", "Failed", timeout=180)
    status = failed["status"]
    assert (status["attempt"], status["restarts"]) == (3, 2)
    cond = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "BackoffLimitExceeded"
    assert "exited with code 137" in cond["message"]
    assert "all spec.runPolicy.backoffLimit=2 restarts are used" in cond["message"]
    restarts = [e for e in _events(kubetron, namespace, "again") if e["reason"] == "PodFailed"]
    assert len(restarts) >= 2, restarts  # one Warning per restart (repeats may be merged)
    pj = kubetron.get("pytorchjob", "again", namespace)
    assert pj is not None and pj["metadata"]["labels"]["kubetron.io/attempt"] == "3"


def test_invalid_deep_spec_creates_nothing(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    start_operator()
    bad = fake_gpu_job("deep", nodes=1, parallelism={"pipeline": 8})  # 28 layers on 8 stages
    _apply(kubetron, namespace, bad)
    failed = wait_phase(kubetron, namespace, "deep", "Failed", timeout=30)
    (valid,) = failed["status"]["conditions"]
    assert (valid["type"], valid["status"], valid["reason"]) == ("Valid", "False", "InvalidSpec")
    assert "numLayers=28 is not divisible" in valid["message"]
    events = _events(kubetron, namespace, "deep")
    assert any(e["type"] == "Warning" and e["reason"] == "InvalidSpec" for e in events)
    assert kubetron.get("pytorchjob", "deep", namespace) is None
    assert kubetron.get("configmap", "deep-config", namespace) is None


def test_delete_garbage_collects_children(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    start_operator()
    _apply(kubetron, namespace, fake_gpu_job("gc", nodes=1, complete_after="600s"))
    kubetron.wait_for(
        lambda: kubetron.get("pytorchjob", "gc", namespace), timeout=30, what="PyTorchJob gc"
    )
    kubetron.kubectl("delete", "mj", "gc", "-n", namespace, "--wait=false")
    kubetron.wait_for(
        lambda: (
            kubetron.get("pytorchjob", "gc", namespace) is None
            and kubetron.get("configmap", "gc-config", namespace) is None
        ),
        timeout=60,
        what="PyTorchJob and ConfigMap garbage-collected",
    )


def test_suspend_and_resume(kubetron: Cluster, namespace: str, start_operator: Any) -> None:
    start_operator()
    _apply(kubetron, namespace, fake_gpu_job("sus", nodes=1, complete_after="2s", suspend=True))
    wait_phase(kubetron, namespace, "sus", "Suspended", timeout=60)
    pj = kubetron.get("pytorchjob", "sus", namespace)
    assert pj is not None and pj["spec"]["runPolicy"]["suspend"] is True
    assert _items(kubetron, "pods", namespace, "kubetron.io/job-name=sus") == []
    patch = json.dumps({"spec": {"runPolicy": {"suspend": False}}})
    kubetron.kubectl("patch", "mj", "sus", "-n", namespace, "--type", "merge", "-p", patch)
    wait_phase(kubetron, namespace, "sus", "Succeeded", timeout=90)


def test_operator_killed_mid_reconcile_converges_without_duplicates(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    names = [f"crash-{i}" for i in range(5)]
    for name in names:
        _apply(kubetron, namespace, fake_gpu_job(name, nodes=1, complete_after="4s"))
    first = start_operator("op-first")
    kubetron.wait_for(
        lambda: _items(kubetron, "pytorchjobs", namespace), timeout=30, what="a PyTorchJob"
    )
    first.kill(signal.SIGKILL)
    start_operator("op-second")
    for name in names:
        wait_phase(kubetron, namespace, name, "Succeeded", timeout=120)
    assert (
        sorted(p["metadata"]["name"] for p in _items(kubetron, "pytorchjobs", namespace)) == names
    )
    assert len(_items(kubetron, "configmaps", namespace)) == len(names)


def test_leader_election_one_reconciles_and_standby_takes_over(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    lease = f"lease-{namespace}"
    flags = ("--leader-elect", "--lease-name", lease, "--lease-duration", "6")
    flags += ("--renew-deadline", "4", "--retry-period", "1")
    a, b = start_operator("op-a", *flags), start_operator("op-b", *flags)
    kubetron.wait_for(lambda: a.is_leader() or b.is_leader(), timeout=30, what="a leader")
    leader, standby = (a, b) if a.is_leader() else (b, a)
    assert not standby.is_leader()
    _apply(kubetron, namespace, fake_gpu_job("le-1", nodes=1, complete_after="600s"))
    kubetron.wait_for(
        lambda: kubetron.get("pytorchjob", "le-1", namespace), timeout=30, what="PyTorchJob le-1"
    )
    assert (standby.sample("kubetron_operator_reconciles_total", result="success") or 0) == 0
    holder = kubetron.get("lease", lease, OPERATOR_NS)
    assert holder is not None and holder["spec"]["holderIdentity"] == leader.name

    leader.kill(signal.SIGKILL)
    t0 = time.monotonic()
    kubetron.wait_for(standby.is_leader, timeout=20, what="standby takes the lease")
    takeover = time.monotonic() - t0
    assert takeover <= 6 + 2, f"takeover took {takeover:.1f}s, lease duration is 6s"
    _apply(kubetron, namespace, fake_gpu_job("le-2", nodes=1, complete_after="600s"))
    kubetron.wait_for(
        lambda: kubetron.get("pytorchjob", "le-2", namespace), timeout=30, what="PyTorchJob le-2"
    )


ALLOWED = [
    ("create", "pytorchjobs.kubeflow.org", None),
    ("patch", "megatronjobs.kubetron.io/status", None),
    ("watch", "megatronjobs.kubetron.io", None),
    ("create", "configmaps", None),
    ("list", "pods", None),
    ("create", "events", None),
    ("update", "leases.coordination.k8s.io", OPERATOR_NS),
]
FORBIDDEN = [
    ("get", "secrets", None),
    ("create", "pods/exec", None),
    ("delete", "megatronjobs.kubetron.io", None),
    ("create", "pods", None),
    ("create", "deployments.apps", None),
    ("update", "leases.coordination.k8s.io", "default"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
]


@pytest.mark.parametrize(
    ("verb", "resource", "ns", "allowed"),
    [(*c, True) for c in ALLOWED] + [(*c, False) for c in FORBIDDEN],
    ids=[f"may-{v}-{r}" for v, r, _ in ALLOWED] + [f"not-{v}-{r}" for v, r, _ in FORBIDDEN],
)
def test_operator_rbac_is_least_privilege(
    kubetron: Cluster, verb: str, resource: str, ns: str | None, allowed: bool
) -> None:
    scope = ["-n", ns] if ns else ["-A"]
    res = kubetron.kubectl(
        "auth", "can-i", verb, resource, *scope, f"--as={OPERATOR_SA}", check=False
    )
    assert res.stdout.strip() == ("yes" if allowed else "no"), res.stdout + res.stderr


def test_missing_lease_namespace_ends_the_operator_with_the_fix(kubetron: Cluster) -> None:
    """Not a warning every retry period forever: exit 2, naming the namespace and the fix."""
    argv = [
        sys.executable, "-m", "kubetron_operator", "--kubeconfig", str(kubetron.kubeconfig),
        "--leader-elect", "--lease-namespace", "no-such-namespace", "--bind-address", "127.0.0.1",
        "--metrics-port", str(free_port()), "--health-port", str(free_port()),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the lease namespace 'no-such-namespace' does not exist" in proc.stderr
    assert "kubectl create namespace no-such-namespace" in proc.stderr


def test_final_phase_stays_final_when_the_ttl_deletes_the_pytorchjob(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    """The training-operator deletes a finished PyTorchJob after ttlSecondsAfterFinished; the
    operator must not see it missing and run the job again."""
    start_operator("op-ttl")
    job = fake_gpu_job(
        "ttl", nodes=1, complete_after="1s", runPolicy={"ttlSecondsAfterFinished": 1}
    )
    _apply(kubetron, namespace, job)
    succeeded = wait_phase(kubetron, namespace, "ttl", "Succeeded")
    kubetron.wait_for(
        lambda: kubetron.get("pytorchjob", "ttl", namespace) is None,
        timeout=60,
        what="the training-operator's TTL to delete the PyTorchJob",
    )
    time.sleep(12)  # two resync periods (5 s) and the deletion's watch events
    assert kubetron.get("pytorchjob", "ttl", namespace) is None, "the finished job ran again"
    status = (kubetron.get("megatronjob", "ttl", namespace) or {})["status"]
    assert status["phase"] == "Succeeded"
    assert status["completionTime"] == succeeded["status"]["completionTime"]


def test_deleted_and_edited_children_of_a_running_job_are_repaired(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    start_operator("op-repair")
    _apply(kubetron, namespace, fake_gpu_job("fix", nodes=1, complete_after="600s"))
    wait_phase(kubetron, namespace, "fix", "Running")
    rendered = (kubetron.get("configmap", "fix-config", namespace) or {})["data"]
    kubetron.kubectl("delete", "configmap", "fix-config", "-n", namespace)
    kubetron.wait_for(
        lambda: kubetron.get("configmap", "fix-config", namespace),
        timeout=30,
        what="the deleted ConfigMap to be re-created",
    )
    patch = '[{"op": "replace", "path": "/data/config.json", "value": "{}"}]'
    kubetron.kubectl(
        "patch", "configmap", "fix-config", "-n", namespace, "--type=json", "-p", patch
    )
    kubetron.wait_for(
        lambda: (kubetron.get("configmap", "fix-config", namespace) or {}).get("data") == rendered,
        timeout=30,
        what="the edited ConfigMap to be restored",
    )


def test_a_running_job_of_an_earlier_operator_keeps_its_master_pod_set(
    kubetron: Cluster, namespace: str, start_operator: Any
) -> None:
    """An operator upgrade over a running job: its PyTorchJob, applied by an earlier operator
    with a Master pod set, keeps both pod sets and its pods (re-applied workers-only it would
    gain a worker that meets nobody), while the rest of the spec, a suspend, still reaches it."""
    _apply(kubetron, namespace, fake_gpu_job("old", nodes=2, complete_after="600s"))
    body = kubetron.get("megatronjob", "old", namespace)
    assert body is not None
    job = parse_job(body)
    pj = render(job, plan(job))[1]
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    replicas["Master"] = {**replicas["Worker"], "replicas": 1}
    replicas["Worker"] = {**replicas["Worker"], "replicas": 1}
    kubetron.kubectl(
        "apply", "--server-side", "--field-manager=kubetron-operator", "-f", "-",
        input=json.dumps(pj),
    )  # fmt: skip
    start_operator()
    wait_phase(kubetron, namespace, "old", "Running", timeout=60)
    time.sleep(12)  # two resyncs
    live = kubetron.get("pytorchjob", "old", namespace) or {}
    assert sorted(live["spec"]["pytorchReplicaSpecs"]) == ["Master", "Worker"]
    pods = sorted(p["metadata"]["name"] for p in _items(kubetron, "pods", namespace))
    assert pods == ["old-master-0", "old-worker-0"], pods
    patch = json.dumps({"spec": {"runPolicy": {"suspend": True}}})
    kubetron.kubectl("patch", "mj", "old", "-n", namespace, "--type", "merge", "-p", patch)
    wait_phase(kubetron, namespace, "old", "Suspended", timeout=60)
    live = kubetron.get("pytorchjob", "old", namespace) or {}
    assert live["spec"]["runPolicy"]["suspend"] is True
    assert sorted(live["spec"]["pytorchReplicaSpecs"]) == ["Master", "Worker"]
