"""The TrainJob backend: a MegatronJob as a Kubeflow Trainer v2 TrainJob. Pure, like render.py.

With `spec.backend: TrainJob` (or the operator's --backend) the job's pods run under a TrainJob
instead of a PyTorchJob. The TrainJob names kubetron's ClusterTrainingRuntime
(`cluster_training_runtime()`, which the chart ships); Trainer v2 turns the two into a JobSet of
one replicated job, `node`: one indexed Job of `nodes` pods -- the same pods as the PyTorchJob's
workers: one per node, the launcher running torchrun, the config, the restricted security
context, requests and volumes.

Who sets what in the trainer container:
- Trainer v2's torch plugin: PET_NNODES (trainer.numNodes), PET_NPROC_PER_NODE
  (trainer.numProcPerNode), PET_NODE_RANK (the pod's Job completion index), PET_MASTER_ADDR
  (`<job>-node-0-0.<job>`: pod index 0 through the JobSet's headless Service), PET_MASTER_PORT
  (29500), and a container port 29500.
- kubetron: KUBETRON_REPLICA_INDEX (the same completion index) and KUBETRON_NODE_RANKS, from
  which the launcher overrides PET_NODE_RANK (each model-parallel group on consecutive pods),
  the attempt, the job's uid and name, the metrics directory, and the spec's env. torchrun
  gives each process its RANK, LOCAL_RANK and WORLD_SIZE.

A TrainJob carries per job only its trainer (image, command, args, env, nodes, processes,
resources) and `runtimePatches` (pod labels and annotations, volumes, security contexts, node
selector, affinity, tolerations, grace period). What it cannot carry the runtime fixes for every
job: no service-account token or service links, restartPolicy Never, no JobSet restarts (the
operator restarts the whole group itself), the image pull policy and the metrics port; a job
that asks for another of those, a priority class or a pod scheduler is refused (BackendError).
"""

from __future__ import annotations

from kubetron_api.observability import MetricsSpec
from kubetron_api.v1alpha1 import Backend, MegatronJob, ResourcesSpec, RunPolicySpec
from kubetron_operator.lifecycle import ATTEMPT_LABEL
from kubetron_operator.plan import Plan
from kubetron_operator.render import (
    LAUNCH_COMMAND,
    RESTART_POLICY,
    TRAINER_ARGS,
    Obj,
    child_metadata,
    container_env,
    container_resources,
    container_security_context,
    created_suspended,
    job_backend,
    labels,
    pod_security_context,
    pod_volumes,
    volume_mounts,
)

TRAINER_GROUP = "trainer.kubeflow.org"
TRAINER_API_VERSION = f"{TRAINER_GROUP}/v1alpha1"
RUNTIME_KIND = "ClusterTrainingRuntime"
RUNTIME_NAME = "kubetron"
# Trainer v2 puts its torch environment into the container of this name in the replicated job
# of this name that carries the ancestor label `trainer`.
NODE = "node"
ANCESTOR_LABEL = f"{TRAINER_GROUP}/trainjob-ancestor-step"
# Set by the Job controller on every pod of an indexed Job (Trainer v2 reads it too).
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
PATCH_MANAGER = "kubetron.io/operator"  # the owner of the TrainJob's runtime patch
# Fixed by the runtime for every job (a runtime patch cannot set them).
RUNTIME_PULL_POLICY = ResourcesSpec.model_fields["image_pull_policy"].default
RUNTIME_METRICS_PORT = MetricsSpec.model_fields["port"].default
# The runtime's grace period, which a queued job cannot change: Kueue (v0.17, built on Trainer
# v2.2, whose runtime patch has no grace period) drops it from the patch when it updates the
# TrainJob, and JobSet then refuses the changed pod template.
RUNTIME_GRACE_SECONDS = RunPolicySpec.model_fields["termination_grace_period_seconds"].default


class BackendError(ValueError):
    """The job asks for something the TrainJob backend cannot express."""


def refused(job: MegatronJob, plan: Plan, default: Backend) -> list[str]:
    """What keeps the operator from running `job` on its backend: for a TrainJob, what the
    runtime cannot carry (`unsupported`), as an invalid spec rather than a failed render."""
    if job_backend(job, default) is not Backend.TRAINJOB:
        return []
    return [f"spec.backend TrainJob cannot carry {what}" for what in unsupported(job, plan)]


def cluster_training_runtime() -> Obj:
    """kubetron's ClusterTrainingRuntime: what every kubetron TrainJob shares."""
    container: Obj = {
        "name": NODE,
        "imagePullPolicy": RUNTIME_PULL_POLICY,
        "ports": [{"name": "metrics", "containerPort": RUNTIME_METRICS_PORT, "protocol": "TCP"}],
    }
    pod_spec: Obj = {
        "automountServiceAccountToken": False,  # trainers never talk to the API server
        "enableServiceLinks": False,  # no <SERVICE>_PORT variables colliding with settings
        "restartPolicy": RESTART_POLICY,
        "terminationGracePeriodSeconds": RUNTIME_GRACE_SECONDS,
        "containers": [container],
    }
    node: Obj = {
        "name": NODE,
        "template": {
            "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
            # a failed pod fails its Job at once (no replacement pod): the operator restarts
            # the whole group
            "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}},
        },
    }
    return {
        "apiVersion": TRAINER_API_VERSION,
        "kind": RUNTIME_KIND,
        "metadata": {
            "name": RUNTIME_NAME,
            "labels": {"app.kubernetes.io/name": "kubetron", f"{TRAINER_GROUP}/framework": "torch"},
        },
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            # the operator restarts the whole group as a new attempt; JobSet never does
            "template": {"spec": {"failurePolicy": {"maxRestarts": 0}, "replicatedJobs": [node]}},
        },
    }


