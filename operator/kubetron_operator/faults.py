"""A job's failed attempts and the nodes it avoids, kept in its status. Pure.

Each attempt that ends in failure is counted by cause in `status.failures` (with the latest one:
cause, attempt, pod, node, message, time). A node whose fault ended an attempt (its pod lost
with it, or evicted by its kubelet) goes into `status.avoidedNodes`: every later attempt's pods
get a required node affinity that keeps them off it (`keep_off`). The list lives in the job's
status, so it ends with the job. When no other node fits, the pods stay Pending Unschedulable;
the job waits (no restart is spent) and the condition `NodesAvoided` says why.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from kubetron_operator.lifecycle import Ended

Obj = dict[str, Any]

HOSTNAME_LABEL = "kubernetes.io/hostname"
NODES_AVOIDED = "NodesAvoided"
_MESSAGE_LIMIT = 1024


def record(old_status: Obj, ended: Ended, message: str, attempt: int, now: str) -> Obj:
    """`failures` and `avoidedNodes` once attempt `attempt` ended as `ended` says; the old
    ones when that attempt is already counted (a status written again)."""
    failures: Obj = old_status.get("failures") or {}
    avoided: list[Obj] = list(old_status.get("avoidedNodes") or [])
    out: Obj = {"failures": failures} if failures else {}
    if avoided:
        out["avoidedNodes"] = avoided
    if (failures.get("last") or {}).get("attempt") == attempt:
        return out
    counts = dict(failures.get("counts") or {})
    counts[ended.cause.value] = counts.get(ended.cause.value, 0) + 1
    # pod and node None when no pod ended it: the merge patch removes the last one's
    last: Obj = {"cause": ended.cause.value, "attempt": attempt, "pod": ended.pod,
                 "node": ended.node, "message": message[:_MESSAGE_LIMIT], "time": now}  # fmt: skip
    out["failures"] = {"counts": counts, "last": last}
    if ended.node_fault and ended.node and ended.node not in avoided_nodes(old_status):
        out["avoidedNodes"] = [*avoided, {"node": ended.node, "cause": ended.cause.value,
                                          "since": now}]  # fmt: skip
    return out


def newly_failed(old_status: Obj, new_status: Obj) -> str | None:
    """The cause of the failure `new_status` records and `old_status` did not, if any."""
    new_last = (new_status.get("failures") or {}).get("last") or {}
    old_last = (old_status.get("failures") or {}).get("last") or {}
    return str(new_last["cause"]) if new_last and new_last != old_last else None


def avoided_nodes(status: Obj) -> list[str]:
    return [str(a["node"]) for a in status.get("avoidedNodes") or []]


def keep_off(backend_job: Obj, nodes: list[str]) -> None:
    """Add a required node affinity `kubernetes.io/hostname NotIn nodes` to every pod template
    of a rendered backend job, within the spec's own node affinity (each of its terms)."""
    if not nodes:
        return
    expr = {"key": HOSTNAME_LABEL, "operator": "NotIn", "values": sorted(nodes)}
    for pod_spec in _pod_specs(backend_job):
        affinity = copy.deepcopy(pod_spec.get("affinity") or {})
        node_affinity = affinity.setdefault("nodeAffinity", {})
        required = node_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
        terms = required.get("nodeSelectorTerms") or [{}]
        required["nodeSelectorTerms"] = [
            {**term, "matchExpressions": [*(term.get("matchExpressions") or []), expr]}
            for term in terms
        ]
        pod_spec["affinity"] = affinity


def _pod_specs(obj: object) -> Iterator[Obj]:
    """Every pod spec (a `template.spec` with containers) in a backend job, however nested."""
    if isinstance(obj, dict):
        template = obj.get("template")
        spec = template.get("spec") if isinstance(template, dict) else None
        if isinstance(spec, dict) and "containers" in spec:
            yield spec
            return
        for value in obj.values():
            yield from _pod_specs(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _pod_specs(item)


def waiting_message(unschedulable: list[str], status: Obj) -> str | None:
    """Why the attempt waits when its pods fit no node but the avoided ones; None otherwise."""
    nodes = avoided_nodes(status)
    if not unschedulable or not nodes:
        return None
    return (
        f"pods {', '.join(unschedulable)} are Pending Unschedulable while the job avoids nodes "
        f"{', '.join(nodes)} (status.avoidedNodes: a fault there ended an earlier attempt); "
        "the job waits for another node to fit, spending no restart"
    )
