"""The scheduling seam: what the scheduler a job goes through adds to each reconcile step. Pure.

A MegatronJob's pods reach a node through one scheduler, named by `spec.scheduling`: Kueue
(a LocalQueue admits the job as a whole), Volcano (the training-operator makes a PodGroup for
its gang scheduler) or none beyond the pod's own `schedulerName`. The operator asks the
`Scheduler` chosen for the job (`scheduling.choose`), and only it, at every step that depends on
the choice:

- plan: the topology placement the spec asks for, or why it cannot have one;
- render: the backend job's labels, whether it is created suspended, the pod group policy and
  the pods' schedulerName;
- apply: whether the job is created at all yet, and what of the live job a re-apply keeps;
- assess: which record of the job's admission to read (and how it follows a user's suspend),
  whether the scheduler holds the job back and why;
- status: the Queued condition once the job is admitted.

Every method is pure: the controller does the reads and writes they describe. The base class
is the behaviour of a scheduler that neither queues nor places (the default and Volcano);
Kueue overrides the queue's parts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from kubetron_api.v1alpha1 import Phase, SchedulingSpec, TopologySpec

if TYPE_CHECKING:
    from kubetron_api.dims import ParallelDims

Obj = dict[str, Any]


class PodPlacement(Protocol):
    """Where a scheduler puts the job's pods, as the pod template's annotations it reads
    (Kueue's topology-aware placement, `kueue.Placement`, is the one there is)."""

    def annotations(self) -> dict[str, str]: ...


QUEUED = Phase.QUEUED.value  # also the type of the condition while a queue holds the job
TOPOLOGY_FIELD = "spec.scheduling.topology"
# With this schedulerName, spec.scheduling.queue names a Volcano queue (the training-operator's
# PodGroup), not a Kueue LocalQueue.
VOLCANO = "volcano"


def asks_placement(topology: TopologySpec | None) -> bool:
    """Whether the spec asks for a placement (the API server defaults an absent topology to
    {}, which asks for none)."""
    return topology is not None and (
        topology.job_level is not None or topology.model_parallel_level is not None
    )


def placement_needs_kueue() -> list[str]:
    """The problem of a topology on a job that does not go through a Kueue queue."""
    return [
        f"{TOPOLOGY_FIELD} needs a Kueue queue: topology-aware placement is Kueue's; name the "
        "LocalQueue whose ClusterQueue has a ResourceFlavor with a topologyName in "
        f"spec.scheduling.queue (and no spec.scheduling.schedulerName {VOLCANO})"
    ]


@dataclass(frozen=True)
class Scheduler(ABC):
    """One job's scheduler, from its `spec.scheduling`."""

    spec: SchedulingSpec
    # A queue admits the job as a whole: the backend job is created suspended, the queue starts
    # it when it admits it and may suspend it again (eviction, preemption).
    queues: ClassVar[bool] = False

    @property
    @abstractmethod
    def name(self) -> str:
        """The scheduler's short name (logs, messages)."""

    # ------------------------------------------------------------------------ plan

    def placement(
        self, dims: ParallelDims, procs_per_node: int
    ) -> tuple[PodPlacement | None, list[str]]:
        """The placement `spec.scheduling.topology` asks for, or the problems that prevent it:
        only Kueue places."""
        return None, placement_needs_kueue() if asks_placement(self.spec.topology) else []

    # ------------------------------------------------------------------------ render

    def job_labels(self) -> dict[str, str]:
        """Labels on the backend job (PyTorchJob) for the scheduler to find it."""
        return {}

    def pod_group(self, priority_class: str | None) -> Obj:
        """The training-operator's `runPolicy.schedulingPolicy`: with a gang scheduler
        (`--gang-scheduler-name`, Volcano) it becomes the job's PodGroup; without one the
        training-operator ignores it. Empty when the spec sets none of it."""
        policy: Obj = {}
        if self.spec.min_available is not None:
            policy["minAvailable"] = self.spec.min_available
        if self.spec.queue:
            policy["queue"] = self.spec.queue
        if priority_class:
            policy["priorityClass"] = priority_class
        return policy

    def pod_scheduler_name(self) -> str | None:
        """The pods' `schedulerName` (None: the cluster's default scheduler)."""
        return self.spec.scheduler_name

    # ------------------------------------------------------------------------ apply

    def creates(self, suspended: bool) -> bool:
        """Whether the backend job is created now, `suspended` by the user: a queued job
        suspended before it exists is not (it would ask the queue for quota)."""
        return not (self.queues and suspended)

    def keep(self, desired: Obj, live: Obj) -> None:
        """Carry into `desired` (a re-apply of the backend job) what the scheduler owns on the
        live one: nothing, unless it queues."""
        return None

    # ------------------------------------------------------------------------ assess

    def admission_query(self, backend_job: Obj | None) -> tuple[str, str] | None:
        """(kind, label selector) of the scheduler's record of the job's admission, None when
        there is nothing to read."""
        return None

    def follow_suspend(self, record: Obj, suspended: bool) -> Obj | None:
        """The merge patch that makes the admission record follow the user's
        `spec.runPolicy.suspend`, None when it already does."""
        return None

    def holds(self, backend_job: Obj | None) -> bool:
        """Whether the scheduler keeps the backend job from running (not admitted yet, or
        evicted): its stopped pods are no failure of the attempt."""
        return False

    def waiting(self, record: Obj | None, job_name: str) -> tuple[str, str]:
        """Why the scheduler holds the job, as (reason, message) for the Queued condition."""
        return "Pending", f"waiting for the {self.name} scheduler"

    # ------------------------------------------------------------------------ status

    def admitted(self, record: Obj | None) -> str | None:
        """The Queued=False message once the queue runs the job; None without a queue."""
        return None
