"""Whole-group restarts: what the pods of the current attempt say, and what to do next. Pure.

A distributed job fails as a whole: when one rank dies the others block in a collective, so
restarting one pod (the training-operator's ExitCode policy) leaves a broken group. kubetron
renders the PyTorchJob with `restartPolicy: Never` and decides here, from the pods labelled with
the current attempt, whether the attempt runs, has finished, must end the job, or must be
replaced by a new attempt of every pod (which resumes from the latest complete checkpoint).

Each end of an attempt has a cause (`FailureCause`, read by `cause_of` from the pod's status,
its conditions and its containers' exit codes), and the cause decides:

- a container OOM-killed at its memory limit (`OOMKilled`), a trainer out of GPU memory
  (`GPUOutOfMemory`, exit 4) or any other exit 1-127 (`PermanentError`: config, environment, a
  bug): the job fails at once, naming the pod, the container, the code and the fix; a restart
  would repeat it and burn the retries;
- a GPU that failed in hardware (`GPUFault`, exit 135), a collective timeout or a lost peer
  (`CollectiveTimeout`, exit 134), a signal (`Signal`,
  128+N), a pod evicted (`Evicted`), preempted (`Preempted`), on a lost node (`NodeLost`),
  deleted or re-created (`PodDeleted`), or a step that has not advanced for
  `progressDeadlineSeconds` while every pod runs (`Hang`): restart.

A node whose fault ended the attempt (`NodeLost`, `GPUFault`, `Evicted` by its kubelet) is
named in the verdict: the controller keeps the next attempts off it. The controller counts the
restarts against `runPolicy.backoffLimit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from kubetron_api.exitcodes import ExitCode, retryable
from kubetron_api.v1alpha1 import FailureCause

Obj = dict[str, Any]

ATTEMPT_LABEL = "kubetron.io/attempt"
# Pods of a replaced attempt get this long after SIGTERM: their group is broken (a peer is dead
# or hung), so no collective save can finish; the checkpoint to resume from is the last one.
RESTART_GRACE_SECONDS = 10

Action = Literal["wait", "run", "restart", "fail", "succeed", "suspend", "queue"]


@dataclass(frozen=True)
class Ended:
    """Why an attempt ended: its cause, the pod and node that ended it (if one did), and
    whether the node was at fault (the next attempts avoid it)."""

    cause: FailureCause
    pod: str | None = None
    node: str | None = None
    node_fault: bool = False


@dataclass(frozen=True)
class Verdict:
    """What the current attempt's state calls for; `reason` is CamelCase, `message` says why,
    `ended` why the attempt ended (a restart or a failure of a pod)."""

    action: Action
    reason: str = ""
    message: str = ""
    ended: Ended | None = None


def attempt_of(obj: Obj | None) -> int | None:
    """The attempt a pod or PyTorchJob belongs to (its label), None when unlabelled."""
    value = ((obj or {}).get("metadata", {}).get("labels") or {}).get(ATTEMPT_LABEL)
    return int(value) if value is not None and str(value).isdigit() else None


# What a restart cannot fix, and the fields that can.
_OOM_KILLED_FIX = (
    "the container reached its memory limit and a restart would repeat it: raise "
    "spec.resources.memory (each pod's memory request and limit), or use less host memory per "
    "process: a smaller spec.recipe.microBatchSize, spec.recipe.recomputeLayers (activation "
    "recompute), more spec.parallelism.pipeline stages"
)
_GPU_OOM_FIX = (
    "the same shape runs out of GPU memory again on a restart: a smaller "
    "spec.recipe.microBatchSize, spec.recipe.recomputeLayers (activation recompute), more "
    "spec.parallelism.pipeline stages or a larger spec.parallelism.tensor"
)
_FIXES = {FailureCause.OOM_KILLED: _OOM_KILLED_FIX, FailureCause.GPU_OUT_OF_MEMORY: _GPU_OOM_FIX}
PERMANENT = frozenset(
    {FailureCause.OOM_KILLED, FailureCause.GPU_OUT_OF_MEMORY, FailureCause.PERMANENT_ERROR}
)


@dataclass(frozen=True)
class ContainerExit:
    pod: str
    container: str
    code: int
    reason: str
    message: str  # the trainer's termination message (what to fix), may be empty
    node: str | None = None  # the pod's spec.nodeName

    @property
    def cause(self) -> FailureCause:
        if self.reason == "OOMKilled":  # the cgroup's limit, whatever the code says
            return FailureCause.OOM_KILLED
        if self.code == ExitCode.OUT_OF_MEMORY:
            return FailureCause.GPU_OUT_OF_MEMORY
        if self.code == ExitCode.COMMUNICATION:
            return FailureCause.COLLECTIVE_TIMEOUT
        if self.code == ExitCode.GPU_FAULT:
            return FailureCause.GPU_FAULT
        return FailureCause.SIGNAL if retryable(self.code) else FailureCause.PERMANENT_ERROR

    @property
    def retryable(self) -> bool:
        return self.cause not in PERMANENT

    def describe(self, limit: int = 300) -> str:
        line = f"pod {self.pod} container {self.container} exited with code {self.code}"
        line += f" ({self.reason})"
        text = " ".join(self.message.split())
        line = f"{line}: {text[:limit]}" if text else line
        fix = _FIXES.get(self.cause)
        return f"{line}; {fix}" if fix else line

    def ended(self) -> Ended:
        return Ended(self.cause, self.pod, self.node, self.cause == FailureCause.GPU_FAULT)


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
                        node=node_of(pod),
                    )
                )
    return out


def node_of(pod: Obj) -> str | None:
    return (pod.get("spec") or {}).get("nodeName") or None


def timestamp(value: str | None) -> datetime | None:
    """An RFC 3339 time of the API (or of `now`), None for None."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


