"""Every validation rule, table-driven: each bad shape fails with a message naming its fields."""

from __future__ import annotations

import pytest

from kubetron_api.dims import ParallelConfigError, ParallelDims
from kubetron_operator.plan import PlanError, plan
from tests.builders import make_job

# (case id, preset, fields, expected message fragments)
BAD: list[tuple[str, str | None, dict[str, object], list[str]]] = [
    (
        "tensor-3-on-8-gpus-per-node",
        None,
        {"tensor": 3},
        ["spec.parallelism.tensor=3 must divide spec.resources.gpusPerNode=8"],
    ),
    (
        "world-not-divisible-by-tp-cp-pp",
        None,
        {"tensor": 2, "pipeline": 3, "nodes": 1, "gpusPerNode": 8},
        ["spec.parallelism: world size=8 is not divisible by tensor*context*pipeline=6"],
    ),
    (
        "heads-not-divisible-by-tensor",
        None,
        {"tensor": 32, "nodes": 1, "gpusPerNode": 32, "globalBatchSize": 1},
        ["numAttentionHeads=16 is not divisible by spec.parallelism.tensor=32"],
    ),
    (
        "query-groups-not-divisible-by-tensor",
        None,
        {"tensor": 16, "nodes": 1, "gpusPerNode": 16, "globalBatchSize": 1},
        ["numQueryGroups=8 is not divisible by spec.parallelism.tensor=16"],
    ),
    (
        "layers-not-divisible-by-pipeline-stages",
        None,
        {"pipeline": 8, "globalBatchSize": 1},
        ["numLayers=28 is not divisible by spec.parallelism.pipeline*virtualPipeline=8*1=8"],
    ),
    (
        "layers-not-divisible-by-virtual-stages",
        None,
        {"pipeline": 2, "virtualPipeline": 3, "globalBatchSize": 4},
        ["numLayers=28 is not divisible by spec.parallelism.pipeline*virtualPipeline=2*3=6"],
    ),
    (
        "global-batch-not-divisible",
        None,
        {"globalBatchSize": 12, "microBatchSize": 2},
        [
            "spec.recipe.globalBatchSize=12 is not divisible by spec.recipe.microBatchSize=2 "
            "times the data-parallel degree=8"
        ],
    ),
    (
        "seq-not-divisible-by-2cp",
        None,
        {"context": 4, "seqLength": 4100, "globalBatchSize": 2},
        ["spec.recipe.seqLength=4100 must be divisible by 2*spec.parallelism.context=8"],
    ),
    (
        "experts-not-divisible-by-ep",
        "qwen3-30b-a3b",
        {"expert": 3, "nodes": 3, "gpusPerNode": 8, "globalBatchSize": 24},
        ["numExperts=128 is not divisible by spec.parallelism.expert=3"],
    ),
    (
        "expert-parallel-on-dense-model",
        None,
        {"expert": 2, "globalBatchSize": 8},
        ["spec.parallelism.expert=2/expertTensor=1 need an MoE model"],
    ),
    (
        "virtual-pipeline-without-pipeline",
        None,
        {"virtualPipeline": 2},
        ["virtualPipeline=2 needs pipeline > 1"],
    ),
    (
        "seq-longer-than-model",
        "gpt-tiny",
        {"seqLength": 1024, "globalBatchSize": 8},
        ["spec.recipe.seqLength=1024 exceeds the model's maxPositionEmbeddings=512"],
    ),
    (
        "fused-cross-entropy-with-tensor-parallel",
        None,
        {"tensor": 2, "fastPath": "ce,norm", "globalBatchSize": 8},
        ["spec.recipe.fastPath lists ce", "needs spec.parallelism.tensor=1 (it is 2)"],
    ),
    (
        "sequence-parallel-without-tensor",
        None,
        {"sequenceParallel": True},
        ["spec.parallelism.sequenceParallel needs tensor > 1"],
    ),
    (
        "cpu-needs-fp32",
        "gpt-tiny",
        {"device": "cpu", "precision": "bf16", "seqLength": 64},
        ["spec.recipe.precision=bf16 needs a GPU; use fp32"],
    ),
    (
        "cpu-pipeline",
        "gpt-tiny",
        {"device": "cpu", "precision": "fp32", "pipeline": 2, "seqLength": 64},
        ["spec.parallelism.pipeline > 1 needs GPUs"],
    ),
    (
        "finetune-without-weights",
        None,
        {"kind": "finetune"},
        ["spec.recipe.kind=finetune and spec.model.weights go together", "finetune starts from"],
    ),
    (
        "weights-without-finetune",
        None,
        {"weights": "/hf/qwen3-1.7b"},
        ["spec.recipe.kind=pretrain and spec.model.weights go together", "only finetune reads"],
    ),
    (
        "cpu-sequence-parallel",
        "gpt-tiny",
        {"device": "cpu", "precision": "fp32", "tensor": 2, "sequenceParallel": True},
        ["spec.parallelism.sequenceParallel needs GPUs", "set it to false"],
    ),
    (
        "cpu-recompute",
        "gpt-tiny",
        {"device": "cpu", "precision": "fp32", "recomputeLayers": 1, "seqLength": 64},
        ["spec.recipe.recomputeLayers needs GPUs", "use 0 with spec.resources.device cpu"],
    ),
    (
        "recompute-beyond-the-stage",
        "qwen3-8b",  # 36 layers: 18 a stage
        {"pipeline": 2, "recomputeLayers": 19},
        [
            "spec.recipe.recomputeLayers=19 exceeds the 18 layers of a pipeline stage",
            "pipeline*virtualPipeline=2",
        ],
    ),
]


