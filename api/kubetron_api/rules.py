"""Every rule a training shape must satisfy: one table, each rule written once.

A `Rule` is an expression over named values of the spec, the field it is about and a message
template that names the fields and the fix (`kubetron_api.expr`). The same rule is the Python
check that the operator runs before it creates anything and the trainer runs again at start, and,
where it reads no preset numbers, a CEL rule in the generated CRD, so the API server refuses the
spec at `kubectl apply` with the same message without the values (`field={value}` placeholders
are dropped: a CEL messageExpression with values costs more than the API server allows).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from kubetron_api import expr
from kubetron_api.config import (
    MULTI_MODEL_RECIPES,
    DataSpec,
    ModelArch,
    ParallelismSpec,
    Precision,
    RecipeSpec,
    TrainerConfig,
)
from kubetron_api.dims import (
    DEGREE_RULES,
    POSITIVE,
    ParallelConfigError,
    ParallelDims,
    data_parallel,
    degree_values,
)
from kubetron_api.expr import Rule
from kubetron_api.v1alpha1 import MegatronJobSpec

TRANSFORMER_ENGINE = "transformer-engine"
Device = Literal["gpu", "cpu"]

# A one-model job's weights are a finetune's start; a job of several models gives each model's
# weights in spec.models (rules of model_rules), so its recipes are out of this rule.
FINETUNE_WEIGHTS = Rule(
    "finetune-needs-weights",
    "spec.recipe.kind",
    "multiModelRecipe || (recipeKind == 'finetune') == (size(modelWeights) > 0)",
    "spec.recipe.kind={recipeKind} and spec.model.weights go together: finetune starts from "
    "the Hugging Face checkpoint directory in spec.model.weights, and only finetune reads "
    "it; set kind finetune with weights, or pretrain without them",
)

# recipe.eval scores the validation split with the trained objective of a one-model job.
EVAL_RULES: tuple[Rule, ...] = (
    Rule(
        "eval-needs-validation-split",
        "spec.data.split",
        "!evalOn || splitHasValidation",
        "spec.data.split={dataSplit} has no validation part but spec.recipe.eval is set; give "
        "the second weight a share (e.g. 98,2,0) or remove spec.recipe.eval",
    ),
    Rule(
        "eval-needs-one-model",
        "spec.recipe.eval",
        "!evalOn || !multiModelRecipe",
        "spec.recipe.eval scores the language-model loss of recipe.kind pretrain and finetune; "
        "spec.recipe.kind={recipeKind} is not evaluated (its loss needs the frozen models' "
        "forward passes); remove spec.recipe.eval",
    ),
    Rule(
        "eval-runs",
        "spec.recipe.eval",
        "!evalOn || evalInterval > 0 || evalAtEnd",
        "spec.recipe.eval never evaluates: set its interval, or leave atEnd true",
    ),
)

# recipe.peft trains LoRA adapters on the fixed base weights of a one-model finetune.
PEFT_RULES: tuple[Rule, ...] = (
    Rule(
        "lora-needs-finetune",
        "spec.recipe.peft",
        "!loraOn || recipeKind == 'finetune' || multiModelRecipe",
        "spec.recipe.kind={recipeKind}: LoRA trains adapters on top of fixed base weights: set "
        "recipe.kind finetune and spec.model.weights",
    ),
    Rule(
        "lora-needs-one-model",
        "spec.recipe.peft",
        "!loraOn || !multiModelRecipe",
        "LoRA is not supported yet for a job of several models (spec.models with "
        "spec.recipe.kind={recipeKind}): it trains adapters on the one model of a finetune; "
        "remove spec.recipe.peft",
    ),
    Rule(
        "lora-dense-mlp",
        "spec.recipe.peft.targets",
        "!loraMlp || numExperts == 0",
        "spec.recipe.peft.targets lists fc1 or fc2, which LoRA adapts in dense MLPs only; the "
        "model has numExperts={numExperts} experts a layer: target qkv and proj",
    ),
    Rule(
        "lora-without-transformer-engine",
        "spec.recipe.peft",
        "!loraOn || !needsTransformerEngine",
        "LoRA adapts the linear layers of Megatron's local spec, without Transformer Engine, "
        "and this shape needs Transformer Engine (spec.parallelism.context > 1, or "
        "spec.recipe.precision fp8 with spec.recipe.fastPath off): use context 1, and fp8 only "
        "with the fast path on",
    ),
)

# Rules on the whole spec, after the degree rules (dims.DEGREE_RULES) hold.
SHAPE_RULES: tuple[Rule, ...] = (
    Rule(
        "tensor-inside-node",
        "spec.parallelism.tensor",
        "gpusPerNode % tensor == 0",
        "spec.parallelism.tensor={tensor} must divide spec.resources.gpusPerNode={gpusPerNode} "
        "so every tensor-parallel group stays inside one node; use a tensor degree that divides "
        "the GPUs per node",
    ),
    Rule(
        "heads-per-tensor",
        "spec.parallelism.tensor",
        "numAttentionHeads % tensor == 0",
        "model numAttentionHeads={numAttentionHeads} is not divisible by "
        "spec.parallelism.tensor={tensor}",
    ),
    Rule(
        "query-groups-per-tensor",
        "spec.parallelism.tensor",
        "numQueryGroups % tensor == 0",
        "model numQueryGroups={numQueryGroups} is not divisible by "
        "spec.parallelism.tensor={tensor}",
    ),
    Rule(
        "layers-per-stage",
        "spec.parallelism.pipeline",
        "numLayers % (pipeline * virtualPipeline) == 0",
        "model numLayers={numLayers} is not divisible by spec.parallelism.pipeline*"
        "virtualPipeline={pipeline}*{virtualPipeline}={pipeline * virtualPipeline}",
    ),
    Rule(
        "recompute-within-stage",
        "spec.recipe.recomputeLayers",
        "recomputeLayers <= numLayers / (pipeline * virtualPipeline)",
        "spec.recipe.recomputeLayers={recomputeLayers} exceeds the "
        "{numLayers / (pipeline * virtualPipeline)} layers of a pipeline stage (model numLayers="
        "{numLayers} over spec.parallelism.pipeline*virtualPipeline={pipeline * virtualPipeline}); "
        "use at most that many (all of them recomputes every layer)",
    ),
    Rule(
        "seq-per-context-chunk",
        "spec.recipe.seqLength",
        "context == 1 || seqLength % (2 * context) == 0",
        "spec.recipe.seqLength={seqLength} must be divisible by 2*spec.parallelism.context="
        "{2 * context} (context parallelism cuts each sequence in 2*context chunks)",
    ),
    Rule(
        "seq-within-model",
        "spec.recipe.seqLength",
        "seqLength <= maxPositionEmbeddings",
        "spec.recipe.seqLength={seqLength} exceeds the model's "
        "maxPositionEmbeddings={maxPositionEmbeddings}",
    ),
    Rule(
        "expert-needs-moe",
        "spec.parallelism.expert",
        "numExperts > 0 || (expert == 1 && expertTensor == 1)",
        "spec.parallelism.expert={expert}/expertTensor={expertTensor} need an MoE model "
        "(numExperts set); set both to 1 for a dense model",
    ),
    Rule(
        "experts-per-expert-rank",
        "spec.parallelism.expert",
        "numExperts == 0 || numExperts % expert == 0",
        "model numExperts={numExperts} is not divisible by spec.parallelism.expert={expert}",
    ),
    Rule(
        "router-topk",
        "spec.model",
        "numExperts == 0 || moeRouterTopk <= numExperts",
        "model moeRouterTopk={moeRouterTopk} exceeds numExperts={numExperts}",
    ),
    Rule(
        "sequence-parallel-needs-tensor",
        "spec.parallelism.sequenceParallel",
        "!sequenceParallel || tensor > 1",
        "spec.parallelism.sequenceParallel needs tensor > 1; set it to false",
    ),
    Rule(
        "fused-ce-needs-tensor-1",
        "spec.recipe.fastPath",
        "!fastPathListsCe || tensor == 1",
        "spec.recipe.fastPath lists ce (the fused cross-entropy), which needs "
        "spec.parallelism.tensor=1 (it is {tensor}); drop ce, or use 'on', which skips ce under "
        "tensor parallelism",
    ),
    Rule(
        "batch-per-data-parallel",
        "spec.recipe.globalBatchSize",
        "worldSize % modelParallel != 0 || globalBatchSize % (microBatchSize * dataParallel) == 0",
        "spec.recipe.globalBatchSize={globalBatchSize} is not divisible by "
        "spec.recipe.microBatchSize={microBatchSize} times the data-parallel degree="
        "{dataParallel}",
    ),
    Rule(
        "indexed-data-needs-paths",
        "spec.data.paths",
        "dataType != 'indexed' || size(dataPaths) > 0",
        "spec.data.paths must list at least one dataset prefix when spec.data.type is indexed",
    ),
    Rule(
        "mock-data-has-no-paths",
        "spec.data.paths",
        "dataType != 'mock' || size(dataPaths) == 0",
        "spec.data.paths is only used with type indexed, chat or preference; remove it or set "
        "spec.data.type: indexed",
    ),
    Rule(
        "chat-data-has-one-path",
        "spec.data.paths",
        "dataType != 'chat' || size(dataPaths) == 1",
        "spec.data.paths must list exactly one dataset when spec.data.type is chat; prepare "
        "every conversation file into one with kubetron-prepare-data --chat",
    ),
    Rule(
        "preference-data-has-one-path",
        "spec.data.paths",
        "dataType != 'preference' || size(dataPaths) == 1",
        "spec.data.paths must list exactly one dataset when spec.data.type is preference; "
        "prepare every preference file into one with kubetron-prepare-data --preference",
    ),
    Rule(
        "huggingface-tokenizer-needs-name",
        "spec.data.tokenizer.name",
        "tokenizerType != 'huggingface' || size(tokenizerName) > 0",
        "spec.data.tokenizer.name is required when the tokenizer type is huggingface",
    ),
    FINETUNE_WEIGHTS,
    *EVAL_RULES,
    *PEFT_RULES,
)

# Pods with device cpu train in fp32 (bf16 on CPU is slow and not what a GPU run would do).
CPU_PRECISION = Rule(
    "cpu-needs-fp32",
    "spec.recipe.precision",
    "device != 'cpu' || precision == 'fp32'",
    "spec.recipe.precision={precision} needs a GPU; use fp32 with spec.resources.device cpu",
)

# What a run on CPUs (gloo) cannot do: the operator checks these for spec.resources.device cpu,
# the trainer in its one check at start when it finds itself on the CPU (TRAINER_RULES).
CPU_RULES: tuple[Rule, ...] = (
    Rule(
        "cpu-pipeline",
        "spec.parallelism.pipeline",
        "device != 'cpu' || pipeline == 1",
        "spec.parallelism.pipeline > 1 needs GPUs (Megatron's pipeline schedules are CUDA-only); "
        "use pipeline 1 with spec.resources.device cpu",
    ),
    Rule(
        "cpu-recompute",
        "spec.recipe.recomputeLayers",
        "device != 'cpu' || recomputeLayers == 0",
        "spec.recipe.recomputeLayers needs GPUs (Megatron-Core's recompute saves and restores the "
        "CUDA RNG states); use 0 with spec.resources.device cpu",
    ),
    Rule(
        "cpu-sequence-parallel",
        "spec.parallelism.sequenceParallel",
        "device != 'cpu' || !sequenceParallel",
        "spec.parallelism.sequenceParallel needs GPUs (Megatron-Core's sequence-parallel gathers "
        "and scatters allocate on CUDA and fork the CUDA RNG tracker); set it to false with "
        "spec.resources.device cpu",
    ),
)

RULES: tuple[Rule, ...] = (*DEGREE_RULES, *SHAPE_RULES, CPU_PRECISION, *CPU_RULES)
# What the trainer checks at start, on the device it found itself on: every rule but the
# operator's steer of CPU pods to fp32 (a trainer started by hand runs the precision it is given).
TRAINER_RULES: tuple[Rule, ...] = tuple(r for r in RULES if r is not CPU_PRECISION)

# Derived values, written once as expressions over the others.
DERIVED: dict[str, str] = {
    "modelParallel": "tensor * context * pipeline",
    "dataParallel": "worldSize / modelParallel",
    "multiModelRecipe": " || ".join(f"recipeKind == '{k}'" for k in MULTI_MODEL_RECIPES),
}

# Each value's CEL path under the MegatronJob spec (`self`); None: not in the spec (a preset
# number, or a value parsed from a string), so rules reading it are checked in Python only.
CEL_PATHS: dict[str, str | None] = {
    "worldSize": "(self.resources.nodes * self.resources.gpusPerNode)",
    "gpusPerNode": "self.resources.gpusPerNode",
    "device": "self.resources.device",
    "tensor": "self.parallelism.tensor",
    "pipeline": "self.parallelism.pipeline",
    "virtualPipeline": "self.parallelism.virtualPipeline",
    "context": "self.parallelism.context",
    "expert": "self.parallelism.expert",
    "expertTensor": "self.parallelism.expertTensor",
    "sequenceParallel": "self.parallelism.sequenceParallel",
    "seqLength": "self.recipe.seqLength",
    "microBatchSize": "self.recipe.microBatchSize",
    "globalBatchSize": "self.recipe.globalBatchSize",
    "recomputeLayers": "self.recipe.recomputeLayers",
    "precision": "self.recipe.precision",
    "recipeKind": "self.recipe.kind",
    "dataType": "self.data.type",
    # optional fields, absent from the stored object when not set
    "dataPaths": "(has(self.data.paths) ? self.data.paths : [])",
    "tokenizerType": "self.data.tokenizer.type",
    "tokenizerName": "(has(self.data.tokenizer.name) ? self.data.tokenizer.name : '')",
    "modelWeights": "(has(self.model) && has(self.model.weights) ? self.model.weights : '')",
    "evalOn": "has(self.recipe.eval)",
    "loraOn": "has(self.recipe.peft)",
    "loraMlp": None,
    "needsTransformerEngine": None,
    "evalInterval": "(has(self.recipe.eval) && has(self.recipe.eval.interval) ? "
    "self.recipe.eval.interval : 0)",
    "evalAtEnd": "(has(self.recipe.eval) && self.recipe.eval.atEnd)",
    # the split's pattern makes its second part a number (Kubernetes' CEL string library)
    "splitHasValidation": "(double(self.data.split.split(',')[1]) > 0.0)",
    "fastPathListsCe": None,
    "numAttentionHeads": None,
    "numQueryGroups": None,
    "numLayers": None,
    "maxPositionEmbeddings": None,
    "numExperts": None,
    "moeRouterTopk": None,
}


# The values each model of spec.models has of its own (its fields, its ranks); the others are the
# job's. A rule that reads one is checked on every model (kubetron_api.model_rules), and its
# CEL form here, on spec.model and spec.parallelism, holds for a spec with spec.models.
MODEL_VALUES = frozenset(
    {"worldSize", "tensor", "pipeline", "virtualPipeline", "context", "expert", "expertTensor",
     "sequenceParallel", "modelWeights", "numAttentionHeads", "numQueryGroups", "numLayers",
     "maxPositionEmbeddings", "numExperts", "moeRouterTopk", "rankFirst"}
)  # fmt: skip
NOT_SEVERAL_MODELS = "has(self.models)"


def reads(rule: Rule, derived: Mapping[str, str] = DERIVED) -> set[str]:
    """The values `rule`'s expression reads (derived values expanded)."""
    return expr.names(expr.expand(rule.expr, derived))


