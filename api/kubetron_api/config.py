"""The trainer's configuration: pydantic models shared by the operator, the CRD and the trainer.

This module imports no torch, so the operator image can embed these models in the MegatronJob
API. The operator writes a `TrainerConfig` as JSON into a ConfigMap; the trainer reads the same
model back. Field names are camelCase on the wire (Kubernetes style) and snake_case in Python.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, model_validator

from kubetron_api.base import ApiModel
from kubetron_api.observability import MetricsSpec, ObservabilitySpec

# --------------------------------------------------------------------------- model architecture


class ModelArch(ApiModel):
    """The architecture numbers Megatron-Core's TransformerConfig needs for a GPT model."""

    num_layers: int = Field(ge=1, description="Number of transformer layers.")
    hidden_size: int = Field(ge=1, description="Hidden size (model width).")
    ffn_hidden_size: int = Field(ge=1, description="Hidden size of the MLP of a dense layer.")
    num_attention_heads: int = Field(ge=1, description="Number of query heads.")
    num_query_groups: int = Field(
        ge=1, description="Number of key/value heads (grouped-query attention)."
    )
    kv_channels: int = Field(ge=1, description="Size of one attention head.")
    vocab_size: int = Field(ge=1, description="Vocabulary size before padding.")
    max_position_embeddings: int = Field(ge=1, description="Longest sequence the model supports.")
    swiglu: bool = Field(default=True, description="SwiGLU MLP (else GELU).")
    normalization: Literal["RMSNorm", "LayerNorm"] = Field(
        default="RMSNorm", description="Normalization layer."
    )
    qk_layernorm: bool = Field(default=False, description="Normalize queries and keys (Qwen3).")
    untie_embeddings: bool = Field(
        default=False, description="Separate output layer weights instead of tied embeddings."
    )
    position_embedding_type: Literal["rope", "learned_absolute"] = Field(
        default="rope", description="Rotary or learned absolute position embeddings."
    )
    rotary_base: int = Field(default=10000, ge=1, description="RoPE base (theta).")
    rope_scaling_factor: float | None = Field(
        default=None,
        gt=1,
        description="Llama 3.1's RoPE scaling (rope type llama3: low/high frequency factors 1 "
        "and 4 over an original context of 8192 positions) with this factor; unset for none.",
    )
    norm_epsilon: float = Field(
        default=1e-6, gt=0, description="Epsilon of every normalization layer."
    )
    num_experts: int | None = Field(
        default=None, ge=1, description="Experts per MoE layer; unset for a dense model."
    )
    moe_router_topk: int = Field(default=2, ge=1, description="Experts each token is routed to.")
    moe_ffn_hidden_size: int | None = Field(
        default=None, ge=1, description="Hidden size of each expert's MLP."
    )

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None


def _arch(**kw: object) -> ModelArch:
    return ModelArch.model_validate(kw)


# One table for every preset. Numbers from the models' published configs.
PRESETS: dict[str, ModelArch] = {
    "gpt-tiny": _arch(
        num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, vocab_size=512, max_position_embeddings=512,
        untie_embeddings=True, position_embedding_type="learned_absolute",
    ),
    "gpt-tiny-moe": _arch(
        num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, vocab_size=512, max_position_embeddings=512,
        untie_embeddings=True, position_embedding_type="learned_absolute",
        num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=128,
    ),
    "qwen3-0.6b": _arch(
        num_layers=28, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16,
        num_query_groups=8, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
        qk_layernorm=True, rotary_base=1000000,
    ),
    "qwen3-1.7b": _arch(
        num_layers=28, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16,
        num_query_groups=8, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
        qk_layernorm=True, rotary_base=1000000,
    ),
    "qwen3-4b": _arch(
        num_layers=36, hidden_size=2560, ffn_hidden_size=9728, num_attention_heads=32,
        num_query_groups=8, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
        qk_layernorm=True, rotary_base=1000000,
    ),
    "qwen3-8b": _arch(
        num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32,
        num_query_groups=8, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
        qk_layernorm=True, rotary_base=1000000, untie_embeddings=True,
    ),
    "llama3-8b": _arch(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, kv_channels=128, vocab_size=128256, max_position_embeddings=8192,
        rotary_base=500000, untie_embeddings=True, norm_epsilon=1e-5,
    ),
    "llama3.1-8b": _arch(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, kv_channels=128, vocab_size=128256, max_position_embeddings=131072,
        rotary_base=500000, untie_embeddings=True, norm_epsilon=1e-5, rope_scaling_factor=8.0,
    ),
    "qwen3-30b-a3b": _arch(
        num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32,
        num_query_groups=4, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
        qk_layernorm=True, rotary_base=1000000, untie_embeddings=True,
        num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
    ),
}  # fmt: skip

