"""MegatronJob, kubetron.io/v1alpha1: the pydantic models that are the one schema source.

The CRD (OpenAPI schema, CEL rules, `kubectl explain` text) is generated from these models by
`kubetron_operator.cli.crd`; the operator parses every object with them; the trainer's part of the
spec is `kubetron_api.config`, embedded here, so all three read one schema.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import Field
from pydantic.config import JsonDict

from kubetron_api.config import (
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    ApiModel,
    CheckpointSpec,
    DataSpec,
    JobModel,
    MetricsSpec,
    ModelSpec,
    ParallelismSpec,
    RecipeSpec,
)
from kubetron_api.observability import ObservabilitySpec

GROUP = "kubetron.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "MegatronJob"
PLURAL = "megatronjobs"
SINGULAR = "megatronjob"
SHORT_NAMES = ("mj",)
CATEGORIES = ("kubetron",)

# Free-form Kubernetes objects (affinity, tolerations, volumes) are kept as-is: the API server
# validates them again when the operator puts them into the PyTorchJob's pod template.
FREE_FORM: JsonDict = {"x-kubernetes-preserve-unknown-fields": True}
K8sObject = dict[str, Any]
# Kubernetes quantities, the forms these fields use: "500m", "4", "1.5"; "512Mi", "16Gi", "1G".
CPU_QUANTITY = r"^[0-9]+(\.[0-9]+)?m?$"
MEMORY_QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"
# Default requests per trainer process (a GPU, or a CPU process with device cpu) when the spec
# names none: room for data loading and host-side buffers, and no limit to throttle them.
DEFAULT_CPU_PER_PROCESS = {"gpu": 4, "cpu": 1}
DEFAULT_MEMORY_PER_PROCESS_MI = {"gpu": 16 * 1024, "cpu": 2 * 1024}
# A checkpoint save of a large model on SIGTERM must fit: an 8B model with a distributed
# optimizer writes about 100 GB, minutes on network storage.
DEFAULT_GRACE_PERIOD_S = 600
# The trainer image's user (Dockerfile: `USER 10001:10001`); tests/chart checks they match.
TRAINER_UID = 10001


class CheckpointVolume(ApiModel):
    """A PersistentVolumeClaim mounted at the checkpoint path in every pod."""

    claim_name: str = Field(
        min_length=1, max_length=253, description="Name of a PersistentVolumeClaim to mount."
    )
    read_only: bool = Field(default=False, description="Mount read-only (resume only).")


class JobCheckpointSpec(CheckpointSpec):
    """Checkpoint settings plus the volume that holds them."""

    volume: CheckpointVolume | None = Field(
        default=None,
        description="Volume mounted at `path`; without it `path` must be on a "
        "volume added through spec.resources.volumes.",
    )


class EnvVar(ApiModel):
    """An extra environment variable for the trainer container."""

    name: str = Field(min_length=1, max_length=256, description="Variable name.")
    value: str | None = Field(default=None, max_length=32768, description="Literal value.")
    value_from: K8sObject | None = Field(
        default=None, json_schema_extra=FREE_FORM, description="A Kubernetes EnvVarSource."
    )


class ResourcesSpec(ApiModel):
    """Where and on what the trainer pods run."""

    nodes: int = Field(default=1, ge=1, le=4096, description="Pods (one per node).")
    gpus_per_node: int = Field(
        default=8,
        ge=1,
        le=64,
        description="GPUs per pod (CPU processes with device cpu); torchrun starts one process "
        "per GPU.",
    )
    image: str = Field(
        default="ghcr.io/kubetron/trainer:0.1.0",
        min_length=1,
        max_length=1024,
        description="Trainer image (built from the Dockerfile's trainer target).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy."
    )
    device: Literal["gpu", "cpu"] = Field(
        default="gpu",
        description="gpu: one process per GPU with NCCL; cpu: gpusPerNode CPU processes with gloo "
        "(tests and sandboxes; needs recipe.precision fp32).",
    )
    gpu_resource: str = Field(
        default="nvidia.com/gpu", max_length=253, description="Extended resource name of a GPU."
    )
    cpu: str | None = Field(
        default=None,
        max_length=32,
        pattern=CPU_QUANTITY,
        description=f"CPU request and limit per pod. Unset: a request of "
        f"{DEFAULT_CPU_PER_PROCESS['gpu']} cores per GPU ({DEFAULT_CPU_PER_PROCESS['cpu']} per "
        "process with device cpu) and no limit.",
    )
    memory: str | None = Field(
        default=None,
        max_length=32,
        pattern=MEMORY_QUANTITY,
        description="Memory request and limit per pod; it must cover sharedMemory, which is "
        f"charged to the pod. Unset: a request of {DEFAULT_MEMORY_PER_PROCESS_MI['gpu']}Mi per "
        f"GPU ({DEFAULT_MEMORY_PER_PROCESS_MI['cpu']}Mi per process with device cpu) plus "
        "sharedMemory, and no limit.",
    )
    shared_memory: str = Field(
        default="16Gi",
        max_length=32,
        pattern=MEMORY_QUANTITY,
        description="Size of the memory-backed /dev/shm.",
    )
    pod_security_context: K8sObject | None = Field(
        default=None,
        json_schema_extra=FREE_FORM,
        description="Pod securityContext (core/v1 PodSecurityContext) replacing the default: "
        f"non-root as the trainer image's user {TRAINER_UID} (fsGroup too, so volumes are "
        "writable) and "
        "the RuntimeDefault seccomp profile, which the restricted Pod Security Standard admits.",
    )
    security_context: K8sObject | None = Field(
        default=None,
        json_schema_extra=FREE_FORM,
        description="Trainer container securityContext (core/v1 SecurityContext) replacing the "
        "default: no privilege escalation, all capabilities dropped.",
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels on the trainer pods."
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra annotations on the trainer pods."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[K8sObject] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"items": {"type": "object", **FREE_FORM}},
        description="Pod tolerations (core/v1 Toleration).",
    )
    affinity: K8sObject | None = Field(
        default=None, json_schema_extra=FREE_FORM, description="Pod affinity (core/v1 Affinity)."
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass of the pods."
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=256, description="Extra environment variables."
    )
    volumes: list[K8sObject] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"items": {"type": "object", **FREE_FORM}},
        description="Extra pod volumes (core/v1 Volume).",
    )
    volume_mounts: list[K8sObject] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"items": {"type": "object", **FREE_FORM}},
        description="Extra mounts in the trainer container (core/v1 VolumeMount).",
    )

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


# A Kubernetes label key (optional DNS-subdomain prefix, then a name): the topology levels.
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


class TopologyPolicy(StrEnum):
    REQUIRED = "Required"
    PREFERRED = "Preferred"


class TopologySpec(ApiModel):
    """Placement by Kueue's topology-aware scheduling, derived from the parallel shape. Each
    level is a node label key that names a level of the Kueue Topology of the queue's
    ResourceFlavor (for example a rack or block label, or kubernetes.io/hostname)."""

    job_level: str | None = Field(
        default=None,
        max_length=317,
        pattern=LABEL_KEY,
        description="Every pod of the job inside one domain of this level.",
    )
    job_policy: TopologyPolicy = Field(
        default=TopologyPolicy.REQUIRED,
        description="Required: the job waits until one domain of jobLevel has room. "
        "Preferred: Kueue tries jobLevel, then the levels above it, then spreads the pods.",
    )
    model_parallel_level: str | None = Field(
        default=None,
        max_length=317,
        pattern=LABEL_KEY,
        description="The pods of each model-parallel group (the tensor x context x pipeline "
        "ranks of one data-parallel replica) inside one domain of this level: Kueue slices of "
        "consecutive pods, the pods ordered so that each slice holds whole groups. A group "
        "inside one pod needs nothing more; groups that together span every pod make this the "
        "job's required level.",
    )


class SchedulingSpec(ApiModel):
    """Queueing and gang scheduling."""

    queue: str | None = Field(
        default=None,
        max_length=63,
        description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name; the PyTorchJob is created "
        "suspended and Kueue starts it when it admits it); with schedulerName volcano, the "
        "Volcano queue of the job's PodGroup instead.",
    )
    scheduler_name: str | None = Field(
        default=None, max_length=253, description="Pod scheduler, e.g. volcano."
    )
    min_available: int | None = Field(
        default=None, ge=1, description="Gang size: pods that must start together."
    )
    topology: TopologySpec | None = Field(
        default=None,
        description="Topology-aware placement through Kueue (needs queue).",
    )


class Backend(StrEnum):
    """The Kubeflow job kind a MegatronJob's pods run under."""

    PYTORCHJOB = "PyTorchJob"  # Kubeflow training-operator v1
    TRAINJOB = "TrainJob"  # Kubeflow Trainer v2 (JobSet), on kubetron's ClusterTrainingRuntime


