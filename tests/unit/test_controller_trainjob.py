"""The controller on the TrainJob backend, against the in-memory fake Kube: the same lifecycle as
the PyTorchJob's (tests/unit/test_controller.py) -- create, whole-group restart as a new
TrainJob, suspend and resume in the same attempt, success, TTL -- read through backends.py."""

from __future__ import annotations

from typing import Any

import pytest

from kubetron_api.v1alpha1 import Backend
from kubetron_operator.backends import COMPLETION_INDEX_LABEL, PYTORCHJOB, TRAINJOB
from kubetron_operator.controller import Controller
from kubetron_operator.kube import ApiError
from kubetron_operator.metrics import OperatorMetrics
from tests.unit.fake_kube import FakeKube

Obj = dict[str, Any]
TJ = ("TrainJob", "ml", "job")
MJ = ("MegatronJob", "ml", "job")


@pytest.fixture
def controller(kube: FakeKube) -> Controller:
    kube.objects[MJ]["spec"]["backend"] = "TrainJob"
    return Controller(kube, OperatorMetrics(), read_metrics=_metrics)  # type: ignore[arg-type]


def _metrics(ip: str, port: int) -> str:
    raise OSError("no endpoint in unit tests")


def status(kube: FakeKube) -> Obj:
    return kube.objects[MJ]["status"]


def pod(kube: FakeKube, index: int, attempt: int, phase: str = "Running",
        code: int | None = None) -> None:  # fmt: skip
    """A pod of the TrainJob's indexed Job, as the Job controller labels it."""
    state: Obj = {"running": {}} if code is None else {"terminated": {"exitCode": code}}
    kube.put({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"job-node-0-{index}-x", "namespace": "ml",
                     "creationTimestamp": "2026-01-01T00:00:00Z",
                     "labels": {"kubetron.io/job-name": "job", "kubetron.io/attempt": str(attempt),
                                COMPLETION_INDEX_LABEL: str(index)}},
        "status": {"phase": phase, "podIP": f"10.0.0.{index}",
                   "containerStatuses": [{"name": "node", "state": state}]},
    })  # fmt: skip


def trainjob_status(kube: FakeKube, ready: int = 1, **conditions: str) -> None:
    kube.objects[TJ]["status"] = {
        "jobsStatus": [{"name": "node", "ready": ready, "active": 1, "failed": 0,
                        "succeeded": 0, "suspended": 0}],
        "conditions": [{"type": t, "status": "True", "reason": r, "message": r,
                        "lastTransitionTime": "2026-01-01T01:00:00Z"}
                       for t, r in conditions.items()],
    }  # fmt: skip


def all_running(kube: FakeKube, controller: Controller, attempt: int) -> str:
    """Both pods of `attempt` run and the TrainJob says so; the reconcile that sees it."""
    pod(kube, 0, attempt)
    pod(kube, 1, attempt)
    trainjob_status(kube)
    return controller.reconcile("ml", "job")


def edit_spec(kube: FakeKube, **run_policy: Any) -> None:
    body = kube.objects[MJ]
    body["spec"].setdefault("runPolicy", {}).update(run_policy)
    body["metadata"]["generation"] += 1