@pytest.mark.parametrize(
    ("preset", "fields", "fragments"), [c[1:] for c in BAD], ids=[c[0] for c in BAD]
)
def test_bad_shape_is_rejected_with_named_fields(
    preset: str | None, fields: dict[str, object], fragments: list[str]
) -> None:
    job = make_job(preset, **fields)
    with pytest.raises(PlanError) as info:
        plan(job)
    text = "\n".join(info.value.problems)
    for fragment in fragments:
        assert fragment in text, f"missing {fragment!r} in:\n{text}"


def test_every_broken_rule_is_reported_at_once() -> None:
    job = make_job(tensor=3, pipeline=8, globalBatchSize=7)
    with pytest.raises(PlanError) as info:
        plan(job)
    text = "\n".join(info.value.problems)
    assert "tensor=3 must divide" in text
    assert "numLayers=28 is not divisible" in text
    assert "numAttentionHeads=16 is not divisible by spec.parallelism.tensor=3" in text


def test_valid_shape_derives_data_parallel() -> None:
    p = plan(make_job("qwen3-8b", tensor=4, pipeline=2, nodes=2, globalBatchSize=64))
    assert (p.dims.tp, p.dims.pp, p.dims.dp, p.world_size) == (4, 2, 2, 16)
    assert p.resolved_parallelism().data == 2


def test_finetune_with_weights_hands_them_to_the_trainer() -> None:
    p = plan(make_job(kind="finetune", weights="/hf/qwen3-1.7b"))
    assert p.trainer_config.weights == "/hf/qwen3-1.7b"
    assert p.trainer_config.recipe.kind == "finetune"
    assert plan(make_job()).trainer_config.weights is None


def test_fp8_and_context_parallel_are_image_requirements() -> None:
    p = plan(make_job(precision="fp8", context=2, globalBatchSize=4))
    assert p.requirements == ("transformer-engine",)
    assert plan(make_job()).requirements == ()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"tp": 0}, "every parallel degree and the world size must be >= 1 (tensor=0"),
        ({"tp": 3}, "world size=8 is not divisible by tensor*context*pipeline=3"),
        ({"ep": 3}, "world size=8 is not divisible by expertTensor*expert*pipeline=3"),
    ],
)
def test_parallel_dims_error_names_every_degree(kwargs: dict[str, int], fragment: str) -> None:
    with pytest.raises(ParallelConfigError) as info:
        ParallelDims.from_degrees(8, **kwargs)
    message = str(info.value)
    assert fragment in message
    for name in ("world=8", "tensor=", "pipeline=", "context=", "expert=", "data="):
        assert name in message


def test_parallel_dims_expert_grid() -> None:
    d = ParallelDims.from_degrees(16, tp=2, pp=2, ep=4)
    assert (d.dp, d.edp, d.tp_enabled, d.ep_enabled, d.vpp_size) == (4, 2, True, True, None)


def test_what_needs_transformer_engine_is_named_with_the_fix() -> None:
    from kubetron_api.rules import missing_transformer_engine

    job = make_job(precision="fp8", fastPath="off", context=2, globalBatchSize=4)
    problems = missing_transformer_engine(job.spec.recipe, job.spec.parallelism)
    assert problems[0].startswith("spec.recipe.precision=fp8 needs Transformer Engine")
    assert problems[1].startswith("spec.parallelism.context=2 needs Transformer Engine")
    assert all("Dockerfile's default, NGC-based trainer target" in p for p in problems)
    assert missing_transformer_engine(make_job().spec.recipe, make_job().spec.parallelism) == []


