"""MegatronJob status from what the cluster shows. Pure: the caller passes `now`.

The PyTorchJob's conditions decide the phase; failed pods add which replica failed, with its exit
code and reason. Conditions keep their lastTransitionTime while their status does not change, so
a status written twice with the same facts is byte-identical (no write, no event).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetron_api.v1alpha1 import Phase
from kubetron_operator.plan import Plan

Obj = dict[str, Any]

# PyTorchJob condition type -> MegatronJob phase, in order of precedence.
_PHASES: list[tuple[str, Phase]] = [
    ("Succeeded", Phase.SUCCEEDED),
    ("Failed", Phase.FAILED),
    ("Suspended", Phase.SUSPENDED),
    ("Restarting", Phase.RESTARTING),
    ("Running", Phase.RUNNING),
    ("Created", Phase.PENDING),
]
MIRRORED = ("Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
VALID = "Valid"
POD_FAILED = "PodFailed"


@dataclass(frozen=True)
class Observed:
    """What the operator saw: the job's old status, its backend job and pods.

    `seen_failures` are failed containers seen in pod watch events: the training-operator
    deletes failed pods quickly, so the reason must be kept from the moment it is seen.
    """

    generation: int
    old_status: Obj
    pytorch_job: Obj | None
    pods: list[Obj]
    seen_failures: tuple[str, ...] = ()
    progress: Obj | None = None  # a fresh read of rank 0's metrics (progress.py), if any


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


def job_status(observed: Observed, plan: Plan, job_name: str, now: str) -> Obj:
    """Status of a valid job from its PyTorchJob and pods."""
    old = observed.old_status.get("conditions", [])
    pj_status = (observed.pytorch_job or {}).get("status", {})
    pj_conditions = {c["type"]: c for c in pj_status.get("conditions", []) if "type" in c}
    phase = _phase(pj_conditions)
    failure = _failures(observed, old)
    conditions = [condition(old, VALID, "True", "SpecValid", "spec is valid", now)]
    if failure:
        conditions.append(condition(old, POD_FAILED, "True", "ContainerFailed", failure, now))
    for type_ in MIRRORED:
        src = pj_conditions.get(type_)
        if src is None:
            continue
        message = src.get("message", "")
        if type_ in ("Failed", "Restarting") and src.get("status") == "True" and failure:
            message = f"{message}; {failure}" if message else failure
        conditions.append(
            {
                "type": type_,
                "status": src.get("status", "Unknown"),
                "reason": src.get("reason", "") or type_,
                "message": message,
                "lastTransitionTime": src.get("lastTransitionTime") or now,
            }
        )
    status: Obj = {
        "phase": phase.value,
        "observedGeneration": observed.generation,
        "conditions": conditions,
        "worldSize": plan.world_size,
        "parallelism": plan.resolved_parallelism().model_dump(by_alias=True),
        "pytorchJob": job_name,
    }
    for src, dst in (("startTime", "startTime"), ("completionTime", "completionTime")):
        if pj_status.get(src):
            status[dst] = pj_status[src]
    # the last reading is kept (between reads, and once the pods are gone)
    progress = observed.progress or observed.old_status.get("progress")
    if progress:
        status["progress"] = progress
    return status


def _failures(observed: Observed, old: list[Obj]) -> str:
    """Failed containers seen now, in watch events, or kept in the old status."""
    current = [f for f in describe_pod_failures(observed.pods).split("; ") if f]
    for seen in observed.seen_failures:
        if seen not in current:
            current.append(seen)
    if current:
        return "; ".join(sorted(current))
    kept = next((c for c in old if c.get("type") == POD_FAILED), None)
    return str(kept.get("message", "")) if kept else ""


def _phase(conditions: dict[str, Obj]) -> Phase:
    for type_, phase in _PHASES:
        if conditions.get(type_, {}).get("status") == "True":
            return phase
    return Phase.PENDING


# How much of a container's termination message a condition carries, per pod.
MESSAGE_LIMIT = 300


def describe_pod_failures(pods: list[Obj]) -> str:
    """'worker-0 exited with code 2 (Error): <the trainer's error>' for every pod with a failed
    container (the message part only when the container left a termination message)."""
    out: list[str] = []
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("name", "")):
        labels = pod.get("metadata", {}).get("labels", {})
        replica = labels.get("training.kubeflow.org/replica-type", "replica").lower()
        index = labels.get("training.kubeflow.org/replica-index", "?")
        for cs in pod.get("status", {}).get("containerStatuses", []) or []:
            term = (cs.get("state", {}) or {}).get("terminated") or (
                cs.get("lastState", {}) or {}
            ).get("terminated")
            if term and term.get("exitCode", 0) != 0:
                reason = term.get("reason") or "Error"
                line = f"{replica}-{index} exited with code {term['exitCode']} ({reason})"
                # The trainer's own error (kubetron_trainer.launch writes it as the
                # termination message): what to fix, not just that it failed.
                message = " ".join(str(term.get("message") or "").split())
                out.append(f"{line}: {message[:MESSAGE_LIMIT]}" if message else line)
    return "; ".join(out)


def phase_changed(old_status: Obj, new_status: Obj) -> bool:
    return old_status.get("phase") != new_status.get("phase")


def status_differs(old_status: Obj, new_status: Obj) -> bool:
    """True when a write would change anything the operator owns."""
    return any(old_status.get(k) != v for k, v in new_status.items())
