"""The rules of a job of several models (spec.models, recipe.kind dpo or distill).

Each model is checked by the one-model rules of `kubetron_api.rules`, the same `Rule` objects,
read on the model: its architecture, its parallelism, its ranks as its world. Their messages are
written on a one-model job's fields; `on_model` moves them onto the model's
(spec.parallelism -> spec.models[i].parallelism, spec.model -> spec.models[i]) and names it.
The rules between the models (names, ranks, which one trains, what the recipe needs of them)
read values that Python computes from the spec and CEL from the stored object, so the API server
checks them too, except where a preset's numbers are needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kubetron_api import expr
from kubetron_api.config import JobModel, ModelArch, ParallelismSpec, RankSlice
from kubetron_api.dims import ParallelConfigError
from kubetron_api.expr import Rule
from kubetron_api.rules import (
    CEL_PATHS,
    DERIVED,
    FINETUNE_WEIGHTS,
    MODEL_VALUES,
    RULES,
    ShapeCheck,
    ShapeSpec,
    check_shape,
    in_crd,
    reads_model,
    validation,
)
from kubetron_api.rules import crd_validations as one_model_validations
from kubetron_api.v1alpha1 import MegatronJobSpec

# Rules only a model of spec.models can break, written like the one-model rules (on_model moves
# them onto the model).
MODEL_RULES: tuple[Rule, ...] = (
    Rule(
        "slice-start-per-tensor",
        "spec.model.ranks.first",
        "rankFirst % tensor == 0",
        "spec.model.ranks.first={rankFirst} is not a multiple of spec.parallelism.tensor="
        "{tensor}: a tensor-parallel group stays inside one node only where the slice starts "
        "at a multiple of the tensor degree",
    ),
    Rule(
        "distill-needs-pipeline-1",
        "spec.parallelism.pipeline",
        "recipeKind != 'distill' || pipeline == 1",
        "spec.parallelism.pipeline={pipeline}: recipe.kind distill needs pipeline 1 (the "
        "logits the student and the teacher exchange are on the last stage; every rank must "
        "hold them)",
    ),
)

# What each model of spec.models is checked by: every one-model rule on the model's values (not
# the finetune's weights: spec.models[i].weights is what the model starts from), and
# MODEL_RULES. The rules on the job alone (data, the device's precision) are checked once.
MODEL_SHAPE_RULES: tuple[Rule, ...] = (
    *(r for r in RULES if reads_model(r) and r is not FINETUNE_WEIGHTS),
    *MODEL_RULES,
)
JOB_SHAPE_RULES: tuple[Rule, ...] = tuple(r for r in RULES if not reads_model(r))

# The rules between the models, and between the models and the recipe, read on the whole spec.
MODELS_RULES: tuple[Rule, ...] = (
    Rule(
        "model-or-models",
        "spec.models",
        "hasModel != (modelCount > 0)",
        "set exactly one of spec.model (a job of one model) and spec.models (several models, "
        "recipe.kind dpo or distill)",
    ),
    Rule(
        "models-need-multi-model-recipe",
        "spec.recipe.kind",
        "(modelCount > 0) == multiModelRecipe",
        "spec.recipe.kind={recipeKind} does not fit the spec's models: pretrain and finetune "
        "train the one model of spec.model, dpo and distill train one of spec.models against "
        "the others",
    ),
    Rule(
        "models-leave-parallelism",
        "spec.parallelism",
        "modelCount == 0 || parallelismDefault",
        "spec.parallelism is the shape of spec.model: with spec.models leave it unset and set "
        "each model's shape under spec.models[i].parallelism",
    ),
    Rule(
        "model-names-unique",
        "spec.models",
        "size(repeatedNames) == 0",
        "spec.models[i].name must differ between the models (a name is the model's checkpoint "
        "directory and metrics label); repeated names={repeatedNames}",
    ),
    Rule(
        "one-trainable-model",
        "spec.models",
        "modelCount == 0 || size(trainableModels) == 1",
        "exactly one of spec.models must be trainable (the model the job trains; the others "
        "are frozen: trainable false); trainable models={trainableModels}",
    ),
    Rule(
        "frozen-model-needs-weights",
        "spec.models",
        "size(frozenWithoutWeights) == 0",
        "a frozen model (trainable false) needs spec.models[i].weights, the checkpoint it runs "
        "with; frozen models without weights={frozenWithoutWeights}",
    ),
    Rule(
        "ranks-on-every-model-or-none",
        "spec.models",
        "size(slicedModels) == 0 || size(slicedModels) == modelCount",
        "set spec.models[i].ranks on every model (each on its own slice of the job's ranks) or "
        "on none (every model on every rank); models with ranks={slicedModels}",
    ),
    Rule(
        "ranks-inside-world",
        "spec.models",
        "size(slicesOutsideWorld) == 0",
        "spec.models[i].ranks must lie inside the job's ranks 0..world-1 (world=spec.resources."
        "nodes*gpusPerNode={jobWorldSize}); models outside={slicesOutsideWorld}",
    ),
    Rule(
        "ranks-disjoint",
        "spec.models",
        "size(overlappingSlices) == 0",
        "spec.models[i].ranks must not overlap: each rank runs one model's slice (or set no "
        "ranks: every model on every rank); overlapping models={overlappingSlices}",
    ),
    Rule(
        "ranks-cover-world",
        "spec.models",
        "size(slicedModels) == 0 || size(slicedModels) < modelCount || rankSum == jobWorldSize",
        "the slices of spec.models[i].ranks must together cover every rank of the job: their "
        "counts sum={rankSum}, world=spec.resources.nodes*gpusPerNode={jobWorldSize}",
    ),
    Rule(
        "two-models",
        "spec.models",
        "!multiModelRecipe || modelCount == 2",
        "spec.recipe.kind={recipeKind} takes exactly two spec.models: dpo a trainable policy "
        "and a frozen reference, distill a trainable student and a frozen teacher",
    ),
    Rule(
        "distill-co-located",
        "spec.models",
        "recipeKind != 'distill' || size(slicedModels) == 0",
        "recipe.kind distill runs the student and the teacher on the same ranks: remove "
        "spec.models[i].ranks (the teacher's per-token distributions reach the student every "
        "step; between separate ranks that is seqLength x vocabulary numbers a sequence over "
        "the network)",
    ),
    Rule(
        "distill-tensor-nested",
        "spec.models",
        "recipeKind != 'distill' || tensorsNested",
        "recipe.kind distill needs tensor degrees that divide one another (the student reads "
        "the teacher's vocabulary shards): spec.models[i].parallelism.tensor={modelTensors}",
    ),
    Rule(
        "distill-same-vocabulary",
        "spec.models",
        "recipeKind != 'distill' || vocabsEqual",
        "recipe.kind distill needs one vocabulary (the student learns the teacher's "
        "distribution over it): vocabSize after spec.models[i].overrides={modelVocabs}",
    ),
    Rule(
        "preference-data-needs-dpo",
        "spec.data.type",
        "dataType != 'preference' || recipeKind == 'dpo'",
        "spec.recipe.kind={recipeKind} cannot read spec.data.type preference (prompts with a "
        "chosen and a rejected response): use recipe.kind dpo, or data of type indexed or chat",
    ),
    Rule(
        "dpo-needs-preference-data",
        "spec.data.type",
        "recipeKind != 'dpo' || dataType == 'preference' || dataType == 'mock'",
        "spec.data.type={dataType} holds no preference pairs: recipe.kind dpo reads type "
        "preference (kubetron-prepare-data --preference) or mock",
    ),
    Rule(
        "frozen-model-pipeline-1",
        "spec.models",
        "size(frozenPipelined) == 0",
        "frozen models run forward only in one pipeline stage: set "
        "spec.models[i].parallelism.pipeline 1 (use tensor or data parallelism to fit them); "
        "frozen models with pipeline > 1={frozenPipelined}",
    ),
    Rule(
        "trained-slice-from-rank-0",
        "spec.models",
        "size(trainedOffRank0) == 0",
        "the trainable model's slice must start at rank 0 (global rank 0 reports the job's "
        "progress and writes its checkpoints' metadata): give it spec.models[i].ranks.first 0 "
        "and the frozen models the ranks after it; trainable models elsewhere={trainedOffRank0}",
    ),
    Rule(
        "slices-save-synchronously",
        "spec.checkpoint.asyncSave",
        "size(slicedModels) == 0 || !asyncSave",
        "spec.checkpoint.asyncSave needs co-located models: the ranks of a frozen model on a "
        "slice of its own take part in each save synchronously; set asyncSave false or remove "
        "spec.models[i].ranks",
    ),
    Rule(
        "several-models-without-fused-ce",
        "spec.recipe.fastPath",
        "!fastPathListsCe || !multiModelRecipe",
        "spec.recipe.fastPath lists ce (the fused cross-entropy), which gives no per-token "
        "log-probabilities or logits, and spec.recipe.kind={recipeKind} needs them; drop ce, "
        "or use 'on', which skips ce for dpo and distill",
    ),
)


def _over_models(cel: str, empty: str) -> str:
    return f"(has(self.models) ? {cel} : {empty})"


def _names(condition: str, var: str = "m") -> str:
    """The names of the models for which the CEL `condition` on `var` holds."""
    return _over_models(f"self.models.filter({var}, {condition}).map({var}, {var}.name)", "[]")


def _cel_literal(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


_JOB_WORLD = str(CEL_PATHS["worldSize"])
_OVERLAP = (
    "self.models.exists(b, b.name != a.name && has(b.ranks) && a.ranks.first < b.ranks.first + "
    "b.ranks.count && b.ranks.first < a.ranks.first + a.ranks.count)"
)
_NESTED = (
    "a.parallelism.tensor % b.parallelism.tensor == 0 || "
    "b.parallelism.tensor % a.parallelism.tensor == 0"
)
# The CEL of the values MODELS_RULES read (None: Python only, a preset's numbers or a string).
MODELS_CEL_PATHS: dict[str, str | None] = {
    **CEL_PATHS,
    "hasModel": "has(self.model)",
    "modelCount": _over_models("size(self.models)", "0"),
    "parallelismDefault": "("
    + " && ".join(
        f"self.parallelism.{k} == {_cel_literal(v)}"
        for k, v in ParallelismSpec().model_dump(by_alias=True).items()
    )
    + ")",
    "repeatedNames": _names("!self.models.exists_one(b, b.name == a.name)", "a"),
    "trainableModels": _names("m.trainable"),
    "frozenWithoutWeights": _names("!m.trainable && !has(m.weights)"),
    "slicedModels": _names("has(m.ranks)"),
    "frozenPipelined": _names("!m.trainable && m.parallelism.pipeline > 1"),
    "trainedOffRank0": _names("m.trainable && has(m.ranks) && m.ranks.first != 0"),
    "asyncSave": (
        "(has(self.checkpoint) && has(self.checkpoint.asyncSave) && self.checkpoint.asyncSave)"
    ),
    "slicesOutsideWorld": _names(f"has(m.ranks) && m.ranks.first + m.ranks.count > {_JOB_WORLD}"),
    "overlappingSlices": _names(f"has(a.ranks) && {_OVERLAP}", "a"),
    "rankSum": _over_models("self.models.filter(m, has(m.ranks)).map(m, m.ranks.count).sum()", "0"),
    "jobWorldSize": _JOB_WORLD,
    "tensorsNested": f"(!has(self.models) || self.models.all(a, self.models.all(b, {_NESTED})))",
    "modelTensors": None,
    "vocabsEqual": None,
    "modelVocabs": None,
}
# The CEL of the values a model's rules read, the model being `m` in `self.models.all(m, ...)`.
MODEL_CEL_PATHS: dict[str, str | None] = {
    **CEL_PATHS,
    **{
        k: v.replace("self.parallelism.", "m.parallelism.")
        for k, v in CEL_PATHS.items()
        if v and k in MODEL_VALUES
    },
    "worldSize": f"(has(m.ranks) ? m.ranks.count : {_JOB_WORLD})",
    "modelWeights": "(has(m.weights) ? m.weights : '')",
    "rankFirst": "(has(m.ranks) ? m.ranks.first : 0)",
}


def models_values(spec: MegatronJobSpec) -> dict[str, expr.Value]:
    """The values MODELS_RULES read, as MODELS_CEL_PATHS computes them on the stored object."""
    models = spec.models or []
    world = spec.resources.world_size
    names = [m.name for m in models]
    sliced = [(m.name, m.ranks) for m in models if m.ranks is not None]
    tensors = [m.parallelism.tensor for m in models]
    vocabs = [(m.name, m.resolve().vocab_size) for m in models]

    def overlaps(a: tuple[str, RankSlice], b: tuple[str, RankSlice]) -> bool:
        return a[0] != b[0] and a[1].first < b[1].end and b[1].first < a[1].end

    return {
        "hasModel": spec.model is not None,
        "modelCount": len(models),
        "parallelismDefault": spec.parallelism == ParallelismSpec(),
        "repeatedNames": [n for n in names if names.count(n) > 1],
        "trainableModels": [m.name for m in models if m.trainable],
        "frozenWithoutWeights": [m.name for m in models if not m.trainable and not m.weights],
        "slicedModels": [name for name, _ in sliced],
        "frozenPipelined": [
            m.name for m in models if not m.trainable and m.parallelism.pipeline > 1
        ],
        "trainedOffRank0": [
            m.name for m in models if m.trainable and m.ranks is not None and m.ranks.first != 0
        ],
        "asyncSave": spec.checkpoint.async_save,
        "slicesOutsideWorld": [name for name, ranks in sliced if ranks.end > world],
        "overlappingSlices": [s[0] for s in sliced if any(overlaps(s, o) for o in sliced)],
        "rankSum": sum(ranks.count for _, ranks in sliced),
        "jobWorldSize": world,
        "tensorsNested": all(a % b == 0 or b % a == 0 for a in tensors for b in tensors),
        "modelTensors": [f"{m.name}={m.parallelism.tensor}" for m in models],
        "vocabsEqual": len({size for _, size in vocabs}) <= 1,
        "modelVocabs": [f"{name}={size}" for name, size in vocabs],
        "recipeKind": spec.recipe.kind,
        "dataType": spec.data.type,
        "fastPathListsCe": spec.recipe.fast.lists("ce"),
    }


def models_problems(spec: MegatronJobSpec) -> list[str]:
    """The message of every rule of MODELS_RULES the spec breaks (any spec: one model too)."""
    return expr.broken(MODELS_RULES, models_values(spec), DERIVED)


_PARALLELISM = re.compile(r"\bspec\.parallelism\b")
_MODEL = re.compile(r"\bspec\.model\b")
_WORLD = re.compile(r"\bworld size\b")


def on_model(text: str, index: int | str, name: str | None = None, sliced: bool = False) -> str:
    """`text`, written on a one-model job's fields, moved onto spec.models[index]; with `name`,
    opened by the model's name and place. A model's world is its ranks: `sliced` names them."""
    where = f"spec.models[{index}]"
    text = _MODEL.sub(where, _PARALLELISM.sub(f"{where}.parallelism", text))
    if sliced:
        text = _WORLD.sub(f"{where}.ranks.count", text)
    return f"model '{name}' ({where}): {text}" if name else text


@dataclass(frozen=True)
class ModelCheck:
    """A model of spec.models that passed its rules: its architecture, ranks and shape."""

    model: JobModel
    arch: ModelArch
    ranks: RankSlice  # resolved: every rank of the job when the model sets none
    check: ShapeCheck


def model_shape(spec: MegatronJobSpec, m: JobModel) -> tuple[ShapeSpec, RankSlice]:
    """What the rules read of model `m`: its ranks (resolved) are its world."""
    res = spec.resources
    ranks = m.ranks or RankSlice(first=0, count=res.world_size)
    shape = ShapeSpec(m.resolve(), spec.recipe, m.parallelism, spec.data, ranks.count,
                      res.gpus_per_node, res.device, m.weights, ranks.first)  # fmt: skip
    return shape, ranks


def check_models(spec: MegatronJobSpec) -> tuple[list[ModelCheck], list[str]]:
    """Every model of spec.models checked by MODEL_SHAPE_RULES, the job by JOB_SHAPE_RULES
    once: the checks of the models that pass, and every problem, each on its model's fields."""
    checks: list[ModelCheck] = []
    problems: list[str] = []
    shapes: list[ShapeSpec] = []
    for i, m in enumerate(spec.models or []):
        shape, ranks = model_shape(spec, m)
        shapes.append(shape)
        try:
            check = check_shape(shape, MODEL_SHAPE_RULES)
        except ParallelConfigError as err:
            problems += [on_model(p, i, m.name, m.ranks is not None) for p in err.problems]
        else:
            checks.append(ModelCheck(m, shape.arch, ranks, check))
    if shapes:
        problems += expr.broken(JOB_SHAPE_RULES, shapes[0].values(), DERIVED)
    return checks, problems