class CleanPodPolicy(StrEnum):
    NONE = "None"
    RUNNING = "Running"
    ALL = "All"


class RunPolicySpec(ApiModel):
    """Lifecycle of the PyTorchJob; only `suspend` may change after creation."""

    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="Whole-group restarts before the job fails: when a trainer pod fails with a "
        "retryable exit code (128 or more), is deleted or evicted, or the progress deadline "
        "passes, the operator restarts every pod as a new attempt that resumes from the latest "
        "checkpoint. A permanent exit code (1-127) or a container OOM-killed at its memory "
        "limit fails the job at once, spending no restart; after a node fault (lost, or "
        "evicted by its kubelet) the next attempts avoid that node (status.avoidedNodes).",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Wall-clock limit of the job."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the PyTorchJob this long after it finishes."
    )
    suspend: bool = Field(
        default=False,
        description="Suspend (delete pods) or resume the job. With a Kueue queue the operator "
        "deactivates the job's Workload instead (spec.active false: Kueue evicts the job and "
        "releases its quota) and reactivates it on resume (the job queues again).",
    )
    clean_pod_policy: CleanPodPolicy = Field(
        default=CleanPodPolicy.NONE, description="Pods to delete when the job finishes."
    )
    collective_timeout_seconds: int = Field(
        default=DEFAULT_COLLECTIVE_TIMEOUT_S,
        ge=10,
        le=86400,
        description="How long a collective may wait for a peer (every process group's timeout): "
        "a lost or hung rank then ends the attempt with a retryable exit code instead of "
        "leaving the others waiting for ever.",
    )
    progress_deadline_seconds: int | None = Field(
        default=None,
        ge=30,
        le=604800,
        description="Restart the group when the training step has not advanced for this long "
        "while every pod runs (a hang outside collectives, a stopped rank). Counted from the "
        "attempt's start, so it must cover model building and the first step; needs the "
        "operator's progress reads (--progress-period > 0). Unset: no deadline.",
    )
    termination_grace_period_seconds: int = Field(
        default=DEFAULT_GRACE_PERIOD_S,
        ge=30,
        le=86400,
        description="Time the pods get after SIGTERM (preemption, deletion, suspend) to save a "
        "checkpoint and exit; the pod launcher gives the trainers all of it.",
    )


