"""lifecycle.assess: what the pods of the current attempt call for (restart, fail, run...)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetron_api.v1alpha1 import FailureCause as C
from kubetron_operator.lifecycle import (
    Ended,
    Verdict,
    advanced_at,
    assess,
    container_exits,
    disruption,
    unschedulable,
)

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
    return {"metadata": meta, "spec": extra.pop("spec", {}), "status": {"phase": phase, **extra}}


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
    # the pods have exited 0 before the job says Succeeded: still running, not back to Pending
    done = [pod("worker-0", phase="Succeeded"), pod("worker-1", phase="Succeeded")]
    assert judge(done).action == "run"
    assert judge([done[0], pod("worker-1")]).action == "run"
    assert judge([pod("worker-0"), pod("worker-1", phase="Pending")], running_since=None).action \
        == "wait"  # fmt: skip


def test_a_permanent_exit_fails_naming_pod_container_and_code() -> None:
    v = judge([exited("worker-0", 2, message="rank-0: config field x: bad"), pod("worker-1")])
    assert (v.action, v.reason) == ("fail", "PodFailed")
    assert v.message == (
        "pod job-worker-0 container pytorch exited with code 2 (Error): rank-0: config field x: bad"
    )


@pytest.mark.parametrize(
    ("code", "reason", "cause"),
    [
        (134, "Error", C.COLLECTIVE_TIMEOUT),
        (135, "Error", C.GPU_FAULT),
        (137, "Error", C.SIGNAL),
        (143, "Error", C.SIGNAL),
    ],
)
def test_a_retryable_exit_restarts(code: int, reason: str, cause: C) -> None:
    v = judge([exited("worker-1", code, reason, spec={"nodeName": "n1"}), pod("worker-0")])
    assert (v.action, v.reason) == ("restart", "PodFailed")
    assert f"exited with code {code} ({reason})" in v.message
    # a GPU fault is its node's: the next attempts avoid it
    assert v.ended == Ended(cause, "job-worker-1", "n1", node_fault=cause == C.GPU_FAULT)


def test_oom_killed_fails_at_once_naming_the_memory_fields() -> None:
    """Killed at its memory limit (137, OOMKilled): a restart repeats it, so the job fails."""
    v = judge([exited("worker-1", 137, "OOMKilled"), pod("worker-0")])
    assert (v.action, v.reason) == ("fail", "PodFailed")
    assert v.ended == Ended(C.OOM_KILLED, "job-worker-1")
    assert v.message.startswith("pod job-worker-1 container pytorch exited with code 137 "
                                "(OOMKilled); the container reached its memory limit")  # fmt: skip
    for field in ("spec.resources.memory", "spec.recipe.microBatchSize",
                  "spec.recipe.recomputeLayers", "spec.parallelism.pipeline"):  # fmt: skip
        assert field in v.message


def test_gpu_out_of_memory_and_other_permanent_codes_fail() -> None:
    v = judge([exited("worker-0", 4, message="CUDA out of memory"), pod("worker-1")])
    assert (v.action, v.ended) == ("fail", Ended(C.GPU_OUT_OF_MEMORY, "job-worker-0"))
    assert "CUDA out of memory; the same shape runs out of GPU memory again" in v.message
    assert "spec.parallelism.tensor" in v.message
    v = judge([exited("worker-0", 3), pod("worker-1")])
    assert (v.action, v.ended) == ("fail", Ended(C.PERMANENT_ERROR, "job-worker-0"))


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
        "restart", "PodDisrupted", "pod job-worker-1 evicted: low on memory",
        Ended(C.EVICTED, "job-worker-1", node_fault=True),
    )  # fmt: skip
    cond = {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
            "message": "Taint manager: deleting due to NoExecute taint"}  # fmt: skip
    v = judge([pod("worker-0"), pod("worker-1", conditions=[cond], spec={"nodeName": "n1"})])
    assert (v.action, v.reason) == ("restart", "PodDisrupted")
    assert "DeletionByTaintManager" in v.message
    assert v.ended == Ended(C.NODE_LOST, "job-worker-1", "n1", node_fault=True)


@pytest.mark.parametrize(
    ("reason", "cause", "node_fault"),
    [
        ("PreemptionByScheduler", C.PREEMPTED, False),
        ("TerminationByKubelet", C.EVICTED, True),
        ("EvictionByEvictionAPI", C.EVICTED, False),
        ("DeletionByPodGC", C.NODE_LOST, True),
    ],
)
def test_disruption_causes(reason: str, cause: C, node_fault: bool) -> None:
    cond = {"type": "DisruptionTarget", "status": "True", "reason": reason}
    # the disruption says why the container was killed (143 after its save): not a Signal
    p = exited("worker-1", 143, conditions=[cond], spec={"nodeName": "n1"})
    v = judge([pod("worker-0"), p])
    assert (v.action, v.ended) == ("restart", Ended(cause, "job-worker-1", "n1", node_fault))


def test_a_pod_on_a_lost_node_restarts_and_blames_the_node() -> None:
    ready = {"type": "Ready", "status": "False", "reason": "NodeLost",
             "message": "Node n1 which was running pod job-worker-1 is unresponsive"}  # fmt: skip
    lost = pod("worker-1", conditions=[ready], spec={"nodeName": "n1"})
    v = judge([pod("worker-0"), lost])
    assert v == Verdict(
        "restart", "PodDisrupted",
        "pod job-worker-1 lost with its node n1: Node n1 which was running pod job-worker-1 is "
        "unresponsive",
        Ended(C.NODE_LOST, "job-worker-1", "n1", node_fault=True),
    )  # fmt: skip
    unknown = pod("worker-1", phase="Unknown", spec={"nodeName": "n2"})
    assert disruption(unknown) == (
        Ended(C.NODE_LOST, "job-worker-1", "n2", node_fault=True),
        "lost with its node n2: its node stopped reporting",
    )
    assert disruption(pod("worker-0")) is None


def test_unschedulable_pods_of_the_attempt() -> None:
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    pending = pod("worker-1", phase="Pending", conditions=[cond])
    other = pod("worker-0", attempt=2, phase="Pending", conditions=[cond])
    assert unschedulable([pod("worker-0"), pending, other], 1) == ["job-worker-1"]


def test_a_deleted_or_recreated_pod_restarts() -> None:
    deleting = pod("worker-1", meta={"deletionTimestamp": T1})
    assert judge([pod("worker-0"), deleting]).reason == "PodDeleted"
    recreated = pod("worker-1", created=T1)  # after the attempt was seen running
    v = judge([pod("worker-0"), recreated])
    assert (v.action, v.reason) == ("restart", "PodDeleted")
    assert "re-created" in v.message
    assert judge([pod("worker-0")]).message == "1 of 2 pods are gone"
    assert judge([pod("worker-0"), deleting]).ended == Ended(C.POD_DELETED, "job-worker-1")
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
        "restart", "ReplicaFailed", "x", Ended(C.POD_DELETED)
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
        Ended(C.HANG),
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
