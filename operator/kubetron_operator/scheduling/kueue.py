"""Kueue: what a queued job's PyTorchJob carries, what its Workload says, where its pods go. Pure.

A MegatronJob with `spec.scheduling.queue` (and no `schedulerName: volcano`, whose queue is
Volcano's: `local_queue`) goes through the `Kueue` scheduler (the scheduling seam,
`interface.py`): it renders its PyTorchJob with Kueue's queue label and
creates it suspended; Kueue makes a Workload for it (labelled with the PyTorchJob's uid), reserves
quota in the LocalQueue's ClusterQueue and un-suspends the PyTorchJob when it admits it. From then
on Kueue owns `runPolicy.suspend`: it suspends the job again when it evicts it (preemption, a
deactivation) and un-suspends it on re-admission, so the operator never writes that field after
creation. A user's `spec.runPolicy.suspend` becomes the Workload's `spec.active` (false: Kueue
evicts the job and releases its quota; true again: the job queues again), the way Kueue itself
stops a queued job; setting `suspend` on the PyTorchJob directly would be undone by Kueue, which
starts every admitted job it finds suspended.

Placement (`spec.scheduling.topology`) becomes Kueue's topology-aware-scheduling annotations on
the PyTorchJob's one pod set (Workers only: the training-operator gives worker 0 the master
role, `render.py`). Kueue gives pod i of a pod set rank i in its rank-ordered assignment (the
`training.kubeflow.org/replica-index` label) and fills the domains in order, so a slice of
`podset-slice-size` consecutive pods lands inside one domain of `podset-slice-required-topology`.
The dense grid is [tp, cp, dp, pp] with tp fastest,

    rank = tp + TP*(cp + CP*(dp + DP*pp)),

and torchrun gives local rank l of node n the global rank n*procsPerNode + l, so the
model-parallel group of data-parallel replica d (its tensor x context x pipeline ranks) is on the
pods {rank // procsPerNode}: consecutive when PP or DP is 1, but TP8 x PP2 x DP2 on 8-GPU pods
puts replica 0 on pods 0 and 2. `ParallelDims.pod_order` reorders the node ranks so that the
pods of each group are consecutive pod indices ([0, 2, 1, 3] there); the operator hands that
order to every pod (`KUBETRON_NODE_RANKS`) and the launcher takes its node rank from it by its
replica index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kubetron_api.dims import ParallelDims
from kubetron_api.v1alpha1 import SchedulingSpec, TopologyPolicy
from kubetron_operator.scheduling.interface import (
    TOPOLOGY_FIELD,
    VOLCANO,
    Scheduler,
    asks_placement,
    placement_needs_kueue,
)

Obj = dict[str, Any]

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# On the Workload Kueue creates for a job: the job's uid.
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
REQUIRED_TOPOLOGY = "kueue.x-k8s.io/podset-required-topology"
PREFERRED_TOPOLOGY = "kueue.x-k8s.io/podset-preferred-topology"
# Slices of this many consecutive pods, each inside one domain of the slice level.
SLICE_TOPOLOGY = "kueue.x-k8s.io/podset-slice-required-topology"
SLICE_SIZE = "kueue.x-k8s.io/podset-slice-size"


@dataclass(frozen=True)
class Placement:
    """Every pod inside one domain of `level` (required or preferred), and/or every slice of
    `slice_pods` consecutive pods inside one domain of `slice_level`."""

    level: str | None = None
    policy: TopologyPolicy = TopologyPolicy.REQUIRED
    slice_level: str | None = None
    slice_pods: int = 1

    def annotations(self) -> dict[str, str]:
        """Kueue's annotations for the pod template."""
        out: dict[str, str] = {}
        if self.level:
            required = self.policy == TopologyPolicy.REQUIRED
            out[REQUIRED_TOPOLOGY if required else PREFERRED_TOPOLOGY] = self.level
        if self.slice_level:
            out[SLICE_TOPOLOGY] = self.slice_level
            out[SLICE_SIZE] = str(self.slice_pods)
        return out


def local_queue(scheduling: SchedulingSpec) -> str | None:
    """The Kueue LocalQueue the job goes through: spec.scheduling.queue, unless the pods go to
    Volcano, whose queue it then is."""
    if scheduling.queue and scheduling.scheduler_name != VOLCANO:
        return scheduling.queue
    return None


def placement(
    scheduling: SchedulingSpec, dims: ParallelDims, procs_per_node: int
) -> tuple[Placement | None, list[str]]:
    """The placement `spec.scheduling.topology` asks for, or the problems that prevent it."""
    topo = scheduling.topology
    if topo is None or not asks_placement(topo):
        return None, []
    if not local_queue(scheduling):
        return None, placement_needs_kueue()
    job = Placement(topo.job_level, topo.job_policy) if topo.job_level else None
    mp_level = topo.model_parallel_level
    sets = dims.pod_groups(procs_per_node)
    if mp_level is None or all(len(pods) == 1 for pods in sets):
        return job, []  # every group inside one pod, so inside one node, so inside any level
    if len(sets) == 1:  # the groups together hold every pod
        if job is not None:
            return None, [
                f"{TOPOLOGY_FIELD}: the model-parallel groups ({dims.describe()}) together span "
                f"every pod, so modelParallelLevel ({mp_level}) already places the whole job; "
                f"remove jobLevel ({topo.job_level}) or modelParallelLevel"
            ]
        return Placement(mp_level), []
    # every set has the same size: the rank layout repeats for each data-parallel replica
    return Placement(job.level if job else None, topo.job_policy, mp_level, len(sets[0])), []


