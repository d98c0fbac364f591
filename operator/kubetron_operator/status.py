"""MegatronJob status from what the cluster shows. Pure: the caller passes `now`.

The verdict on the current attempt (lifecycle.py) decides the phase; the backend job's Created,
Running, Succeeded and Suspended conditions (a TrainJob's as backends.py states them) are
mirrored; Failed and Restarting are the operator's own (it restarts whole groups itself).
Conditions keep their lastTransitionTime while their status does not change, so a status
written twice with the same facts is byte-identical (no write, no event).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetron_api.v1alpha1 import Phase
from kubetron_operator import faults, goodput
from kubetron_operator.lifecycle import Verdict, unschedulable
from kubetron_operator.plan import Plan
from kubetron_operator.scheduling import QUEUED

Obj = dict[str, Any]

VALID = "Valid"
POD_FAILED = "PodFailed"
RESTARTING = "Restarting"
FAILED = "Failed"
# Mirrored from the PyTorchJob; Failed and Restarting are the operator's own.
MIRRORED = ("Created", "Running", "Succeeded", "Suspended")
_VERDICT_PHASE = {
    "run": Phase.RUNNING,
    "succeed": Phase.SUCCEEDED,
    "fail": Phase.FAILED,
    "suspend": Phase.SUSPENDED,
    "queue": Phase.QUEUED,
}


@dataclass(frozen=True)
class Observed:
    """What the operator saw: the job's old status, its backend job and its pods (the failed
    ones seen in watch events included: they may be deleted before a reconcile lists them)."""

    generation: int
    old_status: Obj
    pytorch_job: Obj | None
    pods: list[Obj]
    progress: Obj | None = None  # a fresh read of rank 0's metrics (progress.py), if any
    # the scheduler's record of the job's admission (Kueue's Workload), if any
    admission: Obj | None = None


def condition(old: list[Obj], type_: str, status: str, reason: str, message: str, now: str) -> Obj:
    """A condition that keeps its old lastTransitionTime if its status is unchanged."""
    prev = next((c for c in old if c.get("type") == type_), None)
    if prev is None or prev.get("status") != status:
        when = now
    else:
        when = prev.get("lastTransitionTime") or now
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": when,
    }


def invalid_status(observed: Observed, problems: list[str], now: str) -> Obj:
    """Status of a spec that cannot run: Valid=False, phase Failed, nothing created."""
    old = observed.old_status.get("conditions", [])
    message = "; ".join(problems)
    return {
        "phase": Phase.FAILED.value,
        "observedGeneration": observed.generation,
        "conditions": [condition(old, VALID, "False", "InvalidSpec", message, now)],
    }


def job_status(
    observed: Observed, plan: Plan, job_name: str, verdict: Verdict, attempt: int, now: str
) -> Obj:
    """Status of a valid job from the verdict on its current attempt and its PyTorchJob."""
    old_status = observed.old_status
    old = old_status.get("conditions", [])
    restarts = int(old_status.get("restarts") or 0)
    phase = _VERDICT_PHASE.get(verdict.action)
    if phase is None:  # waiting for the attempt's pods
        phase = Phase.RESTARTING if restarts else Phase.PENDING
    pj_status = (observed.pytorch_job or {}).get("status", {})
    conditions = [condition(old, VALID, "True", "SpecValid", "spec is valid", now)]
    if verdict.action == "fail" and verdict.reason == "PodFailed":
        conditions.append(
            condition(old, POD_FAILED, "True", "ContainerFailed", verdict.message, now)
        )
    for src in pj_status.get("conditions", []) or []:
        if src.get("type") in MIRRORED:
            kind, state = src["type"], src.get("status", "Unknown")
            reason, message = src.get("reason", "") or kind, src.get("message", "")
            mirrored = condition(old, kind, state, reason, message, now)
            if src.get("lastTransitionTime"):  # else (a TrainJob's Running) kept while it holds
                mirrored["lastTransitionTime"] = src["lastTransitionTime"]
            conditions.append(mirrored)
    if restarts:
        conditions.append(_restarting_condition(old, phase, attempt, now))
    admitted = plan.scheduler.admitted(observed.admission)  # None without a queue
    if verdict.action == "queue":
        conditions.append(condition(old, QUEUED, "True", verdict.reason, verdict.message, now))
    elif admitted is not None and verdict.action != "suspend" and observed.pytorch_job is not None:
        conditions.append(condition(old, QUEUED, "False", "Admitted", admitted, now))
    if verdict.action == "fail":
        conditions.append(condition(old, FAILED, "True", verdict.reason, verdict.message, now))
    conditions += _avoided_condition(observed, verdict, attempt, now)
    status: Obj = {
        "phase": phase.value,
        "observedGeneration": observed.generation,
        "conditions": conditions,
        **_shape(plan, job_name),
        "attempt": attempt,
        "restarts": restarts,
        "runningSince": _running_since(old_status, verdict, now),
    }
    for key in ("startTime", "completionTime"):
        if pj_status.get(key):
            status[key] = pj_status[key]
        elif old_status.get(key) and key == "startTime":
            status[key] = old_status[key]  # the first attempt's start, kept across attempts
    # the last reading is kept (between reads, and once the pods are gone)
    progress = observed.progress or old_status.get("progress")
    if progress:
        status["progress"] = progress
    status.update(_failures(old_status, verdict, attempt, now))
    refresh = observed.progress is not None or verdict.action in ("succeed", "fail")
    if gp := goodput.at_status(old_status.get("goodput"), status["runningSince"], now, refresh):
        status["goodput"] = gp
    return status


def _failures(old_status: Obj, verdict: Verdict, attempt: int, now: str) -> Obj:
    """`failures` and `avoidedNodes`: with the attempt's end when it failed the job."""
    if verdict.action == "fail" and verdict.ended is not None:
        return faults.record(old_status, verdict.ended, verdict.message, attempt, now)
    return {k: old_status[k] for k in ("failures", "avoidedNodes") if old_status.get(k)}