PresetName = Literal[
    "gpt-tiny",
    "gpt-tiny-moe",
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
    "qwen3-8b",
    "llama3-8b",
    "llama3.1-8b",
    "qwen3-30b-a3b",
]


class ModelOverrides(ApiModel):
    """Typed changes to a preset's architecture; unset fields keep the preset's value."""

    num_layers: int | None = Field(default=None, ge=1, description="Number of layers.")
    hidden_size: int | None = Field(default=None, ge=1, description="Hidden size.")
    ffn_hidden_size: int | None = Field(default=None, ge=1, description="Dense MLP hidden size.")
    num_attention_heads: int | None = Field(default=None, ge=1, description="Query heads.")
    num_query_groups: int | None = Field(default=None, ge=1, description="Key/value heads.")
    kv_channels: int | None = Field(default=None, ge=1, description="Size of one head.")
    vocab_size: int | None = Field(default=None, ge=1, description="Vocabulary size.")
    max_position_embeddings: int | None = Field(
        default=None, ge=1, description="Longest supported sequence."
    )
    num_experts: int | None = Field(default=None, ge=1, description="Experts per MoE layer.")
    moe_router_topk: int | None = Field(default=None, ge=1, description="Experts per token.")
    moe_ffn_hidden_size: int | None = Field(default=None, ge=1, description="Expert MLP size.")


class ModelSpec(ApiModel):
    """Which model to train: a preset plus typed overrides, and the weights it starts from."""

    preset: PresetName = Field(description="Architecture preset (see the README's table).")
    overrides: ModelOverrides = Field(
        default_factory=ModelOverrides, description="Changes to the preset's numbers."
    )
    weights: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Hugging Face checkpoint directory (config.json and *.safetensors) on a "
        "volume mounted in the pods; recipe.kind finetune starts from it, and only finetune "
        "reads it. Its config.json must match the preset and overrides (Qwen3, Qwen3 MoE and "
        "Llama checkpoints).",
    )

    def resolve(self) -> ModelArch:
        """The preset's architecture with the overrides applied."""
        changes = self.overrides.model_dump(exclude_none=True)
        return PRESETS[self.preset].model_copy(update=changes)


# --------------------------------------------------------------------------- recipe


class Precision(StrEnum):
    BF16 = "bf16"
    FP8 = "fp8"
    FP32 = "fp32"


class OptimizerSpec(ApiModel):
    """Optimizer settings (Megatron's OptimizerConfig)."""

    name: Literal["adam", "sgd"] = Field(default="adam", description="Optimizer.")
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate.")
    min_lr: float = Field(default=3e-5, ge=0, description="Learning rate at the end of decay.")
    weight_decay: float = Field(default=0.1, ge=0, description="Decoupled weight decay.")
    adam_beta1: float = Field(default=0.9, ge=0, lt=1, description="Adam beta1.")
    adam_beta2: float = Field(default=0.95, ge=0, lt=1, description="Adam beta2.")
    adam_eps: float = Field(default=1e-8, gt=0, description="Adam epsilon.")
    clip_grad: float = Field(default=1.0, ge=0, description="Gradient norm clip; 0 disables.")
    distributed: bool = Field(
        default=True, description="Shard optimizer state over data-parallel ranks (GPU only)."
    )