# ---------------------------------------------------------------------------- the Workload


def _conditions(workload: Obj | None) -> dict[str, Obj]:
    return {c.get("type", ""): c for c in (workload or {}).get("status", {}).get("conditions", [])}


def is_active(workload: Obj) -> bool:
    """Kueue's `spec.active` (default true); false: deactivated, evicted, not queued."""
    return bool(workload.get("spec", {}).get("active", True))


def waiting(workload: Obj | None, queue: str, job_name: str) -> tuple[str, str]:
    """Why Kueue holds the job, as (reason, message) for the Queued condition."""
    if workload is None:
        return "WaitingForWorkload", (
            f"no Kueue Workload for {job_name}'s backend job yet: Kueue makes one when it runs "
            "with that backend's integration (kubeflow.org/pytorchjob, "
            f"trainer.kubeflow.org/trainjob) (LocalQueue {queue})"
        )
    conds = _conditions(workload)
    evicted = conds.get("Evicted", {})
    if evicted.get("status") == "True":
        return str(evicted.get("reason") or "Evicted"), str(evicted.get("message", ""))
    admitted = conds.get("Admitted", {})
    reserved = conds.get("QuotaReserved", {})
    if reserved.get("status") == "True" and admitted.get("status") != "True":
        return "QuotaReserved", str(
            admitted.get("message") or reserved.get("message") or "waiting for admission checks"
        )
    if admitted.get("status") == "True":
        return "Admitted", str(admitted.get("message") or "admitted; starting")
    reason = str(reserved.get("reason") or "Pending")
    message = str(reserved.get("message") or f"waiting in LocalQueue {queue}")
    return reason, message


def admitted_message(workload: Obj | None) -> str:
    """The Queued=False message once Kueue runs the job."""
    cq = ((workload or {}).get("status", {}).get("admission") or {}).get("clusterQueue")
    return f"admitted by Kueue (ClusterQueue {cq})" if cq else "admitted by Kueue"


def keep_admission(desired: Obj, live: Obj) -> None:
    """Carry into a re-apply of a queued job's PyTorchJob what Kueue owns on the live one:
    `runPolicy.suspend`, and the tolerations it added to the pod templates from its
    ResourceFlavor when it started the job (a list the render sets whole, so an apply without
    them would remove them and Kueue would drop the Workload of a job whose pod sets changed).
    Its other additions (nodeSelector entries, annotations, scheduling gates) are map entries or
    fields the render never sets, which a server-side apply leaves alone."""
    desired["spec"]["runPolicy"]["suspend"] = suspended(live)
    live_replicas = live.get("spec", {}).get("pytorchReplicaSpecs") or {}
    for rtype, replica in desired["spec"]["pytorchReplicaSpecs"].items():
        pod = replica["template"]["spec"]
        live_pod = (live_replicas.get(rtype) or {}).get("template", {}).get("spec", {})
        ours = pod.get("tolerations", [])
        added = [t for t in live_pod.get("tolerations") or [] if t not in ours]
        if added:
            pod["tolerations"] = ours + added


def suspended(pytorch_job: Obj | None) -> bool:
    """Whether the PyTorchJob is suspended (by Kueue, for a queued job)."""
    return bool((pytorch_job or {}).get("spec", {}).get("runPolicy", {}).get("suspend"))


# ---------------------------------------------------------------------------- the seam


class Kueue(Scheduler):
    """A job queued in a Kueue LocalQueue (`spec.scheduling.queue`)."""

    name = "kueue"
    queues: ClassVar[bool] = True

    @property
    def queue(self) -> str:
        return str(self.spec.queue)

    def placement(
        self, dims: ParallelDims, procs_per_node: int
    ) -> tuple[Placement | None, list[str]]:
        return placement(self.spec, dims, procs_per_node)

    def job_labels(self) -> dict[str, str]:
        return {QUEUE_LABEL: self.queue}

    def keep(self, desired: Obj, live: Obj) -> None:
        keep_admission(desired, live)

    def admission_query(self, backend_job: Obj | None) -> tuple[str, str] | None:
        uid = (backend_job or {}).get("metadata", {}).get("uid")
        return ("Workload", f"{JOB_UID_LABEL}={uid}") if uid else None

    def follow_suspend(self, record: Obj, suspended: bool) -> Obj | None:
        active = not suspended
        return None if is_active(record) == active else {"spec": {"active": active}}

    def holds(self, backend_job: Obj | None) -> bool:
        return backend_job is None or suspended(backend_job)

    def waiting(self, record: Obj | None, job_name: str) -> tuple[str, str]:
        return waiting(record, self.queue, job_name)

    def admitted(self, record: Obj | None) -> str | None:
        return admitted_message(record)
