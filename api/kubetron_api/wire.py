"""The wire between the operator and the trainer: every name one side writes and the other reads.

The operator renders pods whose environment and mounted files the trainer reads, and reads the
trainer's metrics back into `status.progress`. Each of those names is written here once and both
sides import it, so neither can rename its half alone. Exit codes are the same kind of
agreement and live in `exitcodes`. Torch-free, like the rest of the contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kubetron_api.config import FAST_PATH_PIECES

# --------------------------------------------------------------------------- environment

JOB_NAME_ENV = "KUBETRON_JOB_NAME"
# torchrun's rendezvous (worker 0's Service and port); PET_NNODES and PET_NPROC_PER_NODE come
# from the training-operator, PET_NODE_RANK from the launcher (below).
MASTER_ADDR_ENV = "PET_MASTER_ADDR"
MASTER_PORT_ENV = "PET_MASTER_PORT"
# Each pod's replica index and the node rank of every index (`ParallelDims.pod_order`,
# comma-separated); kubetron_trainer.launch sets torchrun's PET_NODE_RANK from the two.
REPLICA_INDEX_ENV = "KUBETRON_REPLICA_INDEX"
NODE_RANKS_ENV = "KUBETRON_NODE_RANKS"
# The attempt a pod belongs to and the job's uid: the trainer fences its checkpoint writes with
# both (`ckpt_meta.Attempt`).
ATTEMPT_ENV = "KUBETRON_ATTEMPT"
JOB_UID_ENV = "KUBETRON_JOB_UID"
# prometheus-client's own variable: the directory where every rank of a pod writes its values.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# --------------------------------------------------------------------------- files

CONFIG_DIR = "/etc/kubetron"  # the job's ConfigMap, mounted read-only
CONFIG_FILE = "config.json"  # the `TrainerConfig` as JSON, the ConfigMap's one key
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
METRICS_DIR = "/tmp/kubetron-metrics"  # an emptyDir, the value of METRICS_DIR_ENV

# --------------------------------------------------------------------------- metrics

JOB_LABEL = "job"
RANK_LABEL = "rank"
ENGINE_LABEL = "engine"
MODEL_LABEL = "model"  # a model of a multi-model job (spec.models[].name)

MetricKind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class Metric:
    """One metric family a trainer pod serves (docs/metrics.md describes each)."""

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = (JOB_LABEL,)

    def sample(self, suffix: str) -> str:
        """The name of one of a histogram's series (`_sum`, `_count`) as the parser reads it."""
        return self.name + suffix


STEP = Metric("kubetron_train_step", "gauge", "Last completed optimizer step.")
LOSS = Metric(
    "kubetron_train_loss",
    "gauge",
    "Loss of the last step: the language-model loss, or the recipe's (DPO, distillation).",
)
TOKENS_PER_SECOND = Metric(
    "kubetron_train_tokens_per_second", "gauge", "Throughput of the last step, whole job."
)
MODEL_TFLOPS = Metric(
    "kubetron_train_model_tflops_per_gpu", "gauge", "Model TFLOP/s per GPU (Megatron's formula)."
)
MFU = Metric(
    "kubetron_train_mfu_ratio",
    "gauge",
    "Model FLOPs utilisation against the GPU's dense bf16 peak (fp8 runs too, so the two compare).",
)
GRAD_NORM = Metric("kubetron_train_grad_norm", "gauge", "Gradient norm before clipping.")
VALIDATION_LOSS = Metric(
    "kubetron_train_validation_loss",
    "gauge",
    "Loss on the validation split at the last evaluation (recipe.eval): the language-model "
    "loss over every loss token the evaluation scored.",
)
LEARNING_RATE = Metric("kubetron_train_learning_rate", "gauge", "Learning rate of the last step.")
LAST_CHECKPOINT_STEP = Metric(
    "kubetron_checkpoint_last_step", "gauge", "Step of the last complete checkpoint."
)
ATTEMPT = Metric(
    "kubetron_train_attempt",
    "gauge",
    "The operator's attempt these pods belong to (0 outside the operator); a whole-group "
    "restart starts the next.",
)
ENGINE_INFO = Metric(
    "kubetron_train_engine_info",
    "gauge",
    "1, labelled with what runs the layers: transformer-engine, fast path (pieces) or local spec.",
    (JOB_LABEL, ENGINE_LABEL),
)
GPU_MEMORY_ALLOCATED = Metric(
    "kubetron_gpu_memory_allocated_bytes",
    "gauge",
    "torch.cuda.memory_allocated",
    (JOB_LABEL, RANK_LABEL),
)
GPU_MEMORY_RESERVED = Metric(
    "kubetron_gpu_memory_reserved_bytes",
    "gauge",
    "torch.cuda.memory_reserved",
    (JOB_LABEL, RANK_LABEL),
)
TOKENS = Metric("kubetron_train_tokens", "counter", "Tokens trained on.")
STEP_DURATION = Metric(
    "kubetron_train_step_duration_seconds", "histogram", "Wall time of one optimizer step."
)
SAVE_DURATION = Metric(
    "kubetron_checkpoint_save_duration_seconds", "histogram", "Time to save one checkpoint."
)
DATA_WAIT = Metric("kubetron_data_wait_seconds", "histogram", "Time waiting for the next batch.")