class MegatronJobSpec(ApiModel):
    """A Megatron-Core training job: model, recipe, parallel shape and resources."""

    model: ModelSpec | None = Field(
        default=None,
        description="The model: preset, overrides and weights (a job of one model; "
        "spec.models for several).",
    )
    models: list[JobModel] | None = Field(
        default=None,
        min_length=2,
        max_length=8,
        description="Several models, each with its own parallel shape and ranks (recipe.kind "
        "dpo: a trainable policy and a frozen reference; distill: a trainable student and a "
        "frozen teacher). Instead of spec.model and spec.parallelism.",
    )
    recipe: RecipeSpec = Field(default_factory=RecipeSpec, description="Training recipe.")
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec, description="Parallel shape; data parallel is derived."
    )
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")
    checkpoint: JobCheckpointSpec = Field(
        default_factory=JobCheckpointSpec, description="Checkpointing."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Pods, GPUs, image and placement."
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec, description="Queue and gang scheduling."
    )
    run_policy: RunPolicySpec = Field(
        default_factory=RunPolicySpec, description="Retries, deadlines, suspend."
    )
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="Trainer metrics.")
    observability: ObservabilitySpec = Field(
        default_factory=ObservabilitySpec, description="TensorBoard event files (opt-in)."
    )
    backend: Backend | None = Field(
        default=None,
        description="The Kubeflow job the pods run under: PyTorchJob (training-operator v1) or "
        "TrainJob (Kubeflow Trainer v2 with JobSet, on the ClusterTrainingRuntime the chart "
        "ships). Unset: the operator's --backend (chart value `backend`). Fixed once created.",
    )

    def job_models(self) -> list[JobModel]:
        """Every model of the job: spec.models, or spec.model and spec.parallelism as the one
        trainable model (named `model`) on every rank."""
        if self.models is not None:
            return list(self.models)
        if self.model is None:
            return []
        return [
            JobModel.model_validate(
                {**self.model.model_dump(), "name": "model", "parallelism": self.parallelism}
            )
        ]