class LRScheduleSpec(ApiModel):
    """Learning-rate schedule (Megatron's OptimizerParamScheduler)."""

    style: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Decay style after warmup."
    )
    warmup_iters: int = Field(default=0, ge=0, description="Linear warmup steps.")
    decay_iters: int | None = Field(
        default=None, ge=1, description="Decay steps; defaults to trainIters."
    )


# The fast path's pieces (kubetron_trainer.models.fused): GPU without Transformer Engine only.
FAST_PATH_PIECES = ("ce", "norm", "rope", "cudnn", "wgrad", "adam", "swiglu", "overlap")
_PIECE = "(" + "|".join(FAST_PATH_PIECES) + ")"
FAST_PATH_PATTERN = rf"^(off|on|{_PIECE}(,{_PIECE})*)$"


@dataclass(frozen=True)
class FastPath:
    """Which fused pieces are on."""

    ce: bool = False
    norm: bool = False
    rope: bool = False
    cudnn: bool = False
    wgrad: bool = False
    adam: bool = False
    swiglu: bool = False
    overlap: bool = False
    every: bool = False  # "on": every piece that applies (ce is skipped under TP, not refused)

    @classmethod
    def parse(cls, text: str) -> FastPath:
        """`off`, `on` (everything), or a comma list of pieces, e.g. `ce,rope`."""
        text = text.strip().lower()
        if text in ("", "off", "none"):
            return cls()
        if text in ("on", "all"):
            return cls(every=True, **{p: True for p in FAST_PATH_PIECES})
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in FAST_PATH_PIECES]
        if unknown:
            raise ValueError(
                f"unknown piece(s) {unknown}; use off, on, or a comma list of "
                f"{', '.join(FAST_PATH_PIECES)}"
            )
        return cls(**{n: True for n in names})

    @property
    def pieces(self) -> tuple[str, ...]:
        """The pieces that are on, in FAST_PATH_PIECES order."""
        return tuple(p for p in FAST_PATH_PIECES if getattr(self, p))

    @property
    def enabled(self) -> bool:
        return bool(self.pieces)

    def lists(self, piece: str) -> bool:
        """Whether `piece` was named on its own (not through `on`): such a piece is refused
        where it cannot apply, instead of skipped."""
        return getattr(self, piece) and not self.every

    def without(self, piece: str) -> FastPath:
        return replace(self, **{piece: False})

    def describe(self) -> str:
        return "fast path: " + "+".join(self.pieces) if self.enabled else "fast path off"


# A spec's fastPath is parsed once per process, however often the recipe is read.
_parse_fast_path = functools.cache(FastPath.parse)


class DpoSpec(ApiModel):
    """Direct preference optimisation: the policy learns to prefer each pair's chosen response
    over its rejected one, relative to the frozen reference."""

    beta: float = Field(
        default=0.1,
        gt=0,
        description="Strength of the pull towards the reference (DPO's beta): the log-ratio "
        "margins are scaled by it.",
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description="Probability that a pair's preference is flipped (conservative DPO): "
        "0 is DPO's sigmoid loss.",
    )


class DistillSpec(ApiModel):
    """Knowledge distillation: the student learns the frozen teacher's token distribution."""

    temperature: float = Field(
        default=1.0, gt=0, description="Softmax temperature of both distributions."
    )
    kl_weight: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="loss = klWeight * KL(teacher || student) + (1 - klWeight) * the "
        "language-model loss on the data's labels.",
    )


# Recipes that train one model against others (spec.models).
MULTI_MODEL_RECIPES = ("dpo", "distill")


# LoRA's targets: Megatron-Core's linear layers of a transformer layer (kubetron_trainer.models.lora
# maps them onto Megatron's modules and peft's).
LoraTarget = Literal["qkv", "proj", "fc1", "fc2"]


