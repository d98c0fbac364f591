"""The backend seam: how the controller finds, reads and removes a job's backend job. Pure.

A MegatronJob's pods run under a Kubeflow PyTorchJob or a Trainer v2 TrainJob (`spec.backend`,
render.py and render_trainjob.py build them). Everything else -- the whole-group restarts, the
attempts and their fencing, suspend, the queue, the status -- is one code path: the pods of the
attempt decide its fate (lifecycle.py), and the controller reads the backend job through
`BackendJob.view`, which states it in the PyTorchJob's terms: `runPolicy.suspend` and the
conditions Created, Running, Succeeded, Failed and Suspended, with start and completion times.

The operator, not JobSet, restarts a TrainJob's group (the runtime sets JobSet's maxRestarts to
0): deleting the attempt's TrainJob and creating the next one keeps the failure causes, the
avoided nodes, the backoff limit and the checkpoint fencing of the PyTorchJob backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from kubetron_api.v1alpha1 import Backend, MegatronJob
from kubetron_operator.lifecycle import timestamp
from kubetron_operator.render import JOB_NAME_LABEL, JOB_ROLE_LABEL, job_backend
from kubetron_operator.scheduling import Scheduler

Obj = dict[str, Any]

# Set by the Job controller on every pod of an indexed Job: index 0 is node rank 0.
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
TRAINJOB_NODE = "node"  # the runtime's replicated job (render_trainjob.NODE)
TRAINJOB_IMMUTABLE = ("runtimeRef", "trainer", "activeDeadlineSeconds")


@dataclass(frozen=True)
class BackendJob:
    """One kind of backend job: where it lives, how its rank-0 pod is found, how its status
    reads, and who runs its TTL."""

    kind: str
    group: str
    version: str
    plural: str
    rank0_label: str  # `key=value` on the pod of node rank 0
    # the backend's controller deletes it ttlSecondsAfterFinished after it ends; when False the
    # operator does (ttl_expired)
    runs_ttl: bool
    # kinds its controller makes under the job's own name and owns: the next attempt's job is
    # created only once the old attempt's are gone, so it meets none of them
    children: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def rank0_selector(self, job_name: str) -> str:
        return f"{JOB_NAME_LABEL}={job_name},{self.rank0_label}"

    def view(self, live: Obj | None) -> Obj | None:
        """The live job as the controller reads it (the PyTorchJob's terms)."""
        return live

    def keep(self, scheduler: Scheduler, desired: Obj, live: Obj) -> None:
        """Carry into a re-apply what the job's scheduler owns on the live job."""
        scheduler.keep(desired, live)


class _TrainJob(BackendJob):
    """Trainer v2 states Suspended, Complete and Failed; Running is read from its JobSet's
    status (its one replicated job's pods all ready), Created from its existence."""

    def view(self, live: Obj | None) -> Obj | None:
        if live is None:
            return None
        status = live.get("status") or {}
        conds = {c.get("type"): c for c in status.get("conditions") or []}
        suspended = bool(live.get("spec", {}).get("suspend"))
        created = live["metadata"].get("creationTimestamp")
        out: list[Obj] = [{"type": "Created", "status": "True", "reason": "TrainJobCreated",
                           "message": f"TrainJob {live['metadata']['name']} is created",
                           "lastTransitionTime": created}]  # fmt: skip
        ended = None
        for src, dst in (("Complete", "Succeeded"), ("Failed", "Failed")):
            if (c := conds.get(src)) and c.get("status") == "True":
                out.append({**c, "type": dst})
                ended = c.get("lastTransitionTime")
        if c := conds.get("Suspended"):
            out.append(c)
        nodes = {j.get("name"): j for j in status.get("jobsStatus") or []}
        ready = int(nodes.get(TRAINJOB_NODE, {}).get("ready") or 0) > 0
        running = ready and not suspended and ended is None
        # no transition time: the status keeps the old one while this one holds
        state, reason = ("True", "PodsReady") if running else ("False", "PodsNotReady")
        out.append({"type": "Running", "status": state, "reason": reason,
                    "message": "the JobSet's pods are all ready" if running else ""})  # fmt: skip
        view: Obj = {
            "apiVersion": live.get("apiVersion"),
            "kind": live.get("kind"),
            "metadata": live["metadata"],
            "spec": {"runPolicy": {"suspend": suspended}},
            "status": {"conditions": out},
        }
        if ended:
            view["status"]["completionTime"] = ended
        return view

    def keep(self, scheduler: Scheduler, desired: Obj, live: Obj) -> None:
        # Trainer v2 makes these immutable, and stores the trainer's quantities in canonical
        # form (147456Mi as 144Gi): the attempt keeps them as created, the next one has the
        # spec's.
        spec, live_spec = desired["spec"], live.get("spec", {})
        for key in TRAINJOB_IMMUTABLE:
            if key in live_spec:
                spec[key] = live_spec[key]
            else:
                spec.pop(key, None)
        # The runtime patches too: Trainer v2 takes changes only while suspended, and JobSet
        # refuses most of them even then (Kueue v0.17's webhook, built on Trainer v2.2, drops
        # the pod patch's terminationGracePeriodSeconds at creation: restoring it would be such
        # a change); other managers' (Kueue's, which it un-suspends the job with) stay.
        spec["runtimePatches"] = list(live_spec.get("runtimePatches") or [])
        # a queued job's suspend belongs to the queue once created (scheduling/kueue.py)
        if scheduler.queues:
            spec["suspend"] = bool(live_spec.get("suspend"))


PYTORCHJOB = BackendJob("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs",
                        f"{JOB_ROLE_LABEL}=master", runs_ttl=True)  # fmt: skip
# Trainer v2 applies the JobSet of the TrainJob's name: a new attempt's TrainJob would adopt
# the old attempt's failed JobSet while the garbage collector has not yet removed it. The old
# TrainJob is not deleted in the foreground to wait for it: Trainer v2 (v2.3) reconciles a
# TrainJob that is being deleted and applies its JobSet again, as often as the garbage
# collector removes it.
TRAINJOB = _TrainJob("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs",
                     f"{COMPLETION_INDEX_LABEL}=0", runs_ttl=False,
                     children=("JobSet",))  # fmt: skip
BACKENDS = {Backend.PYTORCHJOB: PYTORCHJOB, Backend.TRAINJOB: TRAINJOB}


def backend_of(job: MegatronJob, default: Backend) -> BackendJob:
    """The backend job kind of `job` (spec.backend, else the operator's --backend)."""
    return BACKENDS[job_backend(job, default)]


def ttl_expired(job: MegatronJob, status: Obj, now: str) -> bool:
    """Whether a finished job's backend job has outlived spec.runPolicy.ttlSecondsAfterFinished
    (from the status's completionTime)."""
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    done, now_t = timestamp(status.get("completionTime")), timestamp(now)
    if ttl is None or done is None or now_t is None:
        return False
    return now_t >= done + timedelta(seconds=ttl)
