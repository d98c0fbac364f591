"""The reconcile paths against a small in-memory fake of the project's own Kube interface (the
real API server runs the same paths in tests/cluster): children repaired when deleted or
edited, nothing applied when nothing changed, and final phases that stay final."""

from __future__ import annotations

from typing import Any

from kubetron_operator.controller import Controller
from kubetron_operator.metrics import OperatorMetrics
from tests.unit.fake_kube import FakeKube

Obj = dict[str, Any]


def reconcile(kube: FakeKube) -> str:
    return Controller(kube, OperatorMetrics()).reconcile("ml", "job")  # type: ignore[arg-type]


def pytorchjob_succeeded(kube: FakeKube) -> None:
    pj = kube.objects[("PyTorchJob", "ml", "job")]
    pj["status"] = {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Done"}]}


def test_first_reconcile_creates_both_children_then_nothing_is_reapplied(kube: FakeKube) -> None:
    assert reconcile(kube) == "success"
    assert kube.applied == ["ConfigMap", "PyTorchJob"]
    kube.applied.clear()
    assert reconcile(kube) == "success"
    assert kube.applied == []  # unchanged children: reads only


def test_a_deleted_config_map_is_recreated(kube: FakeKube) -> None:
    reconcile(kube)
    del kube.objects[("ConfigMap", "ml", "job-config")]
    kube.applied.clear()
    reconcile(kube)
    assert kube.applied == ["ConfigMap"]
    assert ("ConfigMap", "ml", "job-config") in kube.objects


def test_edited_children_are_restored(kube: FakeKube) -> None:
    reconcile(kube)
    cm = kube.objects[("ConfigMap", "ml", "job-config")]
    rendered = cm["data"]["config.json"]
    cm["data"]["config.json"] = "{}"
    pj = kube.objects[("PyTorchJob", "ml", "job")]
    container = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    container["image"] = "someone/else:latest"
    pj["spec"]["extraDefault"] = True  # fields only the live object has are not drift
    kube.applied.clear()
    reconcile(kube)
    assert sorted(kube.applied) == ["ConfigMap", "PyTorchJob"]
    assert kube.objects[("ConfigMap", "ml", "job-config")]["data"]["config.json"] == rendered
    pj = kube.objects[("PyTorchJob", "ml", "job")]
    assert (
        pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["image"]
        == "ghcr.io/kubetron/trainer:0.1.0"
    )


def test_a_succeeded_job_is_never_run_again_when_its_children_go(kube: FakeKube) -> None:
    reconcile(kube)
    pytorchjob_succeeded(kube)
    reconcile(kube)
    assert kube.objects[("MegatronJob", "ml", "job")]["status"]["phase"] == "Succeeded"
    # the training-operator's ttlSecondsAfterFinished (or a user) deletes the children
    del kube.objects[("PyTorchJob", "ml", "job")]
    del kube.objects[("ConfigMap", "ml", "job-config")]
    kube.applied.clear()
    for _ in range(3):
        assert reconcile(kube) == "success"
    assert kube.applied == []
    assert kube.objects[("MegatronJob", "ml", "job")]["status"]["phase"] == "Succeeded"


def test_a_new_generation_of_a_finished_job_runs_again(kube: FakeKube) -> None:
    reconcile(kube)
    pytorchjob_succeeded(kube)
    reconcile(kube)
    del kube.objects[("PyTorchJob", "ml", "job")]
    kube.objects[("MegatronJob", "ml", "job")]["metadata"]["generation"] = 2  # spec edited
    kube.applied.clear()
    reconcile(kube)
    assert kube.applied == ["ConfigMap", "PyTorchJob"]


def test_invalid_spec_fails_with_the_rules_and_creates_nothing(kube: FakeKube) -> None:
    kube.objects[("MegatronJob", "ml", "job")]["spec"]["parallelism"] = {"tensor": 3}
    assert reconcile(kube) == "invalid"
    status = kube.objects[("MegatronJob", "ml", "job")]["status"]
    assert status["phase"] == "Failed"
    assert "spec.parallelism.tensor=3 must divide" in status["conditions"][0]["message"]
    assert kube.applied == [] and kube.events == [("Warning", "InvalidSpec")]


def test_an_unchanged_status_is_not_written_again(kube: FakeKube) -> None:
    reconcile(kube)
    writes = kube.status_writes
    for _ in range(3):
        reconcile(kube)
    assert kube.status_writes == writes


def test_a_replica_that_lost_the_lease_writes_nothing(kube: FakeKube) -> None:
    leading = [True]
    c = Controller(kube, OperatorMetrics(), may_act=lambda: leading[0])  # type: ignore[arg-type]
    leading[0] = False
    assert c.reconcile("ml", "job") == "skipped"
    assert kube.applied == [] and kube.status_writes == 0


def trainer_pod(kube: FakeKube, name: str, attempt: int, phase: str = "Running",
                code: int | None = None) -> None:  # fmt: skip
    state: Obj = {"running": {}} if code is None else {"terminated": {"exitCode": code}}
    put_pod(kube, name, attempt, None, phase=phase,
            containerStatuses=[{"name": "pytorch", "state": state}])  # fmt: skip


def put_pod(kube: FakeKube, name: str, attempt: int, node: str | None, **status: Any) -> None:
    """A trainer pod of `attempt` (on `node`, if given) with the given status."""
    kube.put({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"job-{name}", "namespace": "ml",
                     "creationTimestamp": "2026-01-01T00:00:00Z",
                     "labels": {"kubetron.io/job-name": "job",
                                "kubetron.io/attempt": str(attempt)}},
        "spec": {"nodeName": node} if node else {},
        "status": status,
    })  # fmt: skip


