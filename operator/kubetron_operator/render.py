"""render(): from a MegatronJob and its Plan to the objects the operator applies. Pure.

The output is a ConfigMap holding the trainer config and a Kubeflow PyTorchJob (behind the
small `JobBuilder` interface, so a Trainer v2 TrainJob builder can follow). Same input, same
bytes: dictionaries are built in a fixed order and nothing reads the clock or the cluster.
"""

from __future__ import annotations

from typing import Any, Protocol

import yaml

from kubetron_api.config import MULTI_MODEL_RECIPES, TrainerConfig
from kubetron_api.v1alpha1 import (
    API_VERSION,
    DEFAULT_CPU_PER_PROCESS,
    DEFAULT_MEMORY_PER_PROCESS_MI,
    KIND,
    TRAINER_UID,
    Backend,
    MegatronJob,
    ResourcesSpec,
)
from kubetron_api.wire import (
    ATTEMPT_ENV,
    CONFIG_DIR,
    CONFIG_FILE,
    CONFIG_PATH,
    JOB_NAME_ENV,
    JOB_UID_ENV,
    MASTER_ADDR_ENV,
    MASTER_PORT_ENV,
    METRICS_DIR,
    METRICS_DIR_ENV,
    NODE_RANKS_ENV,
    REPLICA_INDEX_ENV,
)
from kubetron_operator.lifecycle import ATTEMPT_LABEL
from kubetron_operator.plan import Plan
from kubetron_operator.scheduling import Scheduler

Obj = dict[str, Any]

CONTAINER = "pytorch"  # the training-operator requires this container name
MASTER_PORT = 23456
JOB_NAME_LABEL = "kubetron.io/job-name"
# The one replica type rendered: worker 0 holds node rank 0 and the rendezvous, and the
# training-operator gives it the master role (JOB_ROLE_LABEL) and the job's success when every
# worker succeeds. A separate Master would be a pod set of its own, which Kueue cannot slice
# together with workers (scheduling/kueue.py).
WORKER = "Worker"
# Set by the training-operator on every pod it creates.
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
JOB_ROLE_LABEL = "training.kubeflow.org/job-role"  # "master" on worker 0
# The operator restarts the whole group itself (lifecycle.py): the training-operator never
# restarts a single pod, and a failed pod fails the PyTorchJob, which the operator then replaces.
RESTART_POLICY = "Never"
# The container's entry point: the pod launcher running torchrun over the trainer.
LAUNCH_COMMAND = ("python", "-m", "kubetron_trainer.launch")
TRAINER_ARGS = ("-m", "kubetron_trainer", "--config", CONFIG_PATH)


def labels(job: MegatronJob, component: str) -> dict[str, str]:
    """Labels on every object kubetron creates for a job."""
    return {
        "app.kubernetes.io/name": "kubetron",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "kubetron-operator",
        "app.kubernetes.io/part-of": "kubetron",
        JOB_NAME_LABEL: job.name,
    }


def owner_reference(job: MegatronJob) -> Obj:
    """Controller owner reference, so garbage collection deletes children with the job."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": str(job.metadata["uid"]),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(job: MegatronJob, name: str, component: str) -> Obj:
    """Name, namespace, labels and (when the job has a uid) the owner reference."""
    meta: Obj = {"name": name, "namespace": job.namespace, "labels": labels(job, component)}
    if job.metadata.get("uid"):
        meta["ownerReferences"] = [owner_reference(job)]
    return meta


def config_map_name(job: MegatronJob) -> str:
    return f"{job.name}-config"


def config_json(cfg: TrainerConfig) -> str:
    """The trainer config as JSON without what the job does not read: the settings of the
    recipes it does not run, the recipe's optional sections left unset (recipe.eval), and a
    one-model job's empty list of models (the trainer's defaults fill them in), so a one-model
    job's config reads as it did before there were several."""
    exclude: dict[str, Any] = {"recipe": {k: True for k in MULTI_MODEL_RECIPES}}
    exclude["recipe"].pop(cfg.recipe.kind, None)
    exclude["recipe"] |= {name: True for name, value in cfg.recipe if value is None}
    if not cfg.models:
        exclude["models"] = True
    return cfg.model_dump_json(by_alias=True, indent=2, exclude=exclude)