def test_removed_num_workers_says_so() -> None:
    from kubetron_api.parse import SpecError, parse_job
    from tests.builders import job_dict

    body = job_dict()
    body["spec"]["data"] = {"numWorkers": 4}
    with pytest.raises(SpecError, match=r"spec\.data: .*numWorkers was removed.*delete the field"):
        parse_job(body)


def test_every_rule_of_the_table_is_broken_by_a_case() -> None:
    """The BAD cases above (and the degree cases) break every rule in the table at least once."""
    from kubetron_api.expr import evaluate, expand
    from kubetron_api.rules import DERIVED, RULES, ShapeSpec

    seen: set[str] = set()
    for _, preset, fields, _ in BAD:
        spec = make_job(preset, **fields).spec
        values = ShapeSpec.of_job(spec).values()
        seen |= {r.name for r in RULES if not evaluate(expand(r.expr, DERIVED), values)}
    seen |= {"degrees-positive", "world-per-expert-parallel"}  # the ParallelDims cases
    missing = {r.name for r in RULES} - seen
    extra = {  # make_job sets no data fields or overrides: the tests below break these
        "router-topk",
        "indexed-data-needs-paths",
        "mock-data-has-no-paths",
        "chat-data-has-one-path",
        "preference-data-has-one-path",
        "huggingface-tokenizer-needs-name",
        # recipe.eval: tests/unit/test_eval.py breaks these
        "eval-needs-validation-split",
        "eval-needs-one-model",
        "eval-runs",
        # recipe.peft: tests/unit/test_lora.py breaks these
        "lora-needs-finetune",
        "lora-needs-one-model",
        "lora-dense-mlp",
        "lora-without-transformer-engine",
    }
    assert missing <= extra, missing


def test_router_topk_beyond_the_experts_is_refused() -> None:
    from kubetron_api.parse import parse_job
    from tests.builders import job_dict

    body = job_dict("gpt-tiny-moe")
    body["spec"]["model"]["overrides"] = {"moeRouterTopk": 5}
    with pytest.raises(PlanError, match="model moeRouterTopk=5 exceeds numExperts=4"):
        plan(parse_job(body))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"type": "indexed"}, "spec.data.paths must list at least one dataset prefix"),
        ({"paths": [{"prefix": "/d/x"}]}, "spec.data.paths is only used with type indexed"),
        (
            {"type": "preference"},
            "spec.data.paths must list exactly one dataset when spec.data.type is preference",
        ),
        ({"type": "chat"}, "spec.data.paths must list exactly one dataset when spec.data.type is"),
        (
            {"type": "chat", "paths": [{"prefix": "/d/x"}, {"prefix": "/d/y"}]},
            "prepare every conversation file into one with kubetron-prepare-data --chat",
        ),
        (
            {"tokenizer": {"type": "huggingface"}},
            "spec.data.tokenizer.name is required when the tokenizer type is huggingface",
        ),
    ],
)
def test_data_rules(data: dict[str, object], fragment: str) -> None:
    from kubetron_api.parse import parse_job
    from tests.builders import job_dict

    body = job_dict()
    body["spec"]["data"] = data
    with pytest.raises(PlanError) as info:
        plan(parse_job(body))
    assert any(fragment in p for p in info.value.problems), info.value.problems


def test_rule_names_are_unique_and_fields_are_spec_paths() -> None:
    from kubetron_api.rules import RULES

    names = [r.name for r in RULES]
    assert len(names) == len(set(names))
    assert all(r.field.startswith("spec.") or r.field == "spec" for r in RULES)


def test_crd_carries_exactly_the_rules_without_preset_numbers() -> None:
    from kubetron_api.rules import RULES, crd_validations, in_crd

    carried = [r for r in RULES if in_crd(r)]
    assert len(crd_validations()) == len(carried)
    # preset numbers and parsed strings stay in Python
    python_only = {r.name for r in RULES} - {r.name for r in carried}
    assert {"heads-per-tensor", "layers-per-stage", "fused-ce-needs-tensor-1"} <= python_only
    assert "degrees-positive" in python_only  # the schema's minimum says it
    assert {"tensor-inside-node", "batch-per-data-parallel", "cpu-pipeline"} <= {
        r.name for r in carried
    }