def reads_model(rule: Rule) -> bool:
    """Whether `rule` reads a value of the model (MODEL_VALUES), not only the job's."""
    return bool(reads(rule) & MODEL_VALUES)


def in_crd(
    rule: Rule, paths: Mapping[str, str | None] = CEL_PATHS, derived: Mapping[str, str] = DERIVED
) -> bool:
    """Whether the API server can check `rule`: its expression reads only values with a CEL
    path (the message's values are the Python check's alone)."""
    return rule.crd and all(paths.get(n) for n in reads(rule, derived))


def validation(rule: Rule, cel: str, message: str, field: str) -> dict[str, str]:
    """One x-kubernetes-validations entry: `cel` must hold, else the static `message`."""
    return {
        "rule": cel,
        "message": expr.static_message(message),
        "fieldPath": field.removeprefix("spec"),
        "reason": "FieldValueInvalid",
    }


def crd_validations() -> list[dict[str, str]]:
    """The CRD's x-kubernetes-validations of the one-model rules: every rule the API server can
    check, those on the model's values skipped for a spec with spec.models."""
    paths = {k: v for k, v in CEL_PATHS.items() if v}
    out = []
    for rule in RULES:
        if not in_crd(rule):
            continue
        cel = expr.to_cel(expr.expand(rule.expr, DERIVED), paths)
        if reads_model(rule):
            cel = f"{NOT_SEVERAL_MODELS} || ({cel})"
        out.append(validation(rule, cel, rule.message, rule.field))
    return out


