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
    container = pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    container["image"] = "someone/else:latest"
    pj["spec"]["extraDefault"] = True  # fields only the live object has are not drift
    kube.applied.clear()
    reconcile(kube)
    assert sorted(kube.applied) == ["ConfigMap", "PyTorchJob"]
    assert kube.objects[("ConfigMap", "ml", "job-config")]["data"]["config.json"] == rendered
    pj = kube.objects[("PyTorchJob", "ml", "job")]
    assert (
        pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"]
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