class Phase(StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class Condition(ApiModel):
    """A standard Kubernetes condition."""

    type: str = Field(max_length=316, description="Condition type, e.g. Valid, Running.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=1024, description="CamelCase reason.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: str | None = Field(
        default=None, description="When the status last changed (RFC 3339)."
    )


class ResolvedParallelism(ApiModel):
    """The parallel degrees the job runs with, data parallel included."""

    tensor: int = Field(description="Tensor-parallel degree.")
    pipeline: int = Field(description="Pipeline stages.")
    virtual_pipeline: int = Field(description="Model chunks per stage.")
    context: int = Field(description="Context-parallel degree.")
    expert: int = Field(description="Expert-parallel degree.")
    expert_tensor: int = Field(description="Expert tensor-parallel degree.")
    data: int = Field(description="Data-parallel degree (derived).")


class ModelStatus(ApiModel):
    """One model of a job of several (spec.models) as it runs."""

    name: str = Field(description="The model's name (spec.models[].name).")
    trainable: bool = Field(description="Trained (true) or frozen (false).")
    ranks: str = Field(description="Its global ranks, first-last.")
    parallelism: ResolvedParallelism = Field(description="Its resolved shape over its ranks.")


class Progress(ApiModel):
    """What global rank 0 last reported (its metrics endpoint, read by the operator)."""

    step: int = Field(description="Last completed optimizer step.")
    total_steps: int = Field(description="Steps the recipe runs (recipe.trainIters).")
    loss: str | None = Field(default=None, description="Loss of the last step.")
    validation_loss: str | None = Field(
        default=None,
        description="Loss on the validation split at the last evaluation (recipe.eval).",
    )
    tokens_per_second: int | None = Field(default=None, description="Throughput, whole job.")
    mfu: str | None = Field(default=None, description="Model FLOPs utilisation (GPU jobs).")
    eta_seconds: int | None = Field(
        default=None, description="Remaining steps times the mean step time so far."
    )
    last_checkpoint_step: int | None = Field(
        default=None, description="Step of the last complete checkpoint."
    )
    attempt: int | None = Field(default=None, description="Attempt that reported it.")
    engine: str | None = Field(
        default=None,
        max_length=128,
        description="What runs the layers: transformer-engine, fast path (its pieces) or "
        "local spec (recipe.fastPath decides; the trainer logs it too).",
    )
    observed_at: str = Field(description="When the operator read it.")
    advanced_at: str | None = Field(
        default=None, description="When the step last advanced (the progress deadline's clock)."
    )
    checkpointed_at: str | None = Field(
        default=None,
        description="When the operator first saw lastCheckpointStep at its value (the lost "
        "time of a failed attempt counts from it).",
    )


class FailureCause(StrEnum):
    """Why an attempt ended (`kubetron_operator.lifecycle` reads it from the pods)."""

    OOM_KILLED = "OOMKilled"  # a container hit its memory limit: a retry repeats it
    GPU_OUT_OF_MEMORY = "GPUOutOfMemory"  # the trainer ran out of GPU memory (exit 4)
    EVICTED = "Evicted"  # the kubelet (node pressure) or the eviction API evicted a pod
    PREEMPTED = "Preempted"  # the scheduler preempted a pod for a higher-priority one
    NODE_LOST = "NodeLost"  # a pod's node went NotReady or away
    COLLECTIVE_TIMEOUT = "CollectiveTimeout"  # a collective timed out, a peer vanished (134)
    GPU_FAULT = "GPUFault"  # the GPU failed in hardware: uncorrectable ECC, off the bus (135)
    HANG = "Hang"  # the step did not advance for spec.runPolicy.progressDeadlineSeconds
    PERMANENT_ERROR = "PermanentError"  # any other exit 1-127: config, environment, a bug
    SIGNAL = "Signal"  # killed by a signal (exit 128+N)
    POD_DELETED = "PodDeleted"  # a pod deleted, re-created or gone


class Failure(ApiModel):
    """One attempt's end: its cause and where it happened."""

    cause: FailureCause = Field(description="Why the attempt ended.")
    attempt: int = Field(description="The attempt that ended.")
    pod: str | None = Field(default=None, description="The pod that ended it, if one did.")
    node: str | None = Field(default=None, description="That pod's node (spec.nodeName).")
    message: str = Field(default="", max_length=32768, description="What happened.")
    time: str = Field(description="When the operator saw it (RFC 3339).")


class Failures(ApiModel):
    """Every attempt that ended in failure over the job's life."""

    counts: dict[str, int] = Field(
        default_factory=dict, description="Failed attempts by cause (FailureCause)."
    )
    last: Failure | None = Field(default=None, description="The latest failure.")


class AvoidedNode(ApiModel):
    """A node whose fault ended an attempt: the next attempts' pods are kept off it."""

    node: str = Field(description="The node's name (kubernetes.io/hostname).")
    cause: FailureCause = Field(description="The fault seen on it.")
    since: str = Field(description="When the operator saw the fault (RFC 3339).")


class Goodput(ApiModel):
    """Time lost to failures, and the share of the job's wall time that trained.

    Lost time: for each attempt that ended in failure, from its last checkpoint (or from when
    its pods all ran, if it saved none) until every pod of the next attempt runs: the steps
    it must redo plus the restart. Wall time: since every pod of the first attempt ran."""

    since: str | None = Field(
        default=None, description="When every pod of the first attempt ran (wall time's start)."
    )
    lost_seconds: int = Field(default=0, description="Lost time of the closed restarts.")
    lost_since: str | None = Field(
        default=None, description="Start of the lost time still open (a restart under way)."
    )
    ratio: str | None = Field(
        default=None, description="(wall time - lost time) / wall time at the last reading."
    )


class MegatronJobStatus(ApiModel):
    """Observed state, written by the operator."""

    phase: Phase | None = Field(default=None, description="Summary phase.")
    conditions: list[Condition] = Field(
        default_factory=list, max_length=32, description="Conditions."
    )
    observed_generation: int | None = Field(
        default=None, description="Generation of the spec this status describes."
    )
    world_size: int | None = Field(default=None, description="Trainer processes in total.")
    parallelism: ResolvedParallelism | None = Field(
        default=None, description="Resolved shape (of the trainable model with spec.models)."
    )
    models: list[ModelStatus] | None = Field(
        default=None,
        max_length=8,
        description="Each model of spec.models, in spec order: its ranks and resolved shape.",
    )
    pytorch_job: str | None = Field(default=None, description="Name of the PyTorchJob.")
    start_time: str | None = Field(default=None, description="When the job started running.")
    completion_time: str | None = Field(default=None, description="When the job finished.")
    progress: Progress | None = Field(
        default=None, description="Live progress, read from global rank 0 while running."
    )
    attempt: int | None = Field(
        default=None,
        description="The current attempt: 1 for the first run of the pods, one more for each "
        "whole-group restart.",
    )
    restarts: int | None = Field(
        default=None, description="Whole-group restarts so far (at most runPolicy.backoffLimit)."
    )
    running_since: str | None = Field(
        default=None, description="When every pod of the current attempt was first seen running."
    )
    failures: Failures | None = Field(
        default=None, description="Failed attempts by cause, and the latest one."
    )
    avoided_nodes: list[AvoidedNode] | None = Field(
        default=None,
        max_length=256,
        description="Nodes whose fault ended an attempt (node lost, a GPU fault, evicted by its "
        "kubelet): "
        "the pods of later attempts get a required node affinity keeping them off these.",
    )
    goodput: Goodput | None = Field(
        default=None, description="Time lost to failures and the share that trained."
    )


class MegatronJob(ApiModel):
    """The whole object as the API server stores it."""

    api_version: Literal["kubetron.io/v1alpha1"] = Field(
        default="kubetron.io/v1alpha1", alias="apiVersion", description="kubetron.io/v1alpha1"
    )
    kind: Literal["MegatronJob"] = Field(default="MegatronJob", description="MegatronJob")
    metadata: K8sObject = Field(default_factory=dict, description="Standard object metadata.")
    spec: MegatronJobSpec = Field(description="Desired state.")
    status: MegatronJobStatus | None = Field(default=None, description="Observed state.")

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace") or "default")