@dataclass(frozen=True)
class ShapeSpec:
    """What the rules read: the resolved model, the spec's sections, the world and the device."""

    arch: ModelArch
    recipe: RecipeSpec
    parallelism: ParallelismSpec
    data: DataSpec
    world_size: int
    gpus_per_node: int
    device: Device = "gpu"
    weights: str | None = None  # spec.model.weights
    first_rank: int = 0  # the first global rank of a model of spec.models with its own ranks

    @classmethod
    def of_job(cls, spec: MegatronJobSpec) -> ShapeSpec:
        """A one-model job's shape (spec.model set)."""
        assert spec.model is not None, "a job of several models has a shape per model"
        res = spec.resources
        return cls(spec.model.resolve(), spec.recipe, spec.parallelism, spec.data,
                   res.world_size, res.gpus_per_node, res.device, spec.model.weights)  # fmt: skip

    @classmethod
    def of_config(cls, cfg: TrainerConfig, device: Device = "gpu") -> ShapeSpec:
        return cls(cfg.model, cfg.recipe, cfg.parallelism, cfg.data, cfg.world_size,
                   cfg.gpus_per_node, device, cfg.weights)  # fmt: skip

    def values(self) -> dict[str, expr.Value]:
        """The named values every rule reads."""
        p, recipe, data, arch, fast = (
            self.parallelism, self.recipe, self.data, self.arch, self.recipe.fast,
        )  # fmt: skip
        return {
            **spec_degrees(self.world_size, p),
            "gpusPerNode": self.gpus_per_node,
            "device": self.device,
            "sequenceParallel": p.sequence_parallel,
            "seqLength": recipe.seq_length,
            "microBatchSize": recipe.micro_batch_size,
            "globalBatchSize": recipe.global_batch_size,
            "recomputeLayers": recipe.recompute_layers,
            "precision": recipe.precision.value,
            "recipeKind": recipe.kind,
            "modelWeights": self.weights or "",
            "dataType": data.type,
            "dataSplit": data.split,
            "splitHasValidation": float(data.split.split(",")[1]) > 0,
            "evalOn": recipe.eval is not None,
            "loraOn": recipe.peft is not None,
            "loraMlp": recipe.peft is not None and bool({"fc1", "fc2"} & set(recipe.peft.targets)),
            "needsTransformerEngine": bool(transformer_engine_uses(recipe, p)),
            "evalInterval": (recipe.eval.interval or 0) if recipe.eval else 0,
            "evalAtEnd": recipe.eval is not None and recipe.eval.at_end,
            "dataPaths": [str(path) for path in data.paths],
            "tokenizerType": data.tokenizer.type,
            "tokenizerName": data.tokenizer.name or "",
            "fastPathListsCe": fast.lists("ce"),
            "numAttentionHeads": arch.num_attention_heads,
            "numQueryGroups": arch.num_query_groups,
            "numLayers": arch.num_layers,
            "maxPositionEmbeddings": arch.max_position_embeddings,
            "numExperts": arch.num_experts or 0,
            "moeRouterTopk": arch.moe_router_topk,
            "rankFirst": self.first_rank,
        }