def render_config_map(job: MegatronJob, plan: Plan) -> Obj:
    body = config_json(plan.trainer_config)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(job, config_map_name(job), "config"),
        "data": {CONFIG_FILE: body + "\n"},
    }


class JobBuilder(Protocol):
    """Builds the backend job object: a PyTorchJob, or a TrainJob (render_trainjob.py)."""

    api_version: str
    kind: str

    def build(self, job: MegatronJob, plan: Plan, attempt: int) -> Obj: ...


class PyTorchJobBuilder:
    """Kubeflow training-operator v1 PyTorchJob: `nodes` Workers, worker 0 the rendezvous."""

    api_version = "kubeflow.org/v1"
    kind = "PyTorchJob"

    def build(self, job: MegatronJob, plan: Plan, attempt: int) -> Obj:
        placed = plan.placement.annotations() if plan.placement else {}
        replicas: Obj = {WORKER: self._replica(job, plan, attempt, placed)}
        meta = child_metadata(job, job.name, "trainer")
        meta["labels"][ATTEMPT_LABEL] = str(attempt)
        meta["labels"].update(plan.scheduler.job_labels())
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "metadata": meta,
            "spec": {
                "nprocPerNode": str(plan.procs_per_node),
                "runPolicy": _run_policy(job, plan.scheduler),
                "pytorchReplicaSpecs": replicas,
            },
        }

    def _replica(self, job: MegatronJob, plan: Plan, attempt: int, placed: dict[str, str]) -> Obj:
        res = job.spec.resources
        meta: Obj = {"labels": {**dict(sorted(res.pod_labels.items())), **labels(job, "trainer")}}
        meta["labels"][ATTEMPT_LABEL] = str(attempt)
        annotations = {**res.pod_annotations, **placed}
        if annotations:
            meta["annotations"] = dict(sorted(annotations.items()))
        return {
            "replicas": plan.nodes,
            "restartPolicy": RESTART_POLICY,
            "template": {"metadata": meta, "spec": _pod_spec(job, plan, attempt)},
        }


def created_suspended(job: MegatronJob, scheduler: Scheduler) -> bool:
    """The backend job's suspend: the spec's, or queued (created suspended, and the queue
    un-suspends it when it admits it)."""
    return job.spec.run_policy.suspend or scheduler.queues


def _run_policy(job: MegatronJob, scheduler: Scheduler) -> Obj:
    rp = job.spec.run_policy
    out: Obj = {  # backoffLimit: the operator counts restarts (attempts) itself
        "cleanPodPolicy": rp.clean_pod_policy.value,
        "suspend": created_suspended(job, scheduler),
    }
    if rp.active_deadline_seconds is not None:
        out["activeDeadlineSeconds"] = rp.active_deadline_seconds
    if rp.ttl_seconds_after_finished is not None:
        out["ttlSecondsAfterFinished"] = rp.ttl_seconds_after_finished
    if policy := scheduler.pod_group(job.spec.resources.priority_class_name):
        out["schedulingPolicy"] = policy
    return out


def _pod_spec(job: MegatronJob, plan: Plan, attempt: int) -> Obj:
    res = job.spec.resources
    spec: Obj = {
        "automountServiceAccountToken": False,  # trainers never talk to the API server
        # No Docker-link variables: the namespace's Services (the job's own among them) would
        # add <SERVICE>_PORT=tcp://... variables, and some names collide with real settings.
        "enableServiceLinks": False,
        "securityContext": pod_security_context(res),
        # the launcher forwards SIGTERM to the trainers and waits this long for their save
        "terminationGracePeriodSeconds": job.spec.run_policy.termination_grace_period_seconds,
        "containers": [_container(job, plan, attempt)],
        "volumes": pod_volumes(job),
    }
    optional = {
        "nodeSelector": dict(sorted(res.node_selector.items())) or None,
        "tolerations": list(res.tolerations) or None,
        "affinity": res.affinity,
        "priorityClassName": res.priority_class_name,
        "schedulerName": plan.scheduler.pod_scheduler_name(),
    }
    spec.update({k: v for k, v in optional.items() if v})
    return spec