def status(kube: FakeKube) -> Obj:
    return kube.objects[("MegatronJob", "ml", "job")]["status"]


def test_a_retryable_exit_restarts_every_pod_as_the_next_attempt(kube: FakeKube) -> None:
    reconcile(kube)
    trainer_pod(kube, "worker-0", 1)
    reconcile(kube)
    assert status(kube)["phase"] == "Running" and status(kube)["runningSince"]
    trainer_pod(kube, "worker-0", 1, "Failed", code=134)  # a lost peer: retryable
    kube.events.clear()
    assert reconcile(kube) == "restarted"
    st = status(kube)
    assert (st["phase"], st["attempt"], st["restarts"]) == ("Restarting", 2, 1)
    assert "runningSince" not in st
    cond = next(c for c in st["conditions"] if c["type"] == "Restarting")
    assert cond["reason"] == "PodFailed"
    assert cond["message"].startswith(
        "attempt 1 ended: pod job-worker-0 container pytorch exited with code 134 (Error); "
        "restarting every pod as attempt 2 (restart 1 of 3)"
    )
    assert kube.events == [("Warning", "PodFailed")]
    assert ("PyTorchJob", "job", None) in kube.deleted
    assert ("Pod", "job-worker-0", 10) in kube.deleted
    # the next reconcile creates attempt 2's PyTorchJob; its pods run: Running again
    kube.applied.clear()
    reconcile(kube)
    assert "PyTorchJob" in kube.applied
    pj = kube.objects[("PyTorchJob", "ml", "job")]
    assert pj["metadata"]["labels"]["kubetron.io/attempt"] == "2"
    assert status(kube)["phase"] == "Restarting"
    trainer_pod(kube, "worker-0", 2)
    reconcile(kube)
    st = status(kube)
    assert (st["phase"], st["attempt"]) == ("Running", 2)
    cond = next(c for c in st["conditions"] if c["type"] == "Restarting")
    assert (cond["status"], cond["message"]) == ("False", "attempt 2 runs")


def test_the_next_attempt_waits_until_the_old_pods_are_gone(kube: FakeKube) -> None:
    reconcile(kube)
    trainer_pod(kube, "worker-0", 1, "Failed", code=137)
    reconcile(kube)
    # the old pod is still terminating (the fake keeps it: a deletionTimestamp is set)
    trainer_pod(kube, "worker-0", 1, "Running")
    kube.objects[("Pod", "ml", "job-worker-0")]["metadata"]["deletionTimestamp"] = "now"
    kube.applied.clear()
    reconcile(kube)
    assert "PyTorchJob" not in kube.applied and ("PyTorchJob", "ml", "job") not in kube.objects
    assert status(kube)["phase"] == "Restarting"
    del kube.objects[("Pod", "ml", "job-worker-0")]
    reconcile(kube)
    assert "PyTorchJob" in kube.applied