def spec_degrees(world_size: int, p: ParallelismSpec) -> dict[str, expr.Value]:
    """`degree_values` of a spec's parallelism."""
    values = degree_values(
        world_size, tp=p.tensor, pp=p.pipeline, cp=p.context, ep=p.expert,
        etp=p.expert_tensor, vpp=p.virtual_pipeline,
    )  # fmt: skip
    return dict(values)


@dataclass(frozen=True)
class ShapeCheck:
    """A valid shape: the derived degrees and what the image must provide."""

    dims: ParallelDims
    requirements: tuple[str, ...]


def check_shape(shape: ShapeSpec, rules: tuple[Rule, ...] = RULES) -> ShapeCheck:
    """Validate the whole shape once; raise one `ParallelConfigError` naming every broken rule,
    else the resolved degrees (built without checking them again) and the image's needs."""
    p, world = shape.parallelism, shape.world_size
    values = shape.values()
    problems = expr.broken((POSITIVE,), values, DERIVED)
    if not problems:  # the other rules divide by the degrees
        problems = expr.broken(tuple(r for r in rules if r is not POSITIVE), values, DERIVED)
    degrees = {"tp": p.tensor, "pp": p.pipeline, "cp": p.context, "ep": p.expert,
               "etp": p.expert_tensor, "vpp": p.virtual_pipeline}  # fmt: skip
    if problems:
        dp = data_parallel(world, tp=p.tensor, cp=p.context, pp=p.pipeline)
        raise ParallelConfigError(problems, _shape(world, shape.gpus_per_node, p, dp))
    dims = ParallelDims.of_checked(world, **degrees)
    return ShapeCheck(dims=dims, requirements=_requirements(shape.recipe, p))


