"""Kueue: what a queued job's PyTorchJob carries, what its Workload says, where its pods go. Pure.

A MegatronJob with `spec.scheduling.queue` (and no `schedulerName: volcano`, whose queue is
Volcano's: `local_queue`) renders its PyTorchJob with Kueue's queue label and
creates it suspended; Kueue makes a Workload for it (labelled with the PyTorchJob's uid), reserves
quota in the LocalQueue's ClusterQueue and un-suspends the PyTorchJob when it admits it. From then
on Kueue owns `runPolicy.suspend`: it suspends the job again when it evicts it (preemption, a
deactivation) and un-suspends it on re-admission, so the operator never writes that field after
creation. A user's `spec.runPolicy.suspend` becomes the Workload's `spec.active` (false: Kueue
evicts the job and releases its quota; true again: the job queues again), the way Kueue itself
stops a queued job; setting `suspend` on the PyTorchJob directly would be undone by Kueue, which
starts every admitted job it finds suspended.

Placement (`spec.scheduling.topology`) becomes Kueue's topology-aware-scheduling annotations on
the pod templates. Pod index order is rank order: the training-operator gives the master node
rank 0 and worker i node rank i+1, and torchrun gives the process with local rank l of node n the
global rank n*procsPerNode + l. The dense grid is [tp, cp, dp, pp] with tp fastest,

    rank = tp + TP*(cp + CP*(dp + DP*pp)),

so the model-parallel group of data-parallel replica d (its tensor x context x pipeline ranks) is
{tp + TP*(cp + CP*(d + DP*pp))}: consecutive ranks when PP or DP is 1, and on the pods
{rank // procsPerNode}. Kueue keeps a whole pod set (or, with a pod-set group, the master and the
workers together) inside one domain of a level, and slices of consecutive pods inside one pod
set; a model-parallel group spanning several pods with DP > 1 would need a slice that holds the
master (its own pod set) and the first workers, which Kueue v0.17 cannot express, so that shape
is refused with the alternatives named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetron_api.dims import ParallelDims
from kubetron_api.v1alpha1 import Phase, SchedulingSpec, TopologyPolicy

Obj = dict[str, Any]

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# On the Workload Kueue creates for a job: the job's uid.
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
REQUIRED_TOPOLOGY = "kueue.x-k8s.io/podset-required-topology"
PREFERRED_TOPOLOGY = "kueue.x-k8s.io/podset-preferred-topology"
# Pod sets of one group are placed as a unit (exactly two, one of them a single pod).
POD_SET_GROUP = "kueue.x-k8s.io/podset-group-name"
POD_SET_GROUP_NAME = "kubetron-job"  # Kueue refuses numbers
MASTER, WORKER = "Master", "Worker"
# With this schedulerName, spec.scheduling.queue names a Volcano queue (the training-operator's
# PodGroup), not a Kueue LocalQueue.
VOLCANO = "volcano"
QUEUED = Phase.QUEUED.value  # also the type of the condition while Kueue holds the job
TOPOLOGY_FIELD = "spec.scheduling.topology"


@dataclass(frozen=True)
class Placement:
    """Every pod of the job inside one domain of `level` (required or preferred)."""

    level: str
    policy: TopologyPolicy

    def annotations(self, nodes: int) -> dict[str, dict[str, str]]:
        """Pod-template annotations by replica type (Master, and Worker when nodes > 1)."""
        key = REQUIRED_TOPOLOGY if self.policy == TopologyPolicy.REQUIRED else PREFERRED_TOPOLOGY
        if nodes == 1:
            return {MASTER: {key: self.level}}
        both = {key: self.level, POD_SET_GROUP: POD_SET_GROUP_NAME}
        return {MASTER: dict(both), WORKER: dict(both)}


def local_queue(scheduling: SchedulingSpec) -> str | None:
    """The Kueue LocalQueue the job goes through: spec.scheduling.queue, unless the pods go to
    Volcano, whose queue it then is."""
    if scheduling.queue and scheduling.scheduler_name != VOLCANO:
        return scheduling.queue
    return None


def group_pods(dims: ParallelDims, procs_per_node: int) -> list[list[int]]:
    """The pod indices (node ranks) each data-parallel replica's model-parallel group uses."""
    return [
        sorted({rank // procs_per_node for rank in dims.model_parallel_ranks(d)})
        for d in range(dims.dp)
    ]


def placement(
    scheduling: SchedulingSpec, dims: ParallelDims, procs_per_node: int
) -> tuple[Placement | None, list[str]]:
    """The placement `spec.scheduling.topology` asks for, or the problems that prevent it."""
    topo = scheduling.topology
    if topo is None or (topo.job_level is None and topo.model_parallel_level is None):
        return None, []  # the API server defaults an absent topology to {}
    if not local_queue(scheduling):
        return None, [
            f"{TOPOLOGY_FIELD} needs a Kueue queue: topology-aware placement is Kueue's; name the "
            "LocalQueue whose ClusterQueue has a ResourceFlavor with a topologyName in "
            f"spec.scheduling.queue (and no spec.scheduling.schedulerName {VOLCANO})"
        ]
    job = Placement(topo.job_level, topo.job_policy) if topo.job_level else None
    mp_level = topo.model_parallel_level
    if mp_level is None:
        return job, []
    pods = group_pods(dims, procs_per_node)
    if all(len(p) == 1 for p in pods):
        return job, []  # every group inside one pod, so inside one node, so inside any level
    if dims.dp == 1:  # the group is the whole job
        if job is not None:
            return None, [
                f"{TOPOLOGY_FIELD}: with data parallel 1 the model-parallel group is the whole "
                f"job, so modelParallelLevel ({mp_level}) already places every pod; remove "
                f"jobLevel ({topo.job_level}) or modelParallelLevel"
            ]
        return Placement(mp_level, TopologyPolicy.REQUIRED), []
    return None, [
        f"{TOPOLOGY_FIELD}.modelParallelLevel: each model-parallel group spans {len(pods[0])} "
        f"pods and there are {dims.dp} data-parallel replicas ({dims.describe()}); Kueue places "
        "slices of consecutive pods within one pod set only, and the master pod (node rank 0, "
        "a pod set of its own) belongs to the first group, so no annotation keeps every group "
        "inside one domain. Use jobLevel for the whole job, or a shape whose tensor*context*"
        "pipeline ranks fit in one pod (resources.gpusPerNode)"
    ]


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
            f"no Kueue Workload for PyTorchJob {job_name} yet: Kueue makes one when it runs with "
            f"the kubeflow.org/pytorchjob integration (LocalQueue {queue})"
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