class PeftSpec(ApiModel):
    """Parameter-efficient fine-tuning: LoRA adapters trained on top of frozen base weights."""

    type: Literal["lora"] = Field(
        default="lora",
        description="lora: each target layer computes W x + (alpha / rank) B A dropout(x), W "
        "frozen, A and B trained (peft's LoRA: A Kaiming-uniform, B zero at the start).",
    )
    rank: int = Field(default=16, ge=1, description="Rank r of each adapter.")
    alpha: float = Field(default=32.0, gt=0, description="Scale numerator: updates x alpha/r.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on adapter inputs.")
    targets: list[LoraTarget] = Field(
        default_factory=lambda: list(get_args(LoraTarget)),
        min_length=1,
        description="Layers of every transformer layer that get adapters: qkv (peft's q_proj, "
        "k_proj, v_proj), proj (o_proj), fc1 (gate_proj, up_proj), fc2 (down_proj).",
    )
    adapters: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="A peft adapter directory (adapter_config.json, adapter_model.safetensors) "
        "to start from instead of peft's initialisation; its r, lora_alpha and modules must fit.",
    )

    @model_validator(mode="after")
    def _targets_once(self) -> PeftSpec:
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets lists a layer twice: {self.targets}")
        return self

    @property
    def scale(self) -> float:
        """What the adapters' product is multiplied by (peft's lora_alpha / r)."""
        return self.alpha / self.rank


# The schema's mark of an optional object whose absence is a setting (unset: off): the CRD
# generator gives it no `default: {}`, which would turn it on in every stored job.
OFF_WHEN_UNSET_KEY = "x-kubetron-off-when-unset"
OFF_WHEN_UNSET: dict[str, Any] = {OFF_WHEN_UNSET_KEY: True}


class EvalSpec(ApiModel):
    """Validation loss: forward-only passes over the validation split (`data.split`'s second
    weight), in the trained model's own parallel shape."""

    interval: int | None = Field(
        default=None,
        ge=1,
        description="Optimizer steps between evaluations (after steps interval, 2 x interval, "
        "...); unset: no evaluation during training.",
    )
    iterations: int = Field(
        default=10,
        ge=1,
        description="Global batches (recipe.globalBatchSize sequences each, read in "
        "recipe.microBatchSize micro-batches like a training step) one evaluation scores, "
        "Megatron's eval_iters. Every evaluation reads the same ones, from the start of the "
        "validation split.",
    )
    at_end: bool = Field(default=True, description="Evaluate after the last step too.")


