"""Every rule a training shape must satisfy, checked in one pure function.

The operator calls this before it creates anything, and the trainer calls it again at start, so
a spec that slips past the API server's CEL rules (which cannot see preset numbers) is refused
with one message that lists every broken rule and names the fields to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetron_api.config import DataSpec, ModelArch, ParallelismSpec, Precision, RecipeSpec
from kubetron_api.dims import ParallelConfigError, ParallelDims

TRANSFORMER_ENGINE = "transformer-engine"


@dataclass(frozen=True)
class ShapeCheck:
    """A valid shape: the derived degrees and what the image must provide."""

    dims: ParallelDims
    requirements: tuple[str, ...]


def check_shape(
    *,
    arch: ModelArch,
    recipe: RecipeSpec,
    parallelism: ParallelismSpec,
    data: DataSpec,
    world_size: int,
    gpus_per_node: int,
) -> ShapeCheck:
    """Validate the whole shape; raise one `ParallelConfigError` naming every broken rule."""
    p = parallelism
    problems: list[str] = []
    dims: ParallelDims | None = None
    try:
        dims = ParallelDims.from_degrees(
            world_size,
            tp=p.tensor,
            pp=p.pipeline,
            cp=p.context,
            ep=p.expert,
            etp=p.expert_tensor,
            vpp=p.virtual_pipeline,
        )
    except ParallelConfigError as err:
        problems.extend(f"spec.parallelism: {msg}" for msg in err.problems)
    problems += _node_rules(p, gpus_per_node)
    problems += _model_rules(arch, p, recipe)
    if dims is not None:
        problems += _batch_rules(recipe, dims)
    problems += _data_rules(data)
    problems += _recipe_rules(recipe)
    if problems:
        raise ParallelConfigError(problems, _shape(world_size, gpus_per_node, p, dims))
    assert dims is not None  # no problems means the degrees were valid
    return ShapeCheck(dims=dims, requirements=_requirements(recipe, p))


def _node_rules(p: ParallelismSpec, gpus_per_node: int) -> list[str]:
    if gpus_per_node % p.tensor:
        return [
            f"spec.parallelism.tensor={p.tensor} must divide spec.resources.gpusPerNode="
            f"{gpus_per_node} so every tensor-parallel group stays inside one node; use a "
            f"tensor degree that divides {gpus_per_node}"
        ]
    return []


def _model_rules(arch: ModelArch, p: ParallelismSpec, recipe: RecipeSpec) -> list[str]:
    problems: list[str] = []
    if arch.num_attention_heads % p.tensor:
        problems.append(
            f"model numAttentionHeads={arch.num_attention_heads} is not divisible by "
            f"spec.parallelism.tensor={p.tensor}"
        )
    if arch.num_query_groups % p.tensor:
        problems.append(
            f"model numQueryGroups={arch.num_query_groups} is not divisible by "
            f"spec.parallelism.tensor={p.tensor}"
        )
    stages = p.pipeline * p.virtual_pipeline
    if arch.num_layers % stages:
        problems.append(
            f"model numLayers={arch.num_layers} is not divisible by spec.parallelism.pipeline*"
            f"virtualPipeline={p.pipeline}*{p.virtual_pipeline}={stages}"
        )
    if p.context > 1 and recipe.seq_length % (2 * p.context):
        problems.append(
            f"spec.recipe.seqLength={recipe.seq_length} must be divisible by 2*spec.parallelism."
            f"context={2 * p.context} (context parallelism cuts each sequence in 2*context chunks)"
        )
    if recipe.seq_length > arch.max_position_embeddings:
        problems.append(
            f"spec.recipe.seqLength={recipe.seq_length} exceeds the model's "
            f"maxPositionEmbeddings={arch.max_position_embeddings}"
        )
    problems += _moe_rules(arch, p)
    if p.sequence_parallel and p.tensor == 1:
        problems.append("spec.parallelism.sequenceParallel needs tensor > 1; set it to false")
    if recipe.fast.ce and recipe.fast_path.strip().lower() not in ("on", "all") and p.tensor > 1:
        problems.append(
            f"spec.recipe.fastPath lists ce (the fused cross-entropy), which needs "
            f"spec.parallelism.tensor=1 (it is {p.tensor}); drop ce, or use 'on', which skips ce "
            "under tensor parallelism"
        )
    return problems


def _moe_rules(arch: ModelArch, p: ParallelismSpec) -> list[str]:
    if arch.num_experts is None:
        if p.expert > 1 or p.expert_tensor > 1:
            return [
                f"spec.parallelism.expert={p.expert}/expertTensor={p.expert_tensor} need an MoE "
                "model (numExperts set); set both to 1 for a dense model"
            ]
        return []
    problems: list[str] = []
    if arch.num_experts % p.expert:
        problems.append(
            f"model numExperts={arch.num_experts} is not divisible by spec.parallelism.expert="
            f"{p.expert}"
        )
    if arch.moe_router_topk > arch.num_experts:
        problems.append(
            f"model moeRouterTopk={arch.moe_router_topk} exceeds numExperts={arch.num_experts}"
        )
    return problems


def _batch_rules(recipe: RecipeSpec, dims: ParallelDims) -> list[str]:
    per_step = recipe.micro_batch_size * dims.dp
    if recipe.global_batch_size % per_step:
        return [
            f"spec.recipe.globalBatchSize={recipe.global_batch_size} is not divisible by "
            f"microBatchSize*dataParallel={recipe.micro_batch_size}*{dims.dp}={per_step}"
        ]
    return []


def _data_rules(data: DataSpec) -> list[str]:
    if data.type == "indexed" and not data.paths:
        return ["spec.data.paths must list at least one dataset prefix when type is indexed"]
    if data.type == "mock" and data.paths:
        return ["spec.data.paths is only used with type indexed; remove it or set type: indexed"]
    if data.tokenizer.type == "huggingface" and not data.tokenizer.name:
        return ["spec.data.tokenizer.name is required when tokenizer type is huggingface"]
    return []


def cpu_rules(p: ParallelismSpec) -> list[str]:
    """What a run on CPUs (gloo) cannot do: the operator checks these for spec.resources.device
    cpu, the trainer again when it finds itself on the CPU."""
    problems: list[str] = []
    if p.pipeline > 1:
        problems.append(
            "spec.parallelism.pipeline > 1 needs GPUs (Megatron's pipeline schedules are "
            "CUDA-only); use pipeline 1 with spec.resources.device cpu"
        )
    if p.sequence_parallel:
        problems.append(
            "spec.parallelism.sequenceParallel needs GPUs (Megatron-Core's sequence-parallel "
            "gathers and scatters allocate on CUDA and fork the CUDA RNG tracker); set it to "
            "false with spec.resources.device cpu"
        )
    return problems


def _recipe_rules(recipe: RecipeSpec) -> list[str]:
    if recipe.kind == "finetune":
        return [
            "spec.recipe.kind=finetune is not supported yet: the trainer cannot load pretrained "
            "weights, so it would train from random ones; use kind pretrain"
        ]
    return []


def transformer_engine_uses(recipe: RecipeSpec, p: ParallelismSpec) -> list[str]:
    """What this shape needs Transformer Engine for, one message per field. Sequence
    parallelism runs without it (models/norm.py); fp8 and context parallelism do not."""
    uses: list[str] = []
    if recipe.precision == Precision.FP8:
        uses.append("spec.recipe.precision=fp8 needs Transformer Engine's fp8 GEMMs")
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


def _shape(world: int, gpn: int, p: ParallelismSpec, dims: ParallelDims | None) -> str:
    dp = dims.dp if dims is not None else "?"
    return (
        f"world={world} gpusPerNode={gpn} tensor={p.tensor} pipeline={p.pipeline} "
        f"virtualPipeline={p.virtual_pipeline} context={p.context} expert={p.expert} "
        f"expertTensor={p.expert_tensor} data={dp}"
    )