# DisruptionTarget reasons -> (cause, whether the node is at fault). DeletionByTaintManager: a
# NoExecute taint, the node lifecycle controller's for a NotReady or unreachable node;
# DeletionByPodGC: the pod's node is gone; TerminationByKubelet: node pressure.
_DISRUPTIONS = {
    "PreemptionByScheduler": (FailureCause.PREEMPTED, False),
    "PreemptionByKubeScheduler": (FailureCause.PREEMPTED, False),
    "DeletionByTaintManager": (FailureCause.NODE_LOST, True),
    "DeletionByPodGC": (FailureCause.NODE_LOST, True),
    "TerminationByKubelet": (FailureCause.EVICTED, True),
    "EvictionByEvictionAPI": (FailureCause.EVICTED, False),
}
NODE_LOST = "NodeLost"  # the pod reason of a node that stopped reporting (pkg/util/node)


def disruption(pod: Obj) -> tuple[Ended, str] | None:
    """Why the pod was evicted, disrupted or lost with its node, if it was, and how to say it."""
    status, name, node = pod.get("status", {}), pod["metadata"]["name"], node_of(pod)
    if status.get("reason") == "Evicted":  # the kubelet's eviction (node pressure)
        text = f"evicted: {status.get('message', '')}".rstrip(": ")
        return Ended(FailureCause.EVICTED, name, node, node_fault=True), text
    conditions = status.get("conditions", []) or []
    ready: Obj = next((c for c in conditions if c.get("type") == "Ready"), {})
    if NODE_LOST in (status.get("reason"), ready.get("reason")) or status.get("phase") == "Unknown":
        why = ready.get("message") or status.get("message") or "its node stopped reporting"
        text = f"lost with its node {node or '?'}: {why}"
        return Ended(FailureCause.NODE_LOST, name, node, node_fault=True), text
    for cond in conditions:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            reason = str(cond.get("reason", "disrupted"))
            cause, fault = _DISRUPTIONS.get(reason, (FailureCause.EVICTED, False))
            text = f"{reason}: {cond.get('message', '')}".rstrip(": ")
            return Ended(cause, name, node, node_fault=fault), text
    return None


def unschedulable(pods: list[Obj], attempt: int) -> list[str]:
    """The attempt's pods the scheduler found no node for (PodScheduled False, Unschedulable)."""
    return [
        p["metadata"]["name"]
        for p in pods
        if attempt_of(p) == attempt
        and any(
            c.get("type") == "PodScheduled"
            and c.get("status") == "False"
            and c.get("reason") == "Unschedulable"
            for c in p.get("status", {}).get("conditions", []) or []
        )
    ]


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
    if ended := _pods_ended(current, running_since):
        return ended
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
        # a failed pod nobody could see: it is gone
        return Verdict("restart", "ReplicaFailed", message, Ended(FailureCause.POD_DELETED))
    if running_since and len(current) < expected_pods:
        gone = expected_pods - len(current)
        return Verdict("restart", "PodDeleted", f"{gone} of {expected_pods} pods are gone",
                       Ended(FailureCause.POD_DELETED))  # fmt: skip
    if deadline_seconds and running_since:
        stalled, step = _stalled(progress, attempt, running_since, now)
        if stalled > deadline_seconds:
            at = f"step {step}" if step is not None else "the first step"
            return Verdict(
                "restart",
                "ProgressDeadlineExceeded",
                f"{at} has not advanced for {stalled:.0f}s "
                f"(spec.runPolicy.progressDeadlineSeconds={deadline_seconds})",
                Ended(FailureCause.HANG),
            )
    # A pod that exited 0 trained to the end: the attempt runs on until its job says Succeeded
    # (a TrainJob says so only after its Job and JobSet have).
    started = [p for p in current if p.get("status", {}).get("phase") in ("Running", "Succeeded")]
    return Verdict("run" if len(started) >= expected_pods else "wait")


def _pods_ended(current: list[Obj], running_since: str | None) -> Verdict | None:
    """The verdict when a pod of the attempt ended it: a permanent exit fails the job; a
    disruption (evicted, preempted, node lost), a retryable exit, a deleted or re-created pod
    restart the group. None while no pod did."""
    exits = container_exits(current)
    if permanent := [e for e in exits if not e.retryable]:
        message = "; ".join(e.describe() for e in permanent)
        return Verdict("fail", "PodFailed", message, permanent[0].ended())
    for pod in current:  # before the exits: a disruption says why the containers were killed
        if found := disruption(pod):
            ended, why = found
            return Verdict("restart", "PodDisrupted", f"pod {ended.pod} {why}", ended)
    if exits:
        return Verdict("restart", "PodFailed", "; ".join(e.describe() for e in exits),
                       exits[0].ended())  # fmt: skip
    for pod in current:
        name = pod["metadata"]["name"]
        gone = Ended(FailureCause.POD_DELETED, name, node_of(pod))
        if pod["metadata"].get("deletionTimestamp"):
            return Verdict("restart", "PodDeleted", f"pod {name} is being deleted", gone)
        created = timestamp(pod["metadata"].get("creationTimestamp"))
        since = timestamp(running_since)
        if since and created and created > since:
            return Verdict(
                "restart", "PodDeleted", f"pod {name} was deleted and re-created at {created}", gone
            )
    return None


def _stalled(
    progress: Obj | None, attempt: int, running_since: str, now: str
) -> tuple[float, int | None]:
    """Seconds since the step last advanced in this attempt (or since it ran), and the step."""
    mine = progress if progress and progress.get("attempt") == attempt else {}
    last = timestamp(running_since)
    if advanced := timestamp(mine.get("advancedAt")):
        last = max(last, advanced) if last else advanced
    now_t = timestamp(now)
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