class RecipeSpec(ApiModel):
    """How to train: steps, batch sizes, precision, optimizer and schedule."""

    kind: Literal["pretrain", "finetune", "dpo", "distill"] = Field(
        default="pretrain",
        description="pretrain: from random weights. finetune: from the Hugging Face weights in "
        "spec.model.weights (needs them), at step 0 with a fresh optimizer and its own LR "
        "schedule; a restart resumes from the job's own checkpoints instead. dpo: preference "
        "tuning of a trainable policy against a frozen reference (spec.models, data.type "
        "preference; globalBatchSize and microBatchSize count pairs). distill: a trainable "
        "student learns a frozen teacher's token distribution (spec.models).",
    )
    dpo: DpoSpec = Field(default_factory=DpoSpec, description="DPO settings (kind dpo).")
    distill: DistillSpec = Field(
        default_factory=DistillSpec, description="Distillation settings (kind distill)."
    )
    peft: PeftSpec | None = Field(
        default=None,
        json_schema_extra=OFF_WHEN_UNSET,
        description="LoRA adapters trained on frozen base weights (kind finetune); checkpoints "
        "hold the adapters alone and record their base. Unset: every weight trains.",
    )
    train_iters: int = Field(default=100, ge=1, description="Optimizer steps to run.")
    global_batch_size: int = Field(default=8, ge=1, description="Sequences per optimizer step.")
    micro_batch_size: int = Field(default=1, ge=1, description="Sequences per forward pass.")
    seq_length: int = Field(default=2048, ge=8, description="Tokens per sequence.")
    precision: Precision = Field(
        default=Precision.BF16,
        description="bf16 (GPU), fp8 (GPU: on the fast path kubetron's row-wise scaled fp8 "
        "GEMMs for the dense layers' linear layers, Hopper or newer, no Transformer Engine "
        "needed; with fastPath off Transformer Engine's), fp32. Weights, optimizer state and "
        "checkpoints are the same in bf16 and fp8: a job can switch at a resume.",
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer.")
    lr_schedule: LRScheduleSpec = Field(
        default_factory=LRScheduleSpec, description="Learning-rate schedule."
    )
    recompute_layers: int = Field(
        default=0,
        ge=0,
        description="Transformer layers of each pipeline stage (each model chunk with virtual "
        "pipelining) whose activations are recomputed in the backward pass instead of kept: "
        "Megatron-Core's full recompute, block method. 0 keeps every layer's activations; the "
        "stage's layer count recomputes all of them (the least memory, about a third more "
        "compute). For long sequences that do not fit otherwise. Needs GPUs.",
    )
    seed: int = Field(default=1234, ge=0, description="Random seed (model init and data).")
    log_interval: int = Field(default=10, ge=1, description="Steps between progress lines.")
    eval: EvalSpec | None = Field(
        default=None,
        json_schema_extra=OFF_WHEN_UNSET,
        description="Validation loss on the validation split (data.split's second weight), "
        "token-weighted over the pass, with its perplexity: logged, exported as "
        "kubetron_train_validation_loss and shown in status.progress.validationLoss. "
        "pretrain and finetune. Unset: no evaluation.",
    )
    fast_path: str = Field(
        default="on",
        pattern=FAST_PATH_PATTERN,
        description="The engine on GPUs. on (the default): the TE-free fast path, Megatron's "
        "local spec with fused kernels, used even where Transformer Engine is installed "
        "(unless context parallelism needs TE); 56.7% MFU for Llama3-8B on 2 H200s "
        "(DP2, seq 4096). off: Transformer Engine when the image has it, else the local spec "
        "without fused kernels. A comma list picks pieces: ce (fused linear cross-entropy), "
        "norm (RMSNorm), rope, cudnn (SDPA backend), wgrad (fp32 weight-gradient "
        "accumulation), adam (fused AdamW), swiglu (SwiGLU, dense models), overlap (gradient "
        "reduce-scatter overlapped with the backward pass); ce needs liger-kernel. No effect "
        "on CPU. "
        "The engine used is logged and shown in status.progress.engine.",
    )

    # --------------------------------------------------------------------------- parallelism

    @property
    def fast(self) -> FastPath:
        """`fast_path` parsed (the schema's pattern admits only what parses)."""
        return _parse_fast_path(self.fast_path)


class ParallelismSpec(ApiModel):
    """Parallel shape; the data-parallel degree is derived from the world size."""

    tensor: int = Field(default=1, ge=1, description="Tensor-parallel degree (inside a node).")
    pipeline: int = Field(default=1, ge=1, description="Pipeline-parallel stages.")
    virtual_pipeline: int = Field(
        default=1, ge=1, description="Model chunks per pipeline stage (interleaved schedule)."
    )
    context: int = Field(default=1, ge=1, description="Context-parallel degree (needs TE).")
    expert: int = Field(default=1, ge=1, description="Expert-parallel degree (MoE).")
    expert_tensor: int = Field(default=1, ge=1, description="Tensor parallel inside experts.")
    sequence_parallel: bool = Field(
        default=False, description="Sequence parallel with tensor > 1 (GPUs only)."
    )


# A model's name: a directory of the job's checkpoint and a metric label value.
MODEL_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class RankSlice(ApiModel):
    """A contiguous slice of the job's ranks (global ranks first .. first + count - 1)."""

    first: int = Field(ge=0, description="First global rank of the slice.")
    count: int = Field(ge=1, description="Ranks in the slice.")

    @property
    def end(self) -> int:
        return self.first + self.count


class JobModel(ModelSpec):
    """One of several models of a job (recipe.kind dpo or distill): its architecture, weights,
    parallel shape, whether it trains, and the ranks it runs on."""

    name: str = Field(
        min_length=1,
        max_length=40,
        pattern=MODEL_NAME,
        description="The model's name: its checkpoint subdirectory and its metrics' model label.",
    )
    weights: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="What the model starts from: a Hugging Face checkpoint directory "
        "(config.json and *.safetensors) or a kubetron checkpoint directory (its latest step), "
        "on a volume mounted in the pods. A frozen model needs it; a trainable one without it "
        "starts from random weights.",
    )
    trainable: bool = Field(
        default=True,
        description="true: trained (optimizer state, checkpoints). false: frozen, forward only "
        "(a reference or a teacher), no optimizer state.",
    )
    parallelism: ParallelismSpec = Field(
        default_factory=lambda: ParallelismSpec(),
        description="This model's parallel shape over its ranks; data parallel is derived.",
    )
    ranks: RankSlice | None = Field(
        default=None,
        description="The ranks the model runs on. Unset: every rank of the job (co-located "
        "with the other models, each in its own grid over the same ranks).",
    )