# Several models in one job: each model's share of a step, and the recipes' own numbers (the
# keys are the names the trainer's recipes report them by).
MODEL_TOKENS_PER_SECOND = Metric(
    "kubetron_train_model_tokens_per_second",
    "gauge",
    "Tokens of the last step over the time this pod's first rank spent in the model (a frozen "
    "model's forward passes; the trained model's forward, backward and update).",
    (JOB_LABEL, MODEL_LABEL),
)
MODEL_PARAMETER_BYTES = Metric(
    "kubetron_train_model_parameter_bytes",
    "gauge",
    "Bytes of the model's parameters held by the rank (its shard in its own parallel shape).",
    (JOB_LABEL, RANK_LABEL, MODEL_LABEL),
)
RECIPE_METRICS: dict[str, Metric] = {
    "chosen_reward": Metric(
        "kubetron_train_dpo_chosen_reward",
        "gauge",
        "DPO: mean reward of the chosen responses (beta times the policy's log-probability "
        "ratio to the reference), last step.",
    ),
    "rejected_reward": Metric(
        "kubetron_train_dpo_rejected_reward",
        "gauge",
        "DPO: mean reward of the rejected responses, last step.",
    ),
    "reward_margin": Metric(
        "kubetron_train_dpo_reward_margin",
        "gauge",
        "DPO: mean chosen minus rejected reward, last step.",
    ),
    "reward_accuracy": Metric(
        "kubetron_train_dpo_reward_accuracy",
        "gauge",
        "DPO: fraction of pairs whose chosen reward exceeds the rejected one, last step.",
    ),
    "distill_kl": Metric(
        "kubetron_train_distill_kl",
        "gauge",
        "Distillation: KL divergence of the student's from the teacher's token distribution "
        "at the recipe's temperature (times its square), mean over loss tokens, last step.",
    ),
    "distill_lm_loss": Metric(
        "kubetron_train_distill_lm_loss",
        "gauge",
        "Distillation: the student's language-model loss on the data's labels, last step.",
    ),
}

# --------------------------------------------------------------------------- the engine

EngineKind = Literal["transformer-engine", "fast-path", "local"]
# The fast path's label lists this after its pieces when its linear layers run fp8 GEMMs
# (recipe.precision fp8); it is no recipe.fastPath piece: the precision asks for it.
FP8_PIECE = "fp8"
_LABEL_PIECES = (*FAST_PATH_PIECES, FP8_PIECE)
_FAST_PREFIX, _FAST_SUFFIX = "fast path (", ")"
_LABELS: dict[EngineKind, str] = {"transformer-engine": "transformer-engine", "local": "local spec"}


@dataclass(frozen=True)
class LayerEngine:
    """What runs the transformer layers: Transformer Engine, the fast path with its pieces (the
    ones that applied, in `FAST_PATH_PIECES` order, then `fp8` when its GEMMs run in fp8), or
    Megatron's local spec without fused kernels. The trainer exports it as ENGINE_INFO's
    label; the operator shows that label in `status.progress.engine`."""

    kind: EngineKind
    pieces: tuple[str, ...] = ()

    def to_label(self) -> str:
        """`transformer-engine`, `fast path (ce+norm+...)`, `fast path (ce+...+fp8)` or
        `local spec`."""
        if self.kind == "fast-path":
            return _FAST_PREFIX + "+".join(self.pieces) + _FAST_SUFFIX
        return _LABELS[self.kind]

    @classmethod
    def from_label(cls, label: str) -> LayerEngine:
        """The engine a label names; ValueError for anything `to_label` does not write."""
        for kind, text in _LABELS.items():
            if label == text:
                return cls(kind)
        if label.startswith(_FAST_PREFIX) and label.endswith(_FAST_SUFFIX):
            pieces = tuple(label[len(_FAST_PREFIX) : -len(_FAST_SUFFIX)].split("+"))
            if pieces and all(p in _LABEL_PIECES for p in pieces):
                return cls("fast-path", pieces)
        raise ValueError(f"{label!r} names no engine")
