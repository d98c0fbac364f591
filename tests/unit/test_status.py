"""status.py: phase from the verdict on the attempt, mirrored PyTorchJob conditions, restarts,
stable condition times."""

from __future__ import annotations

from typing import Any

import pytest

from kubetron_operator.lifecycle import Verdict
from kubetron_operator.plan import plan
from kubetron_operator.status import (
    Observed,
    invalid_status,
    job_status,
    restart_status,
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


@pytest.mark.parametrize(
    ("action", "restarts", "phase"),
    [
        ("wait", 0, "Pending"),
        ("wait", 1, "Restarting"),  # the next attempt's pods are not running yet
        ("run", 0, "Running"),
        ("succeed", 0, "Succeeded"),
        ("fail", 0, "Failed"),
        ("suspend", 0, "Suspended"),
    ],
)
def test_phase_follows_the_verdict(action: str, restarts: int, phase: str) -> None:
    old = {"restarts": restarts} if restarts else {}
    verdict = Verdict(action)  # type: ignore[arg-type]
    status = job_status(Observed(3, old, _pj(("Created", "True")), []), plan(make_job()), "job",
                        verdict, 1 + restarts, T1)  # fmt: skip
    assert status["phase"] == phase
    assert status["observedGeneration"] == 3
    assert status["worldSize"] == 8 and status["parallelism"]["data"] == 8
    assert status["attempt"] == 1 + restarts


def test_pytorchjob_failed_and_restarting_are_not_mirrored() -> None:
    pj = _pj(("Created", "True"), ("Running", "False"), ("Failed", "True"), ("Restarting", "True"))
    status = job_status(Observed(1, {}, pj, []), plan(make_job()), "job", Verdict("wait"), 1, T1)
    assert [c["type"] for c in status["conditions"]] == ["Valid", "Created", "Running"]


def test_a_permanent_failure_is_the_failed_condition() -> None:
    verdict = Verdict("fail", "PodFailed", "pod job-worker-0 container pytorch exited with code 2")
    pj = _pj(("Failed", "True"), startTime=T0, completionTime=T1)
    status = job_status(Observed(1, {}, pj, []), plan(make_job()), "job", verdict, 1, T1)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["reason"], failed["message"]) == ("PodFailed", verdict.message)
    pod_failed = next(c for c in status["conditions"] if c["type"] == "PodFailed")
    assert pod_failed["message"] == verdict.message
    assert (status["startTime"], status["completionTime"]) == (T0, T1)


def test_restart_counts_the_attempt_and_keeps_the_reason_until_the_next_runs() -> None:
    p = plan(make_job())
    running = job_status(Observed(1, {}, _pj(("Running", "True"), startTime=T0), []), p, "job",
                         Verdict("run"), 1, T0)  # fmt: skip
    assert running["runningSince"] == T0
    restarted = restart_status(Observed(1, running, None, []), p, "job", "PodFailed", "why", T1)
    assert (restarted["phase"], restarted["attempt"], restarted["restarts"]) == (
        "Restarting", 2, 1,
    )  # fmt: skip
    assert restarted["runningSince"] is None  # removed by the merge patch
    cond = next(c for c in restarted["conditions"] if c["type"] == "Restarting")
    assert (cond["status"], cond["reason"], cond["message"]) == ("True", "PodFailed", "why")
    waiting = job_status(Observed(1, restarted, None, []), p, "job", Verdict("wait"), 2, T1)
    assert waiting["phase"] == "Restarting"
    assert next(c for c in waiting["conditions"] if c["type"] == "Restarting")["status"] == "True"
    assert waiting["startTime"] == T0  # the first attempt's start, kept
    again = job_status(Observed(1, waiting, _pj(("Running", "True"), startTime=T1), []), p, "job",
                       Verdict("run"), 2, T1)  # fmt: skip
    cond = next(c for c in again["conditions"] if c["type"] == "Restarting")
    assert (again["phase"], cond["status"], cond["message"]) == ("Running", "False",
                                                                 "attempt 2 runs")  # fmt: skip


def test_condition_time_is_kept_while_status_is_unchanged() -> None:
    p = plan(make_job())
    first = job_status(Observed(1, {}, None, []), p, "job", Verdict("wait"), 1, T0)
    second = job_status(Observed(1, first, None, []), p, "job", Verdict("wait"), 1, T1)
    assert second["conditions"][0]["lastTransitionTime"] == T0
    assert not status_differs(first, second)


def test_suspend_clears_running_since() -> None:
    p = plan(make_job())
    status = job_status(Observed(1, {"runningSince": T0}, None, []), p, "job",
                        Verdict("suspend"), 1, T1)  # fmt: skip
    assert status["runningSince"] is None


def test_invalid_status_names_problems_and_fails() -> None:
    status = invalid_status(Observed(2, {}, None, []), ["a is wrong", "b is wrong"], T0)
    (cond,) = status["conditions"]
    assert status["phase"] == "Failed"
    assert (cond["type"], cond["status"], cond["reason"]) == ("Valid", "False", "InvalidSpec")
    assert cond["message"] == "a is wrong; b is wrong"