def test_the_operator_creates_and_owns_a_trainjob_and_rereads_only(
    kube: FakeKube, controller: Controller
) -> None:
    assert controller.reconcile("ml", "job") == "success"
    assert kube.applied == ["ConfigMap", "TrainJob"]
    assert ("PyTorchJob", "ml", "job") not in kube.objects
    tj = kube.objects[TJ]
    (owner,) = tj["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("MegatronJob", "job", True)
    (patch,) = tj["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod_labels = node["template"]["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["kubetron.io/attempt"] == "1" and pod_labels["kubetron.io/job-name"] == "job"
    assert status(kube)["phase"] == "Pending"
    all_running(kube, controller, 1)
    st = status(kube)
    assert st["phase"] == "Running"
    running = next(c for c in st["conditions"] if c["type"] == "Running")
    assert running["status"] == "True"
    kube.applied.clear()
    writes = kube.status_writes
    for _ in range(3):  # a Running condition without a time of its own keeps the first one
        controller.reconcile("ml", "job")
    assert kube.applied == [] and kube.status_writes == writes


def test_the_operator_default_backend_picks_the_trainjob(kube: FakeKube) -> None:
    c = Controller(kube, OperatorMetrics(), backend=Backend.TRAINJOB)  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    assert kube.applied == ["ConfigMap", "TrainJob"]


def test_a_failed_pod_restarts_the_group_as_a_new_trainjob(
    kube: FakeKube, controller: Controller
) -> None:
    controller.reconcile("ml", "job")
    all_running(kube, controller, 1)
    pod(kube, 1, 1, "Failed", code=134)  # a lost peer: retryable
    trainjob_status(kube, Failed="FailedJobs")  # JobSet fails as well: the pod says why
    assert controller.reconcile("ml", "job") == "restarted"
    st = status(kube)
    assert (st["phase"], st["attempt"], st["restarts"]) == ("Restarting", 2, 1)
    assert st["failures"]["last"]["cause"] == "CollectiveTimeout"
    assert ("TrainJob", "job", None) in kube.deleted and TJ not in kube.objects
    assert ("Pod", "job-node-0-0-x", 10) in kube.deleted  # the running rank, short grace
    kube.applied.clear()
    # the garbage collector has not yet removed the old TrainJob's JobSet: Trainer v2 would
    # adopt it for the next TrainJob of the same name
    owner = {"kind": "TrainJob", "name": "job", "uid": "old", "controller": True}
    meta = {"name": "job", "namespace": "ml", "ownerReferences": [owner]}
    kube.put({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": meta})
    assert controller.reconcile("ml", "job") == "success"
    assert kube.applied == [] and status(kube)["phase"] == "Restarting"
    del kube.objects[("JobSet", "ml", "job")]
    controller.reconcile("ml", "job")  # the old pods and JobSet are gone: attempt 2's TrainJob
    assert kube.applied == ["TrainJob"]
    assert kube.objects[TJ]["metadata"]["labels"]["kubetron.io/attempt"] == "2"
    all_running(kube, controller, 2)
    assert (status(kube)["phase"], status(kube)["attempt"]) == ("Running", 2)
    trainjob_status(kube, Complete="JobSetCompleted")
    for i in (0, 1):
        pod(kube, i, 2, "Succeeded", code=0)
    controller.reconcile("ml", "job")
    st = status(kube)
    assert st["phase"] == "Succeeded" and st["completionTime"] == "2026-01-01T01:00:00Z"


def test_suspend_suspends_the_trainjob_and_resume_continues_the_attempt(
    kube: FakeKube, controller: Controller
) -> None:
    controller.reconcile("ml", "job")
    all_running(kube, controller, 1)
    edit_spec(kube, suspend=True)
    controller.reconcile("ml", "job")
    assert kube.objects[TJ]["spec"]["suspend"] is True  # Trainer v2 suspends the JobSet
    # the Job controller deletes the pods; the trainers save on SIGTERM and exit 143
    for i in (0, 1):
        pod(kube, i, 1, "Failed", code=143)
        controller.note_pod(kube.objects.pop(("Pod", "ml", f"job-node-0-{i}-x")))
    trainjob_status(kube, ready=0, Suspended="Suspended")
    controller.reconcile("ml", "job")
    assert status(kube)["phase"] == "Suspended"
    edit_spec(kube, suspend=False)
    controller.reconcile("ml", "job")
    assert kube.objects[TJ]["spec"]["suspend"] is False
    assert all_running(kube, controller, 1) == "success"
    st = status(kube)
    assert (st["phase"], st["attempt"], st.get("restarts", 0)) == ("Running", 1, 0)


def test_the_operator_deletes_a_finished_trainjob_after_its_ttl(
    kube: FakeKube, controller: Controller
) -> None:
    kube.objects[MJ]["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 0}
    controller.reconcile("ml", "job")
    trainjob_status(kube, Complete="JobSetCompleted")
    controller.reconcile("ml", "job")
    assert status(kube)["phase"] == "Succeeded" and TJ in kube.objects
    controller.reconcile("ml", "job")  # final, and its TTL is over
    assert TJ not in kube.objects and status(kube)["phase"] == "Succeeded"


def test_progress_is_read_from_the_pod_of_index_0(kube: FakeKube, controller: Controller) -> None:
    asked: list[str] = []

    def read(ip: str, port: int) -> str:
        asked.append(ip)
        raise OSError("not serving yet")

    controller.read_metrics = read
    controller.reconcile("ml", "job")
    pod(kube, 1, 1)
    pod(kube, 0, 1)
    trainjob_status(kube)
    controller.reconcile("ml", "job")
    assert asked == ["10.0.0.0"]


def test_what_a_trainjob_cannot_carry_is_an_invalid_spec(
    kube: FakeKube, controller: Controller
) -> None:
    kube.objects[MJ]["spec"]["resources"]["priorityClassName"] = "high"
    assert controller.reconcile("ml", "job") == "invalid"
    assert kube.applied == []
    (valid,) = status(kube)["conditions"]
    assert "spec.backend TrainJob cannot carry resources.priorityClassName" in valid["message"]


def test_trainjobs_are_watched_only_where_the_operator_may_list_them(kube: FakeKube) -> None:
    c = Controller(kube, OperatorMetrics())  # type: ignore[arg-type]
    assert c.watched_backends() == [PYTORCHJOB, TRAINJOB]

    class NoTrainJobs(FakeKube):
        def list(self, kind: str, namespace: str | None, selector: str = "",
                 limit: int = 0) -> list[Obj]:  # fmt: skip
            if kind == "TrainJob":
                raise ApiError(403, "Forbidden", "trainjobs is forbidden")
            return super().list(kind, namespace, selector, limit)

    c = Controller(NoTrainJobs(), OperatorMetrics())  # type: ignore[arg-type]
    assert c.watched_backends() == [PYTORCHJOB]
    c = Controller(NoTrainJobs(), OperatorMetrics(), backend=Backend.TRAINJOB)  # type: ignore[arg-type]
    assert c.watched_backends() == [TRAINJOB, PYTORCHJOB]  # the default first, whatever it is


def test_a_live_trainjob_keeps_its_immutable_trainer_for_its_attempt(
    kube: FakeKube, controller: Controller
) -> None:
    """Trainer v2 stores the trainer's quantities canonically and refuses any change to them:
    neither is drift, and a new generation (suspend) leaves them as they are; so is another
    manager's runtime patch (Kueue's)."""
    controller.reconcile("ml", "job")
    trainer = kube.objects[TJ]["spec"]["trainer"]
    trainer["resourcesPerNode"]["requests"]["memory"] = "144Gi"  # 147456Mi as stored
    kueue_patch = {"manager": "kueue.x-k8s.io/manager", "trainingRuntimeSpec": {}}
    kube.objects[TJ]["spec"]["runtimePatches"].append(kueue_patch)  # Kueue's webhook's
    kube.applied.clear()
    controller.reconcile("ml", "job")
    assert kube.applied == []
    edit_spec(kube, suspend=True)
    controller.reconcile("ml", "job")
    assert kube.applied == ["ConfigMap", "TrainJob"]
    spec = kube.objects[TJ]["spec"]
    assert spec["suspend"] is True and spec["trainer"] == trainer
    assert spec["runtimePatches"][1] == kueue_patch