# --------------------------------------------------------------------------- data


class TokenizerSpec(ApiModel):
    """The tokenizer the indexed data was prepared with; the trainer checks it against the
    model at start. `byte` needs no download and is what tests and the demo use."""

    type: Literal["byte", "huggingface"] = Field(
        default="byte",
        description="byte: UTF-8 bytes (ids 0-255, EOD 256, pad 257). huggingface: the "
        "tokenizer directory in name.",
    )
    name: str | None = Field(
        default=None,
        max_length=253,
        description="Directory on a volume holding a Hugging Face tokenizer.json, with "
        "eos_token (EOD) and pad_token in tokenizer_config.json or special_tokens_map.json; "
        "loaded offline. Its vocabulary must fit the model's vocabSize.",
    )


class DatasetPath(ApiModel):
    """One Megatron indexed dataset (`<prefix>.bin` and `<prefix>.idx`) and its weight."""

    prefix: str = Field(min_length=1, max_length=1024, description="Path prefix without suffix.")
    weight: float = Field(default=1.0, gt=0, description="Relative sampling weight.")


class DataSpec(ApiModel):
    """Training data: deterministic mock tokens, Megatron indexed datasets (pretraining), or
    conversations prepared by `kubetron-prepare-data --chat` (supervised fine-tuning: packed to
    the sequence length, loss on the assistant's tokens)."""

    type: Literal["mock", "indexed", "chat", "preference"] = Field(
        default="mock",
        description="Data source: mock, indexed (pretraining text), chat (conversations) or "
        "preference (prompt, chosen and rejected responses, from kubetron-prepare-data "
        "--preference; recipe dpo).",
    )
    paths: list[DatasetPath] = Field(
        default_factory=list,
        max_length=64,
        description="Indexed datasets (type indexed: a weighted blend; types chat and "
        "preference: exactly one).",
    )
    split: str = Field(
        default="99,1,0",
        pattern=r"^\d+(\.\d+)?,\d+(\.\d+)?,\d+(\.\d+)?$",
        max_length=64,
        description="Train,validation,test split weights.",
    )
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer.")

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("numWorkers" in data or "num_workers" in data):
            raise ValueError(
                "numWorkers was removed: the trainer reads its batches in-process from "
                "memory-mapped indexed datasets and never started DataLoader workers; delete "
                "the field"
            )
        return data


# --------------------------------------------------------------------------- checkpoint