def test_restarts_beyond_the_backoff_limit_fail_the_job(kube: FakeKube) -> None:
    kube.objects[("MegatronJob", "ml", "job")]["spec"]["runPolicy"] = {"backoffLimit": 0}
    reconcile(kube)
    trainer_pod(kube, "worker-0", 1, "Failed", code=143)
    reconcile(kube)
    st = status(kube)
    assert (st["phase"], st["attempt"], st["restarts"]) == ("Failed", 1, 0)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "all spec.runPolicy.backoffLimit=0 restarts are used" in failed["message"]
    kube.applied.clear()
    reconcile(kube)  # final: nothing runs again
    assert kube.applied == [] and status(kube)["phase"] == "Failed"


def test_a_permanent_exit_fails_and_stops_the_other_pods(kube: FakeKube) -> None:
    reconcile(kube)
    trainer_pod(kube, "worker-0", 1, "Failed", code=2)
    trainer_pod(kube, "worker-1", 1)  # blocked in a collective: stopped
    reconcile(kube)
    st = status(kube)
    assert st["phase"] == "Failed"
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["message"] == "pod job-worker-0 container pytorch exited with code 2 (Error)"
    assert ("Pod", "job-worker-1", 10) in kube.deleted
    assert ("Pod", "ml", "job-worker-0") in kube.objects  # kept for `kubectl logs`


def test_a_failure_seen_only_in_a_watch_event_still_counts(kube: FakeKube) -> None:
    c = Controller(kube, OperatorMetrics())  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    trainer_pod(kube, "worker-0", 1, "Failed", code=3)
    seen = kube.objects.pop(("Pod", "ml", "job-worker-0"))  # deleted before the reconcile
    assert c.note_pod(seen) == "job"
    c.reconcile("ml", "job")
    failed = next(x for x in status(kube)["conditions"] if x["type"] == "Failed")
    assert "exited with code 3" in failed["message"]


def test_pods_that_exit_on_suspend_are_no_failure_after_resume(kube: FakeKube) -> None:
    c = Controller(kube, OperatorMetrics())  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    trainer_pod(kube, "worker-0", 1)
    c.reconcile("ml", "job")
    spec = kube.objects[("MegatronJob", "ml", "job")]["spec"]
    spec["runPolicy"] = {"suspend": True}
    trainer_pod(kube, "worker-0", 1, "Failed", code=143)  # saved on SIGTERM, then deleted
    c.note_pod(kube.objects.pop(("Pod", "ml", "job-worker-0")))
    c.reconcile("ml", "job")
    assert status(kube)["phase"] == "Suspended"
    spec["runPolicy"] = {"suspend": False}
    trainer_pod(kube, "worker-0", 1)  # the training-operator re-creates the pods
    assert c.reconcile("ml", "job") == "success"
    assert (status(kube)["phase"], status(kube)["attempt"]) == ("Running", 1)