def _avoided_condition(observed: Observed, verdict: Verdict, attempt: int, now: str) -> list[Obj]:
    """NodesAvoided, while the job avoids nodes: True (the attempt waits) when its pods fit no
    other node, else False."""
    old_status = observed.old_status
    nodes = faults.avoided_nodes(old_status)
    if not nodes:
        return []
    old = old_status.get("conditions", [])
    pending = unschedulable(observed.pods, attempt) if verdict.action == "wait" else []
    if message := faults.waiting_message(pending, old_status):
        return [condition(old, faults.NODES_AVOIDED, "True", "NoOtherNode", message, now)]
    text = f"the pods avoid nodes {', '.join(nodes)} (status.avoidedNodes)"
    return [condition(old, faults.NODES_AVOIDED, "False", "OtherNodesFit", text, now)]


def restart_status(
    observed: Observed,
    plan: Plan,
    job_name: str,
    reason: str,
    message: str,
    now: str,
    ended: Verdict | None = None,
) -> Obj:
    """The status when the operator replaces the attempt: the next attempt, one more restart;
    the attempt's end (`ended`: the verdict on it) counted by its cause, its node avoided
    when at fault."""
    old_status = observed.old_status
    attempt = int(old_status.get("attempt") or 1)
    old = old_status.get("conditions", [])
    status: Obj = {
        "phase": Phase.RESTARTING.value,
        "observedGeneration": observed.generation,
        "conditions": [
            condition(old, VALID, "True", "SpecValid", "spec is valid", now),
            condition(old, RESTARTING, "True", reason, message, now),
        ],
        **_shape(plan, job_name),
        "attempt": attempt + 1,
        "restarts": int(old_status.get("restarts") or 0) + 1,
        "runningSince": None,  # removed by the merge patch: the new attempt has not run yet
    }
    for key in ("startTime", "progress"):
        if old_status.get(key):
            status[key] = old_status[key]
    if ended is not None and ended.ended is not None:
        status.update(faults.record(old_status, ended.ended, ended.message, attempt, now))
    else:
        status.update(_failures(old_status, Verdict("restart"), attempt, now))
    if gp := goodput.at_restart(old_status, now):
        status["goodput"] = gp
    return status


def waiting_status(old_status: Obj, plan: Plan, generation: int, attempt: int, name: str) -> Obj:
    """While the pods of a replaced attempt terminate: the old status, phase Restarting."""
    return {
        **old_status,
        "phase": Phase.RESTARTING.value,
        "observedGeneration": generation,
        **_shape(plan, name),
        "attempt": attempt,
    }


def _shape(plan: Plan, job_name: str) -> Obj:
    shape: Obj = {
        "worldSize": plan.world_size,
        "parallelism": plan.resolved_parallelism().model_dump(by_alias=True),
        "pytorchJob": job_name,
    }
    if plan.models:  # a job of several models: each one's ranks and shape
        shape["models"] = [m.status().model_dump(by_alias=True) for m in plan.models]
    return shape


def _restarting_condition(old: list[Obj], phase: Phase, attempt: int, now: str) -> Obj:
    """True (with the restart's reason) until the new attempt runs, then False."""
    prev = next((c for c in old if c.get("type") == RESTARTING), None)
    if phase == Phase.RESTARTING and prev is not None:
        reason, message = prev.get("reason", ""), prev.get("message", "")
        return condition(old, RESTARTING, "True", reason, message, now)
    return condition(old, RESTARTING, "False", "Running", f"attempt {attempt} runs", now)


def _running_since(old_status: Obj, verdict: Verdict, now: str) -> str | None:
    """When every pod of the attempt was first seen running; None while suspended (the pods
    of a resumed job are new)."""
    if verdict.action in ("suspend", "queue"):
        return None
    if old_status.get("runningSince"):
        return str(old_status["runningSince"])
    return now if verdict.action == "run" else None


def phase_changed(old_status: Obj, new_status: Obj) -> bool:
    return old_status.get("phase") != new_status.get("phase")


def status_differs(old_status: Obj, new_status: Obj) -> bool:
    """True when a write would change anything the operator owns (a None, which the merge
    patch removes, equals a missing key)."""
    return any(_pruned(old_status.get(k)) != _pruned(v) for k, v in new_status.items())


def _pruned(value: object) -> object:
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    return value