def unsupported(job: MegatronJob, plan: Plan) -> list[str]:
    """What the job asks for that a TrainJob on kubetron's runtime cannot carry."""
    res = job.spec.resources
    problems = []
    if res.priority_class_name:
        problems.append("resources.priorityClassName (a TrainJob has no pod priority class)")
    if plan.scheduler.pod_scheduler_name():
        problems.append("scheduling.schedulerName (a TrainJob has no pod scheduler name)")
    if res.image_pull_policy != RUNTIME_PULL_POLICY:
        problems.append(
            f"resources.imagePullPolicy other than {RUNTIME_PULL_POLICY} (the runtime's)"
        )
    if job.spec.metrics.port != RUNTIME_METRICS_PORT:
        problems.append(f"metrics.port other than {RUNTIME_METRICS_PORT} (the runtime's)")
    grace = job.spec.run_policy.termination_grace_period_seconds
    if plan.scheduler.queues and grace != RUNTIME_GRACE_SECONDS:
        problems.append(
            f"runPolicy.terminationGracePeriodSeconds other than {RUNTIME_GRACE_SECONDS} (the "
            "runtime's) with a queue (Kueue drops a TrainJob's own)"
        )
    return problems


class TrainJobBuilder:
    """Kubeflow Trainer v2 TrainJob on kubetron's ClusterTrainingRuntime: `nodes` pods of the
    runtime's `node` job, pod index 0 the rendezvous."""

    api_version = TRAINER_API_VERSION
    kind = "TrainJob"

    def build(self, job: MegatronJob, plan: Plan, attempt: int) -> Obj:
        problems = unsupported(job, plan)
        if problems:
            raise BackendError("backend TrainJob cannot carry: " + "; ".join(problems))
        meta = child_metadata(job, job.name, "trainer")
        meta["labels"][ATTEMPT_LABEL] = str(attempt)
        meta["labels"].update(plan.scheduler.job_labels())
        spec: Obj = {
            "runtimeRef": {"name": RUNTIME_NAME, "apiGroup": TRAINER_GROUP, "kind": RUNTIME_KIND},
            "trainer": self._trainer(job, plan, attempt),
            "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {
                "template": {"spec": {"replicatedJobs": [{"name": NODE, "template": {
                    "spec": {"template": self._pod_patch(job, plan, attempt)}}}]}}}}],
            "suspend": created_suspended(job, plan.scheduler),
        }  # fmt: skip
        if job.spec.run_policy.active_deadline_seconds is not None:
            spec["activeDeadlineSeconds"] = job.spec.run_policy.active_deadline_seconds
        return {"apiVersion": self.api_version, "kind": self.kind, "metadata": meta, "spec": spec}

    def _trainer(self, job: MegatronJob, plan: Plan, attempt: int) -> Obj:
        index = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
        return {
            "image": job.spec.resources.image,
            # the launcher sets PET_NODE_RANK from KUBETRON_NODE_RANKS (render.py's container)
            "command": list(LAUNCH_COMMAND),
            "args": list(TRAINER_ARGS),
            "env": container_env(job, plan, attempt, index_field=index, rendezvous=False),
            "numNodes": plan.nodes,
            "numProcPerNode": plan.procs_per_node,
            "resourcesPerNode": container_resources(job.spec.resources),
        }

    def _pod_patch(self, job: MegatronJob, plan: Plan, attempt: int) -> Obj:
        res, rp = job.spec.resources, job.spec.run_policy
        meta: Obj = {"labels": {**dict(sorted(res.pod_labels.items())), **labels(job, "trainer")}}
        meta["labels"][ATTEMPT_LABEL] = str(attempt)
        placed = plan.placement.annotations() if plan.placement else {}
        if annotations := {**res.pod_annotations, **placed}:
            meta["annotations"] = dict(sorted(annotations.items()))
        container = {
            "name": NODE,
            "volumeMounts": volume_mounts(job),
            "securityContext": container_security_context(res),
        }
        spec: Obj = {"securityContext": pod_security_context(res)}
        if not plan.scheduler.queues:  # queued: the runtime's (RUNTIME_GRACE_SECONDS)
            # the launcher forwards SIGTERM to the trainers and waits this long for their save
            spec["terminationGracePeriodSeconds"] = rp.termination_grace_period_seconds
        spec.update({"volumes": pod_volumes(job), "containers": [container]})
        optional = {
            "nodeSelector": dict(sorted(res.node_selector.items())) or None,
            "tolerations": list(res.tolerations) or None,
            "affinity": res.affinity,
        }
        spec.update({k: v for k, v in optional.items() if v})
        return {"metadata": meta, "spec": spec}
