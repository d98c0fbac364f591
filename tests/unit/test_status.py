"""status.py: phase mapping from PyTorchJob conditions, pod failure messages, stable times."""

from __future__ import annotations

from typing import Any

import pytest

from kubetron_operator.plan import plan
from kubetron_operator.status import (
    Observed,
    describe_pod_failures,
    invalid_status,
    job_status,
    status_differs,
)
from tests.builders import make_job

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def _pj(*conds: tuple[str, str], **status: Any) -> dict[str, Any]:
    conditions = [
        {"type": t, "status": s, "reason": f"PyTorchJob{t}", "lastTransitionTime": T0}
        for t, s in conds
    ]
    return {"status": {"conditions": conditions, **status}}


def _failed_pod(replica: str, index: str, code: int, reason: str = "Error") -> dict[str, Any]:
    labels = {
        "training.kubeflow.org/replica-type": replica,
        "training.kubeflow.org/replica-index": index,
    }
    term = {"terminated": {"exitCode": code, "reason": reason}}
    return {
        "metadata": {"name": f"job-{replica.lower()}-{index}", "labels": labels},
        "status": {"containerStatuses": [{"name": "pytorch", "state": term}]},
    }


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [
        ((), "Pending"),
        ((("Created", "True"),), "Pending"),
        ((("Created", "True"), ("Running", "True")), "Running"),
        ((("Running", "False"), ("Restarting", "True")), "Restarting"),
        ((("Running", "False"), ("Succeeded", "True")), "Succeeded"),
        ((("Running", "False"), ("Failed", "True")), "Failed"),
        ((("Created", "True"), ("Suspended", "True")), "Suspended"),
    ],
)
def test_phase_follows_pytorchjob_conditions(
    conditions: tuple[tuple[str, str], ...], phase: str
) -> None:
    p = plan(make_job())
    status = job_status(Observed(3, {}, _pj(*conditions), []), p, "job", T1)
    assert status["phase"] == phase
    assert status["observedGeneration"] == 3
    assert status["worldSize"] == 8 and status["parallelism"]["data"] == 8


def test_failed_pod_reason_reaches_the_failed_condition() -> None:
    pj = _pj(("Failed", "True"), startTime=T0, completionTime=T1)
    pods = [_failed_pod("Worker", "0", 1), _failed_pod("Master", "0", 137, "OOMKilled")]
    status = job_status(Observed(1, {}, pj, pods), plan(make_job()), "job", T1)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert "master-0 exited with code 137 (OOMKilled)" in failed["message"]
    assert "worker-0 exited with code 1 (Error)" in failed["message"]
    assert (status["startTime"], status["completionTime"]) == (T0, T1)


def test_condition_time_is_kept_while_status_is_unchanged() -> None:
    p = plan(make_job())
    first = job_status(Observed(1, {}, None, []), p, "job", T0)
    second = job_status(Observed(1, first, None, []), p, "job", T1)
    assert second["conditions"][0]["lastTransitionTime"] == T0
    assert not status_differs(first, second)


def test_invalid_status_names_problems_and_fails() -> None:
    status = invalid_status(Observed(2, {}, None, []), ["a is wrong", "b is wrong"], T0)
    (cond,) = status["conditions"]
    assert status["phase"] == "Failed"
    assert (cond["type"], cond["status"], cond["reason"]) == ("Valid", "False", "InvalidSpec")
    assert cond["message"] == "a is wrong; b is wrong"


def test_the_trainers_termination_message_is_in_the_failure() -> None:
    pod = _failed_pod("Master", "0", 2)
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    term["message"] = (
        "rank-0: config field data.paths[0].prefix:\n /d.bin does not exist" + "x" * 500
    )
    text = describe_pod_failures([pod])
    assert text.startswith("master-0 exited with code 2 (Error): rank-0: config field ")
    assert "prefix: /d.bin does not exist" in text  # whitespace folded to one line
    assert len(text) < 400  # bounded: a condition is no log


def test_running_pods_are_not_failures() -> None:
    pod = {"metadata": {"name": "p"}, "status": {"containerStatuses": [{"state": {"running": {}}}]}}
    assert describe_pod_failures([pod]) == ""


def test_failure_seen_in_a_watch_event_survives_pod_deletion() -> None:
    p = plan(make_job())
    seen = ("master-0 exited with code 3 (Error)",)
    running = _pj(("Running", "True"))
    first = job_status(Observed(1, {}, running, [], seen), p, "job", T0)
    pod_failed = next(c for c in first["conditions"] if c["type"] == "PodFailed")
    assert pod_failed["message"] == seen[0]
    # the training-operator deleted the pod and the operator restarted: only the status remains
    failed = job_status(Observed(1, first, _pj(("Failed", "True")), []), p, "job", T1)
    cond = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert cond["message"].endswith(seen[0])
