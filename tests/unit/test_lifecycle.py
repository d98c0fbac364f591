"""lifecycle.assess: what the pods of the current attempt call for (restart, fail, run...)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetron_operator.lifecycle import Verdict, advanced_at, assess, container_exits

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z", "2026-01-01T01:00:00Z"
Obj = dict[str, Any]


def pod(
    name: str, attempt: int = 1, phase: str = "Running", created: str = T0, **extra: Any
) -> Obj:
    meta: Obj = {
        "name": f"job-{name}",
        "labels": {"kubetron.io/attempt": str(attempt)},
        "creationTimestamp": created,
    }
    meta.update(extra.pop("meta", {}))
    return {"metadata": meta, "status": {"phase": phase, **extra}}


def exited(name: str, code: int, reason: str = "Error", message: str = "", **kw: Any) -> Obj:
    term = {"exitCode": code, "reason": reason, "message": message}
    state = {"name": "pytorch", "state": {"terminated": term}}
    return pod(name, phase="Failed", containerStatuses=[state], **kw)


def judge(pods: list[Obj], pj: Obj | None = None, **kw: Any) -> Verdict:
    args: dict[str, Any] = {
        "pytorch_job": pj,
        "attempt": 1,
        "expected_pods": 2,
        "running_since": T0,
        "progress": None,
        "deadline_seconds": None,
        "suspended": False,
        "now": T1,
    }
    args.update(kw)
    return assess(pods=pods, **args)


def test_all_pods_running_runs_and_fewer_waits() -> None:
    assert judge([pod("worker-0"), pod("worker-1")]).action == "run"
    assert judge([pod("worker-0"), pod("worker-1", phase="Pending")], running_since=None).action \
        == "wait"  # fmt: skip


def test_a_permanent_exit_fails_naming_pod_container_and_code() -> None:
    v = judge([exited("worker-0", 2, message="rank-0: config field x: bad"), pod("worker-1")])
    assert (v.action, v.reason) == ("fail", "PodFailed")
    assert v.message == (
        "pod job-worker-0 container pytorch exited with code 2 (Error): rank-0: config field x: bad"
    )


@pytest.mark.parametrize(("code", "reason"), [(134, "Error"), (137, "OOMKilled"), (143, "Error")])
def test_a_retryable_exit_restarts(code: int, reason: str) -> None:
    v = judge([exited("worker-1", code, reason), pod("worker-0")])
    assert (v.action, v.reason) == ("restart", "PodFailed")
    assert f"exited with code {code} ({reason})" in v.message


def test_a_permanent_exit_wins_over_a_retryable_one() -> None:
    assert judge([exited("worker-0", 137), exited("worker-1", 1)]).action == "fail"


def test_pods_of_other_attempts_are_ignored() -> None:
    old = exited("worker-0", 2)
    old["metadata"]["labels"]["kubetron.io/attempt"] = "1"
    v = judge([old, pod("worker-0", attempt=2), pod("worker-1", attempt=2)], attempt=2)
    assert v.action == "run"


def test_eviction_and_disruption_restart() -> None:
    evicted = pod("worker-1", phase="Failed", reason="Evicted", message="low on memory")
    assert judge([pod("worker-0"), evicted]) == Verdict(
        "restart", "PodDisrupted", "pod job-worker-1 evicted: low on memory"
    )
    cond = {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
            "message": "Taint manager: deleting due to NoExecute taint"}  # fmt: skip
    v = judge([pod("worker-0"), pod("worker-1", conditions=[cond])])
    assert (v.action, v.reason) == ("restart", "PodDisrupted")
    assert "DeletionByTaintManager" in v.message


def test_a_deleted_or_recreated_pod_restarts() -> None:
    deleting = pod("worker-1", meta={"deletionTimestamp": T1})
    assert judge([pod("worker-0"), deleting]).reason == "PodDeleted"
    recreated = pod("worker-1", created=T1)  # after the attempt was seen running
    v = judge([pod("worker-0"), recreated])
    assert (v.action, v.reason) == ("restart", "PodDeleted")
    assert "re-created" in v.message
    assert judge([pod("worker-0")]).message == "1 of 2 pods are gone"
    # before the attempt ran, a late pod is no restart
    assert judge([pod("worker-0"), recreated], running_since=None).action == "run"


def test_pytorchjob_outcomes() -> None:
    done = {"status": {"conditions": [{"type": "Succeeded", "status": "True"}]}}
    assert judge([], done).action == "succeed"
    deadline = {"status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "PyTorchJobDeadlineExceeded"}]}}  # fmt: skip
    assert judge([pod("worker-0"), pod("worker-1")], deadline).action == "fail"
    unseen = {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "x"}]}}
    assert judge([pod("worker-0"), pod("worker-1")], unseen) == Verdict(
        "restart", "ReplicaFailed", "x"
    )


def test_suspended_is_neither_failure_nor_restart() -> None:
    assert judge([exited("worker-0", 143)], suspended=True).action == "suspend"


def test_progress_deadline() -> None:
    pods = [pod("worker-0"), pod("worker-1")]
    progress = {"step": 7, "attempt": 1, "advancedAt": T1}
    kw = {"deadline_seconds": 600, "progress": progress}
    assert judge(pods, now="2026-01-01T00:14:00Z", **kw).action == "run"  # 9 min since T1
    v = judge(pods, now="2026-01-01T00:16:00Z", **kw)  # 11 min since the step advanced
    assert v == Verdict(
        "restart",
        "ProgressDeadlineExceeded",
        "step 7 has not advanced for 660s (spec.runPolicy.progressDeadlineSeconds=600)",
    )
    # a reading of an older attempt does not count; the clock starts when the attempt ran
    old = {"step": 50, "attempt": 0, "advancedAt": T2}
    v = judge(pods, now="2026-01-01T00:11:00Z", deadline_seconds=600, progress=old)
    assert v.message.startswith("the first step has not advanced for 660s")
    assert judge(pods, now=T2, deadline_seconds=None, progress=progress).action == "run"


def test_advanced_at_moves_only_with_the_step() -> None:
    old = {"step": 5, "attempt": 1, "advancedAt": T0}
    assert advanced_at(old, {"step": 5}, 1, T1) == T0
    assert advanced_at(old, {"step": 6}, 1, T1) == T1
    assert advanced_at(old, {"step": 3}, 2, T1) == T1  # a new attempt's first reading
    assert advanced_at(old, None, 1, T1) == T0


def test_running_and_clean_exits_are_not_failures() -> None:
    ok = pod("worker-0", containerStatuses=[{"name": "pytorch", "state": {"running": {}}}])
    done = exited("worker-1", 0)
    assert container_exits([ok, done]) == []