def transformer_engine_uses(recipe: RecipeSpec, p: ParallelismSpec) -> list[str]:
    """What this shape needs Transformer Engine for, one message per field. Sequence
    parallelism runs without it (models/norm.py), fp8 too on the fast path (its own fp8 GEMMs,
    models/fp8.py); fp8 with the fast path off and context parallelism do not."""
    uses: list[str] = []
    if recipe.precision == Precision.FP8 and not recipe.fast.enabled:
        uses.append(
            "spec.recipe.precision=fp8 needs Transformer Engine's fp8 GEMMs when "
            "spec.recipe.fastPath is off (the fast path has its own, on Hopper GPUs)"
        )
    if p.context > 1:
        uses.append(
            f"spec.parallelism.context={p.context} needs Transformer Engine's context-parallel "
            "attention"
        )
    return uses


def missing_transformer_engine(recipe: RecipeSpec, p: ParallelismSpec) -> list[str]:
    """The problems of this shape on an image without Transformer Engine (the trainer checks
    them at start, before it joins the job: the operator cannot see what an image holds)."""
    fix = (
        "this trainer image has no Transformer Engine: use an image that has it (the "
        "Dockerfile's default, NGC-based trainer target)"
    )
    return [f"{use}; {fix}" for use in transformer_engine_uses(recipe, p)]


def _requirements(recipe: RecipeSpec, p: ParallelismSpec) -> tuple[str, ...]:
    return (TRANSFORMER_ENGINE,) if transformer_engine_uses(recipe, p) else ()


def _shape(world: int, gpn: int, p: ParallelismSpec, dp: int | None) -> str:
    return (
        f"world={world} gpusPerNode={gpn} tensor={p.tensor} pipeline={p.pipeline} "
        f"virtualPipeline={p.virtual_pipeline} context={p.context} expert={p.expert} "
        f"expertTensor={p.expert_tensor} data={dp if dp is not None else '?'}"
    )