class CheckpointSpec(ApiModel):
    """Where and how often to save; resume picks the latest complete checkpoint."""

    path: str | None = Field(
        default=None, max_length=1024, description="Directory for checkpoints; unset disables."
    )
    save_interval: int = Field(default=100, ge=1, description="Steps between saves.")
    resume: Literal["auto", "never"] = Field(
        default="auto", description="auto resumes from the latest checkpoint when one exists."
    )
    async_save: bool = Field(
        default=False,
        description="Write checkpoints in the background (Megatron-Core's asynchronous "
        "dist-checkpointing, GPU only): training waits only while each rank copies its share "
        "to host memory (about 12 bytes a parameter over the data-parallel ranks, plus the "
        "weights), then goes on while a forked process writes it; `latest` moves once every "
        "rank's files are complete. The final save and the save on SIGTERM are synchronous "
        "and wait for a pending one first.",
    )


# --------------------------------------------------------------------------- the trainer config


# Long enough for the slowest collective of a healthy step (a checkpoint's barriers included),
# short enough that a hung peer ends the attempt instead of the job waiting for ever.
DEFAULT_COLLECTIVE_TIMEOUT_S = 600


class TrainerModel(ApiModel):
    """One model of a job that holds several, resolved: what its ranks build."""

    name: str = Field(description="The model's name (spec.models[].name).")
    model: ModelArch = Field(description="Resolved architecture.")
    preset: str = Field(description="Preset the architecture came from.")
    weights: str | None = Field(default=None, description="What the model starts from.")
    trainable: bool = Field(description="Trained (true) or frozen (false).")
    parallelism: ParallelismSpec = Field(description="Its parallel shape.")
    ranks: RankSlice = Field(description="Its ranks (every rank when co-located).")


class TrainerConfig(ApiModel):
    """Everything one trainer process needs; the operator writes it to a ConfigMap as JSON.

    A job of several models (recipe dpo or distill) lists them in `models`; `model`, `preset`,
    `weights` and `parallelism` then describe the trained one, and `for_model` gives each
    model's own view of the config.
    """

    job_name: str = Field(default="local", description="MegatronJob name, used in metric labels.")
    model: ModelArch = Field(description="Resolved architecture.")
    preset: str = Field(default="custom", description="Preset the architecture came from.")
    weights: str | None = Field(
        default=None, description="Hugging Face checkpoint directory to start from (finetune)."
    )
    recipe: RecipeSpec = Field(default_factory=RecipeSpec)
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec)
    world_size: Annotated[int, Field(ge=1)] = Field(default=1, description="Expected world size.")
    gpus_per_node: int = Field(default=1, ge=1, description="Processes per node.")
    collective_timeout_seconds: int = Field(
        default=DEFAULT_COLLECTIVE_TIMEOUT_S,
        ge=10,
        description="Timeout of every process group: a collective that waits longer (a lost or "
        "hung peer) fails, and the attempt ends with a retryable exit code.",
    )
    models: list[TrainerModel] = Field(
        default_factory=list,
        description="The models of a multi-model job, in spec order; empty for one model.",
    )

    def trained(self) -> TrainerModel:
        """The one trainable model of a multi-model job."""
        return next(m for m in self.models if m.trainable)

    def for_model(self, m: TrainerModel) -> TrainerConfig:
        """`m`'s own view: its architecture, weights, shape and ranks, its checkpoints in
        `<checkpoint.path>/<name>` (trainable models only: a frozen model is its weights)."""
        path = self.checkpoint.path
        own = f"{path.rstrip('/')}/{m.name}" if path and m.trainable else None
        return self.model_copy(
            update={
                "model": m.model, "preset": m.preset, "weights": m.weights,
                "parallelism": m.parallelism, "world_size": m.ranks.count, "models": [],
                "checkpoint": self.checkpoint.model_copy(update={"path": own}),
            }
        )  # fmt: skip
