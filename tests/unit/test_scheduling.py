"""The scheduling seam: which scheduler a job's spec.scheduling chooses, and what each one adds to
the plan, the render, the apply, the assessment and the status (Kueue's reconcile paths against
the fake are in test_kueue.py)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetron_api.parse import parse_job
from kubetron_api.v1alpha1 import SchedulingSpec
from kubetron_operator.lifecycle import Verdict
from kubetron_operator.plan import PlanError, plan
from kubetron_operator.render import render
from kubetron_operator.scheduling import Default, Kueue, Scheduler, Volcano, choose
from kubetron_operator.scheduling.kueue import JOB_UID_LABEL, QUEUE_LABEL
from kubetron_operator.status import Observed, job_status
from tests.builders import job_dict

Obj = dict[str, Any]
T0 = "2026-01-01T00:00:00Z"


def _spec(**fields: Any) -> SchedulingSpec:
    return SchedulingSpec.model_validate(fields)


@pytest.mark.parametrize(
    ("fields", "chosen"),
    [
        ({}, Default),
        ({"schedulerName": "my-scheduler"}, Default),
        ({"queue": "team"}, Kueue),
        ({"queue": "team", "schedulerName": "my-scheduler"}, Kueue),  # Kueue, then that scheduler
        ({"schedulerName": "volcano"}, Volcano),
        ({"queue": "research", "schedulerName": "volcano"}, Volcano),  # Volcano's queue
    ],
)
def test_the_spec_chooses_the_scheduler(fields: Obj, chosen: type[Scheduler]) -> None:
    scheduler = choose(_spec(**fields))
    assert type(scheduler) is chosen
    assert scheduler.pod_scheduler_name() == fields.get("schedulerName")


def _pytorch_job(scheduling: Obj, **resources: Any) -> tuple[Scheduler, Obj]:
    body = job_dict(nodes=2)
    body["spec"]["scheduling"] = scheduling
    body["spec"]["resources"].update(resources)
    job = parse_job(body)
    job_plan = plan(job)
    return job_plan.scheduler, render(job, job_plan)[1]


def test_the_plan_carries_the_choice_and_render_asks_it() -> None:
    kueue, pj = _pytorch_job({"queue": "team"})
    assert isinstance(kueue, Kueue)
    assert pj["metadata"]["labels"][QUEUE_LABEL] == "team"
    assert pj["spec"]["runPolicy"]["suspend"] is True  # created suspended: Kueue starts it
    assert pj["spec"]["runPolicy"]["schedulingPolicy"] == {"queue": "team"}

    scheduling = {"queue": "research", "schedulerName": "volcano", "minAvailable": 2}
    volcano, pj = _pytorch_job(scheduling, priorityClassName="high")
    assert isinstance(volcano, Volcano)
    assert QUEUE_LABEL not in pj["metadata"]["labels"]
    assert pj["spec"]["runPolicy"]["suspend"] is False
    policy = {"minAvailable": 2, "queue": "research", "priorityClass": "high"}
    assert pj["spec"]["runPolicy"]["schedulingPolicy"] == policy  # Volcano's PodGroup
    pod = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["schedulerName"] == "volcano"

    default, pj = _pytorch_job({})
    assert isinstance(default, Default)
    assert "schedulingPolicy" not in pj["spec"]["runPolicy"]
    assert "schedulerName" not in pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]


@pytest.mark.parametrize("fields", [{}, {"schedulerName": "volcano", "queue": "research"}])
def test_a_scheduler_without_a_queue_holds_nothing_and_reads_no_admission(fields: Obj) -> None:
    scheduler = choose(_spec(**fields))
    pj: Obj = {"metadata": {"uid": "pj-uid"}, "spec": {"runPolicy": {"suspend": True}}}
    assert not scheduler.queues and scheduler.job_labels() == {}
    assert scheduler.creates(suspended=True)  # a suspended job's PyTorchJob exists, suspended
    assert scheduler.admission_query(pj) is None
    assert not scheduler.holds(None) and not scheduler.holds(pj)  # the user's suspend, not its
    assert scheduler.admitted(None) is None
    desired: Obj = {"spec": {"runPolicy": {"suspend": False}}}
    scheduler.keep(desired, pj)
    assert desired == {"spec": {"runPolicy": {"suspend": False}}}


@pytest.mark.parametrize("fields", [{}, {"schedulerName": "volcano", "queue": "research"}])
def test_only_kueue_places(fields: Obj) -> None:
    body = job_dict(nodes=4, tensor=8)
    body["spec"]["scheduling"] = {**fields, "topology": {"jobLevel": "rack"}}
    with pytest.raises(PlanError, match="needs a Kueue queue"):
        plan(parse_job(body))
    body["spec"]["scheduling"] = {**fields, "topology": {}}  # what the CRD's defaulting stores
    assert plan(parse_job(body)).placement is None


def test_kueue_reads_the_workload_of_the_pytorchjob_and_makes_it_follow_suspend() -> None:
    kueue = choose(_spec(queue="team"))
    assert kueue.queues
    assert kueue.admission_query(None) is None  # no PyTorchJob, no Workload yet
    assert kueue.admission_query({"metadata": {}}) is None
    uid = {"metadata": {"uid": "pj-uid"}}
    assert kueue.admission_query(uid) == ("Workload", f"{JOB_UID_LABEL}=pj-uid")
    active: Obj = {"spec": {}}  # Kueue's default: active
    assert kueue.follow_suspend(active, suspended=False) is None
    assert kueue.follow_suspend(active, suspended=True) == {"spec": {"active": False}}
    assert kueue.follow_suspend({"spec": {"active": False}}, suspended=False) == {
        "spec": {"active": True}
    }
    assert not kueue.creates(suspended=True)  # asks for no quota until resumed
    assert kueue.holds(None) and kueue.holds({"spec": {"runPolicy": {"suspend": True}}})
    assert not kueue.holds({"spec": {"runPolicy": {"suspend": False}}})
    assert kueue.waiting(None, "job")[0] == "WaitingForWorkload"


@pytest.mark.parametrize(("scheduling", "queued"), [({"queue": "team"}, True), ({}, False)])
def test_only_a_queue_adds_the_queued_condition_once_the_job_runs(
    scheduling: Obj, queued: bool
) -> None:
    body = job_dict(nodes=2)
    body["spec"]["scheduling"] = scheduling
    pj: Obj = {"status": {"conditions": []}}
    status = job_status(Observed(1, {}, pj, []), plan(parse_job(body)), "job", Verdict("wait"),
                        1, T0)  # fmt: skip
    types = {c["type"]: c for c in status["conditions"]}
    assert ("Queued" in types) is queued
    if queued:
        assert (types["Queued"]["status"], types["Queued"]["message"]) == (
            "False",
            "admitted by Kueue",
        )