def model_crd_message(rule: Rule) -> str:
    """The CRD's message of a rule of MODEL_SHAPE_RULES on any model of spec.models, opened by
    its field as `expr.broken` opens it."""
    message = rule.message if rule.message.startswith("spec.") else f"{rule.field}: {rule.message}"
    return on_model(message, "i")


def crd_validations() -> list[dict[str, str]]:
    """The CRD's x-kubernetes-validations: the one-model rules, each model's rules over
    spec.models, and MODELS_RULES, every one the API server can check."""
    out = one_model_validations()
    model_paths = {k: v for k, v in MODEL_CEL_PATHS.items() if v}
    for rule in MODEL_SHAPE_RULES:
        if in_crd(rule, MODEL_CEL_PATHS):
            cel = expr.to_cel(expr.expand(rule.expr, DERIVED), model_paths)
            each = f"!has(self.models) || self.models.all(m, {cel})"
            out.append(validation(rule, each, model_crd_message(rule), "spec.models"))
    paths = {k: v for k, v in MODELS_CEL_PATHS.items() if v}
    for rule in MODELS_RULES:
        if in_crd(rule, MODELS_CEL_PATHS):
            cel = expr.to_cel(expr.expand(rule.expr, DERIVED), paths)
            out.append(validation(rule, cel, rule.message, rule.field))
    return out