def test_a_running_pytorchjob_of_an_earlier_operator_keeps_its_master_until_the_next_attempt(
    kube: FakeKube,
) -> None:
    """After an operator upgrade the running attempt's PyTorchJob (a Master) keeps its pod
    sets: re-applied as Workers only it would gain a worker that meets nobody. The rest still
    follows the spec (a suspend reaches it); the next attempt has the current layout."""
    reconcile(kube)
    pj = kube.objects[("PyTorchJob", "ml", "job")]
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    replicas["Master"] = replicas.pop("Worker")  # one node: a Master alone
    kube.applied.clear()
    trainer_pod(kube, "master-0", 1)
    reconcile(kube)
    reconcile(kube)
    assert kube.applied == [] and status(kube)["phase"] == "Running"
    assert sorted(kube.objects[("PyTorchJob", "ml", "job")]["spec"]["pytorchReplicaSpecs"]) == [
        "Master"
    ]  # fmt: skip
    job = kube.objects[("MegatronJob", "ml", "job")]
    job["spec"]["runPolicy"] = {**job["spec"].get("runPolicy", {}), "suspend": True}
    job["metadata"]["generation"] = 2
    reconcile(kube)
    pj = kube.objects[("PyTorchJob", "ml", "job")]
    assert pj["spec"]["runPolicy"]["suspend"] is True
    assert list(pj["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    job["spec"]["runPolicy"]["suspend"] = False
    job["metadata"]["generation"] = 3
    reconcile(kube)
    trainer_pod(kube, "master-0", 1, "Failed", code=143)  # preempted: the next attempt
    assert reconcile(kube) == "restarted"  # stops attempt 1 (its PyTorchJob and pods)
    reconcile(kube)  # creates attempt 2
    new = kube.objects[("PyTorchJob", "ml", "job")]
    assert status(kube)["attempt"] == 2
    assert list(new["spec"]["pytorchReplicaSpecs"]) == ["Worker"]


def failures_total(metrics: OperatorMetrics, cause: str) -> float | None:
    labels = {"namespace": "ml", "job": "job", "cause": cause}
    return metrics.registry.get_sample_value("kubetron_operator_job_failures_total", labels)


def running_controller(kube: FakeKube) -> tuple[Controller, OperatorMetrics]:
    """A controller, its metrics, and the job's attempt 1 running."""
    metrics = OperatorMetrics()
    c = Controller(kube, metrics)  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    trainer_pod(kube, "worker-0", 1)
    c.reconcile("ml", "job")
    return c, metrics


def test_an_oom_killed_pod_fails_the_job_at_once_with_its_cause(kube: FakeKube) -> None:
    c, metrics = running_controller(kube)
    term = {"exitCode": 137, "reason": "OOMKilled"}
    state = {"name": "pytorch", "state": {"terminated": term}}
    put_pod(kube, "worker-0", 1, "gpu-1", phase="Failed", containerStatuses=[state])
    assert c.reconcile("ml", "job") == "success"  # no restart
    st = status(kube)
    assert (st["phase"], st["attempt"], st["restarts"]) == ("Failed", 1, 0)
    assert st["failures"]["counts"] == {"OOMKilled": 1}
    last = st["failures"]["last"]
    assert (last["cause"], last["attempt"], last["pod"], last["node"]) == (
        "OOMKilled", 1, "job-worker-0", "gpu-1")  # fmt: skip
    assert "raise spec.resources.memory" in last["message"]
    assert "avoidedNodes" not in st  # the limit's fault, not the node's
    assert failures_total(metrics, "OOMKilled") == 1
    assert ("PyTorchJob", "job", None) not in kube.deleted


def test_a_lost_node_restarts_the_group_off_that_node(kube: FakeKube) -> None:
    c, metrics = running_controller(kube)
    ran = status(kube)["runningSince"]
    ready = {"type": "Ready", "status": "False", "reason": "NodeLost", "message": "unresponsive"}
    put_pod(kube, "worker-0", 1, "gpu-3", phase="Running", conditions=[ready])
    assert c.reconcile("ml", "job") == "restarted"
    st = status(kube)
    assert (st["attempt"], st["restarts"], st["failures"]["counts"]) == (2, 1, {"NodeLost": 1})
    assert [(a["node"], a["cause"]) for a in st["avoidedNodes"]] == [("gpu-3", "NodeLost")]
    assert st["goodput"]["lostSince"] == ran  # no checkpoint: all it ran is lost
    assert failures_total(metrics, "NodeLost") == 1
    c.reconcile("ml", "job")  # attempt 2's PyTorchJob, off gpu-3
    pj = kube.objects[("PyTorchJob", "ml", "job")]
    spec = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [{"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["gpu-3"]}]}]  # fmt: skip
    trainer_pod(kube, "worker-0", 2)
    c.reconcile("ml", "job")
    st = status(kube)
    assert st["phase"] == "Running" and st["failures"]["counts"] == {"NodeLost": 1}
    assert st["goodput"].get("lostSince") is None and st["goodput"]["lostSeconds"] >= 0
    assert failures_total(metrics, "NodeLost") == 1  # counted once
    c.forget("ml", "job")
    assert failures_total(metrics, "NodeLost") is None