def _container(job: MegatronJob, plan: Plan, attempt: int) -> Obj:
    res = job.spec.resources
    metrics_port = job.spec.metrics.port
    return {
        "name": CONTAINER,
        "image": res.image,
        "imagePullPolicy": res.image_pull_policy,
        # kubetron_trainer.launch sets PET_NODE_RANK from the pod's replica index and runs
        # torchrun, which reads it with PET_NNODES, PET_NPROC_PER_NODE (the training-operator's)
        # and PET_MASTER_* (ours) and gives each process its own RANK/LOCAL_RANK/WORLD_SIZE; the
        # launcher then exits with the workers' own code (torchrun alone exits 1 for every
        # failure, preemption included).
        "command": list(LAUNCH_COMMAND),
        "args": list(TRAINER_ARGS),
        "env": container_env(job, plan, attempt),
        "ports": [
            {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"},
            {"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"},
        ],
        "resources": container_resources(res),
        "securityContext": container_security_context(res),
        "volumeMounts": volume_mounts(job),
    }


def rendezvous_host(job: MegatronJob) -> str:
    """Worker 0's Service, which the training-operator creates: node rank 0 listens there."""
    return f"{job.name}-{WORKER.lower()}-0"


def container_env(
    job: MegatronJob,
    plan: Plan,
    attempt: int,
    index_field: str = f"metadata.labels['{REPLICA_INDEX_LABEL}']",
    rendezvous: bool = True,
) -> list[Obj]:
    """The trainer container's environment. `index_field`: where the pod reads its index;
    `rendezvous`: whether kubetron sets PET_MASTER_* itself (a backend may set them)."""
    field = {
        "POD_NAME": "metadata.name",
        "NODE_NAME": "spec.nodeName",
        REPLICA_INDEX_ENV: index_field,
    }
    env: list[Obj] = [{"name": JOB_NAME_ENV, "value": job.name}]
    if rendezvous:
        env += [
            {"name": MASTER_ADDR_ENV, "value": rendezvous_host(job)},
            {"name": MASTER_PORT_ENV, "value": str(MASTER_PORT)},
        ]
    env += [
        # pod index -> node rank: each model-parallel group on consecutive pods (kueue.py)
        {"name": NODE_RANKS_ENV, "value": ",".join(map(str, plan.pod_order()))},
        # the trainer fences its checkpoint writes with both (ckpt_meta.claim)
        {"name": ATTEMPT_ENV, "value": str(attempt)},
        {"name": JOB_UID_ENV, "value": str(job.metadata.get("uid", ""))},
        {"name": METRICS_DIR_ENV, "value": METRICS_DIR},
    ]
    env += [
        {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}
        for name, path in field.items()
    ]
    for var in job.spec.resources.env:
        env.append(var.model_dump(by_alias=True, exclude_none=True))
    return env


_MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
                 "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}  # fmt: skip


def quantity_bytes(quantity: str) -> int:
    """Bytes of a memory quantity in the forms the schema admits (MEMORY_QUANTITY)."""
    unit = quantity.lstrip("0123456789.")
    number = quantity[: len(quantity) - len(unit)]
    return int(float(number) * _MEMORY_UNITS.get(unit, 1))


def container_resources(res: ResourcesSpec) -> Obj:
    """Requests (and limits where the spec gives a value). The memory-backed /dev/shm is charged
    to the pod, so the default memory request includes it."""
    limits: Obj = {}
    requests: Obj = {}
    if res.device == "gpu":
        limits[res.gpu_resource] = res.gpus_per_node
    for key, value in (("cpu", res.cpu), ("memory", res.memory)):
        if value:
            limits[key] = requests[key] = value
    if not res.cpu:
        requests["cpu"] = str(DEFAULT_CPU_PER_PROCESS[res.device] * res.gpus_per_node)
    if not res.memory:
        shm_mi = -(-quantity_bytes(res.shared_memory) // 2**20)  # rounded up
        per_process = DEFAULT_MEMORY_PER_PROCESS_MI[res.device]
        requests["memory"] = f"{per_process * res.gpus_per_node + shm_mi}Mi"
    return {"limits": limits, "requests": requests}


def pod_security_context(res: ResourcesSpec) -> Obj:
    """What the restricted Pod Security Standard asks of a pod, unless the spec replaces it."""
    if res.pod_security_context is not None:
        return dict(res.pod_security_context)
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,  # checkpoint volumes writable by the trainer
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(res: ResourcesSpec) -> Obj:
    if res.security_context is not None:
        return dict(res.security_context)
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def pod_volumes(job: MegatronJob) -> list[Obj]:
    res, ckpt = job.spec.resources, job.spec.checkpoint
    volumes: list[Obj] = [
        {"name": "config", "configMap": {"name": config_map_name(job)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shared_memory}},
        {"name": "metrics", "emptyDir": {}},
    ]
    if ckpt.volume is not None:
        claim = {"claimName": ckpt.volume.claim_name, "readOnly": ckpt.volume.read_only}
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": claim})
    return volumes + list(res.volumes)


def volume_mounts(job: MegatronJob) -> list[Obj]:
    ckpt = job.spec.checkpoint
    mounts: list[Obj] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "metrics", "mountPath": METRICS_DIR},
    ]
    if ckpt.volume is not None and ckpt.path:
        mounts.append({"name": "checkpoints", "mountPath": ckpt.path})
    return mounts + list(job.spec.resources.volume_mounts)


