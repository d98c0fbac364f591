"""Whole-group restarts: what the pods of the current attempt say, and what to do next. Pure.

A distributed job fails as a whole: when one rank dies the others block in a collective, so
restarting one pod (the training-operator's ExitCode policy) leaves a broken group. kubetron
renders the PyTorchJob with `restartPolicy: Never` and decides here, from the pods labelled with
the current attempt, whether the attempt runs, has finished, must end the job, or must be
replaced by a new attempt of every pod (which resumes from the latest complete checkpoint):

- a container that exited 1-127 (the trainer's permanent codes: config, environment, memory):
  the job fails, naming the pod, the container and the code;
- a container that exited 128 or more (preempted, lost peer, collective timeout, killed), a pod
  evicted or disrupted (its node lost, preempted), deleted, or deleted and re-created: restart;
- the step has not advanced for `progressDeadlineSeconds` while every pod runs: restart.

The controller counts the restarts against `runPolicy.backoffLimit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from kubetron_api.exitcodes import retryable

Obj = dict[str, Any]

ATTEMPT_LABEL = "kubetron.io/attempt"
# Pods of a replaced attempt get this long after SIGTERM: their group is broken (a peer is dead
# or hung), so no collective save can finish; the checkpoint to resume from is the last one.
RESTART_GRACE_SECONDS = 10

Action = Literal["wait", "run", "restart", "fail", "succeed", "suspend", "queue"]


@dataclass(frozen=True)
class Verdict:
    """What the current attempt's state calls for; `reason` is CamelCase, `message` says why."""

    action: Action
    reason: str = ""
    message: str = ""


def attempt_of(obj: Obj | None) -> int | None:
    """The attempt a pod or PyTorchJob belongs to (its label), None when unlabelled."""
    value = ((obj or {}).get("metadata", {}).get("labels") or {}).get(ATTEMPT_LABEL)
    return int(value) if value is not None and str(value).isdigit() else None


@dataclass(frozen=True)
class ContainerExit:
    pod: str
    container: str
    code: int
    reason: str
    message: str  # the trainer's termination message (what to fix), may be empty

    @property
    def retryable(self) -> bool:
        return retryable(self.code)

    def describe(self, limit: int = 300) -> str:
        line = f"pod {self.pod} container {self.container} exited with code {self.code}"
        line += f" ({self.reason})"
        text = " ".join(self.message.split())
        return f"{line}: {text[:limit]}" if text else line


def container_exits(pods: list[Obj]) -> list[ContainerExit]:
    """Every container of `pods` that ended with a non-zero code, in pod-name order."""
    out: list[ContainerExit] = []
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("name", "")):
        for cs in pod.get("status", {}).get("containerStatuses", []) or []:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get(
                "terminated"
            )
            if term and term.get("exitCode", 0) != 0:
                out.append(
                    ContainerExit(
                        pod=pod["metadata"]["name"],
                        container=str(cs.get("name", "?")),
                        code=int(term["exitCode"]),
                        reason=str(term.get("reason") or "Error"),
                        message=str(term.get("message") or ""),
                    )
                )
    return out


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _disruption(pod: Obj) -> str | None:
    """Why the pod was evicted or disrupted (node lost, preemption, eviction API), if it was."""
    status = pod.get("status", {})
    if status.get("reason") == "Evicted":
        return f"evicted: {status.get('message', '')}".rstrip(": ")
    for cond in status.get("conditions", []) or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return f"{cond.get('reason', 'disrupted')}: {cond.get('message', '')}".rstrip(": ")
    return None


def assess(
    *,
    pods: list[Obj],
    pytorch_job: Obj | None,
    attempt: int,
    expected_pods: int,
    running_since: str | None,
    progress: Obj | None,
    deadline_seconds: int | None,
    suspended: bool,
    now: str,
    held: tuple[str, str] | None = None,
) -> Verdict:
    """The verdict on attempt `attempt` from its pods and PyTorchJob (pods of other attempts
    are ignored: the controller removes them). `held`: the queue (Kueue) keeps the job
    suspended, with its (reason, message); the pods it stops are no failures of the attempt."""
    if suspended:
        return Verdict("suspend")
    if held is not None:
        return Verdict("queue", *held)
    current = [p for p in pods if attempt_of(p) == attempt]
    exits = container_exits(current)
    if permanent := [e for e in exits if not e.retryable]:
        return Verdict("fail", "PodFailed", "; ".join(e.describe() for e in permanent))
    if exits:
        return Verdict("restart", "PodFailed", "; ".join(e.describe() for e in exits))
    for pod in current:
        name = pod["metadata"]["name"]
        if why := _disruption(pod):
            return Verdict("restart", "PodDisrupted", f"pod {name} {why}")
        if pod["metadata"].get("deletionTimestamp"):
            return Verdict("restart", "PodDeleted", f"pod {name} is being deleted")
        created = _time(pod["metadata"].get("creationTimestamp"))
        since = _time(running_since)
        if since and created and created > since:
            return Verdict(
                "restart", "PodDeleted", f"pod {name} was deleted and re-created at {created}"
            )
    conditions = {
        c.get("type"): c
        for c in (pytorch_job or {}).get("status", {}).get("conditions", []) or []
        if c.get("status") == "True"
    }
    if "Succeeded" in conditions:
        return Verdict("succeed", "Succeeded", conditions["Succeeded"].get("message", ""))
    if failed := conditions.get("Failed"):
        message = str(failed.get("message", ""))
        if "deadline" in str(failed.get("reason", "")).lower():  # activeDeadlineSeconds
            return Verdict("fail", "DeadlineExceeded", message)
        return Verdict("restart", "ReplicaFailed", message)  # a failed pod nobody could see
    if running_since and len(current) < expected_pods:
        gone = expected_pods - len(current)
        return Verdict("restart", "PodDeleted", f"{gone} of {expected_pods} pods are gone")
    if deadline_seconds and running_since:
        stalled, step = _stalled(progress, attempt, running_since, now)
        if stalled > deadline_seconds:
            at = f"step {step}" if step is not None else "the first step"
            return Verdict(
                "restart",
                "ProgressDeadlineExceeded",
                f"{at} has not advanced for {stalled:.0f}s "
                f"(spec.runPolicy.progressDeadlineSeconds={deadline_seconds})",
            )
    running = [p for p in current if p.get("status", {}).get("phase") == "Running"]
    return Verdict("run" if len(running) >= expected_pods else "wait")


def _stalled(
    progress: Obj | None, attempt: int, running_since: str, now: str
) -> tuple[float, int | None]:
    """Seconds since the step last advanced in this attempt (or since it ran), and the step."""
    mine = progress if progress and progress.get("attempt") == attempt else {}
    last = _time(running_since)
    if advanced := _time(mine.get("advancedAt")):
        last = max(last, advanced) if last else advanced
    now_t = _time(now)
    assert last is not None and now_t is not None
    step = mine.get("step")
    return (now_t - last).total_seconds(), int(step) if step is not None else None


def advanced_at(old: Obj | None, new: Obj | None, attempt: int, now: str) -> str | None:
    """When the step last advanced: now if `new` has a higher step than `old` (or is the
    attempt's first reading), else the old time."""
    if new is None:
        return (old or {}).get("advancedAt")
    same = old is not None and old.get("attempt") == attempt
    if not same or int(new.get("step", 0)) > int(old.get("step", 0)):  # type: ignore[union-attr]
        return now
    return str(old.get("advancedAt") or now)  # type: ignore[union-attr]