def replica_types(pytorch_job: Obj) -> list[str]:
    """The pod sets of a PyTorchJob: ["Worker"] as rendered now; ["Master", "Worker"] (or
    ["Master"]) from earlier kubetron operators."""
    return sorted(pytorch_job.get("spec", {}).get("pytorchReplicaSpecs") or {})


def drifted(desired: object, live: object) -> bool:
    """True when `live` lacks or differs from anything `desired` sets. Fields only the live
    object has (defaults, status, other managers' fields) are not drift; lists must match
    element by element."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return True
        return any(k not in live or drifted(v, live[k]) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            return True
        return any(drifted(d, v) for d, v in zip(desired, live, strict=True))
    return desired != live


def job_backend(job: MegatronJob, default: Backend = Backend.PYTORCHJOB) -> Backend:
    """The job's backend: spec.backend, else the operator's default (--backend)."""
    return job.spec.backend or default


def builder_for(backend: Backend) -> JobBuilder:
    # render_trainjob builds on this module's pod pieces, so it is imported only when asked for
    from kubetron_operator.render_trainjob import TrainJobBuilder

    return TrainJobBuilder() if backend is Backend.TRAINJOB else PyTorchJobBuilder()


def render(
    job: MegatronJob,
    plan: Plan,
    builder: JobBuilder | None = None,
    attempt: int = 1,
    default_backend: Backend = Backend.PYTORCHJOB,
) -> list[Obj]:
    """The ConfigMap and the backend job of `attempt` for a MegatronJob, in apply order; the
    builder of the job's backend unless one is given."""
    builder = builder or builder_for(job_backend(job, default_backend))
    return [render_config_map(job, plan), builder.build(job, plan, attempt)]


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the trainer config) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def to_yaml(objs: list[Obj]) -> str:
    """Rendered objects as a multi-document YAML stream (CLI output, golden files)."""
    return yaml.dump_all(objs, Dumper=_BlockDumper, sort_keys=False, width=100)
