"""Jobs of several models (spec.models): every rule refuses its bad spec naming the model and
the field, a good spec plans each model's grid over its ranks, and the operator's outputs (the
trainer config, status, the CRD, `kubetron validate` and `render`) carry the models.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetron_api.model_rules import MODEL_RULES, MODELS_RULES, crd_validations
from kubetron_api.parse import parse_job
from kubetron_api.rules import RULES
from kubetron_operator.cli.main import main
from kubetron_operator.lifecycle import Verdict
from kubetron_operator.plan import Plan, PlanError, plan
from kubetron_operator.render import render, to_yaml
from kubetron_operator.status import Observed, job_status
from tests.builders import make_job

GOLDEN = Path(__file__).parent / "golden"
Spec = dict[str, Any]

# A policy trained on ranks 0-3 against a frozen reference on ranks 4-7.
DPO: Spec = {
    "models": [
        {
            "name": "policy",
            "preset": "gpt-tiny",
            "parallelism": {"tensor": 2},
            "ranks": {"first": 0, "count": 4},
        },
        {
            "name": "reference",
            "preset": "gpt-tiny",
            "trainable": False,
            "weights": "/models/sft",
            "ranks": {"first": 4, "count": 4},
        },
    ],
    "recipe": {"kind": "dpo", "globalBatchSize": 8, "seqLength": 256},
    "resources": {"nodes": 1, "gpusPerNode": 8},
}
# A Qwen3 teacher cut to a few layers, with the student's vocabulary.
SMALL_QWEN3 = {
    "numLayers": 2,
    "hiddenSize": 128,
    "ffnHiddenSize": 256,
    "numAttentionHeads": 4,
    "numQueryGroups": 2,
    "kvChannels": 32,
    "vocabSize": 512,
    "maxPositionEmbeddings": 512,
}
# A student learning from a frozen teacher on the same ranks.
DISTILL: Spec = {
    "models": [
        {"name": "student", "preset": "gpt-tiny"},
        {
            "name": "teacher",
            "preset": "qwen3-0.6b",
            "overrides": SMALL_QWEN3,
            "trainable": False,
            "weights": "/models/teacher",
            "parallelism": {"tensor": 2},
        },
    ],
    "recipe": {"kind": "distill", "globalBatchSize": 8, "seqLength": 256},
    "resources": {"nodes": 1, "gpusPerNode": 8},
}


def multi_model_job(spec: Spec, change: Callable[[Spec], object] | None = None) -> dict[str, Any]:
    """A MegatronJob of `spec` (DPO, DISTILL), changed by `change`."""
    spec = copy.deepcopy(spec)
    if change is not None:
        change(spec)
    return {
        "apiVersion": "kubetron.io/v1alpha1",
        "kind": "MegatronJob",
        "metadata": {"name": "mm", "namespace": "ml", "uid": "0000-2222"},
        "spec": spec,
    }


def _plan(spec: Spec, change: Callable[[Spec], object] | None = None) -> Plan:
    return plan(parse_job(multi_model_job(spec, change)))


def set_field(path: str, value: object) -> Callable[[Spec], None]:
    """A change of the spec: `models.1.parallelism.tensor` set to `value`."""

    def change(spec: Spec) -> None:
        *parents, last = path.split(".")
        node: Any = spec
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        elif value is None:
            node.pop(last, None)
        else:
            node[last] = value

    return change


def changes(*each: Callable[[Spec], None]) -> Callable[[Spec], None]:
    """Several changes of the spec, in order."""

    def change(spec: Spec) -> None:
        for c in each:
            c(spec)

    return change


# --------------------------------------------------------------------------- good specs


def test_dpo_on_two_slices_plans_each_models_grid() -> None:
    p = _plan(DPO)
    assert [(m.name, m.trainable, m.rank_range()) for m in p.models] == [
        ("policy", True, "0-3"),
        ("reference", False, "4-7"),
    ]
    policy, reference = p.models
    assert (policy.dims.world_size, policy.dims.tp, policy.dims.dp) == (4, 2, 2)
    assert (reference.dims.world_size, reference.dims.tp, reference.dims.dp) == (4, 1, 4)
    # the job: every rank, the trainable model's shape for status.parallelism and scheduling
    assert (p.world_size, p.dims, p.resolved_parallelism().tensor) == (8, policy.dims, 2)
    assert p.pod_order() == [0]


def test_dpo_trainer_config_lists_the_models_and_describes_the_trainable_one() -> None:
    cfg = _plan(DPO).trainer_config
    assert [(m.name, m.trainable, m.ranks.first, m.ranks.count) for m in cfg.models] == [
        ("policy", True, 0, 4),
        ("reference", False, 4, 4),
    ]
    assert (cfg.preset, cfg.weights, cfg.parallelism.tensor, cfg.world_size) == (
        "gpt-tiny",
        None,
        2,
        8,
    )
    assert cfg.models[1].weights == "/models/sft"
    reference = cfg.for_model(cfg.models[1])
    assert (reference.world_size, reference.weights) == (4, "/models/sft")


def test_co_located_models_get_every_rank() -> None:
    change = changes(set_field("models.0.ranks", None), set_field("models.1.ranks", None))
    p = _plan(DPO, change)
    assert [m.rank_range() for m in p.models] == ["0-7", "0-7"]
    assert [m.ranks.count for m in p.trainer_config.models] == [8, 8]
    assert [m.dims.dp for m in p.models] == [4, 8]


def test_distill_with_a_small_qwen3_teacher_is_valid() -> None:
    p = _plan(DISTILL)
    assert [(m.name, m.dims.tp, m.dims.dp) for m in p.models] == [
        ("student", 1, 8),
        ("teacher", 2, 4),
    ]
    assert p.trainer_config.models[1].model.vocab_size == 512


def test_one_model_jobs_keep_their_config() -> None:
    p = plan(make_job())
    assert p.models == () and p.trainer_config.models == []
    body = json.loads(render(make_job(), p)[0]["data"]["config.json"])
    assert "models" not in body and {"dpo", "distill"}.isdisjoint(body["recipe"])


def test_a_multi_model_config_keeps_its_recipe_and_models() -> None:
    body = json.loads(render(parse_job(multi_model_job(DPO)), _plan(DPO))[0]["data"]["config.json"])
    assert [m["name"] for m in body["models"]] == ["policy", "reference"]
    assert "dpo" in body["recipe"] and "distill" not in body["recipe"]


# --------------------------------------------------------------------------- each model's rules


# (case id, the rule, base spec, change, fragments of the message)
MODEL_CASES: list[tuple[str, str, Spec, Callable[[Spec], None], list[str]]] = [
    (
        "tensor-3-on-8-gpus",
        "tensor-inside-node",
        DPO,
        set_field("models.0.parallelism.tensor", 3),
        [
            "model 'policy' (spec.models[0]): spec.models[0].parallelism.tensor=3 must divide "
            "spec.resources.gpusPerNode=8"
        ],
    ),
    (
        "heads-per-tensor",
        "heads-per-tensor",
        DPO,
        changes(
            set_field("models.0.ranks", None),
            set_field("models.1.ranks", None),
            set_field("models.1.parallelism", {"tensor": 8}),
        ),
        [
            "model 'reference' (spec.models[1]): spec.models[1].parallelism.tensor: model "
            "numAttentionHeads=4 is not divisible by spec.models[1].parallelism.tensor=8"
        ],
    ),
    (
        "slice-not-divisible",
        "world-per-model-parallel",
        DPO,
        set_field("models.0.parallelism.pipeline", 3),
        [
            "model 'policy' (spec.models[0]): spec.models[0].parallelism: "
            "spec.models[0].ranks.count=4 is not divisible by tensor*context*pipeline=6"
        ],
    ),
    (
        "expert-degree-on-a-slice",
        "world-per-expert-parallel",
        DPO,
        set_field("models.1.parallelism.expert", 3),
        [
            "model 'reference' (spec.models[1]): spec.models[1].parallelism.expert: "
            "spec.models[1].ranks.count=4 is not divisible by expertTensor*expert*pipeline=3"
        ],
    ),
    (
        "virtual-pipeline-without-pipeline",
        "virtual-pipeline-needs-pipeline",
        DPO,
        set_field("models.1.parallelism.virtualPipeline", 2),
        ["model 'reference' (spec.models[1]): spec.models[1].parallelism.virtualPipeline=2 needs"],
    ),
    (
        "seq-per-context-chunk",
        "seq-per-context-chunk",
        DPO,
        changes(set_field("models.1.parallelism.context", 2), set_field("recipe.seqLength", 258)),
        [
            "model 'reference' (spec.models[1]): spec.recipe.seqLength=258 must be divisible by "
            "2*spec.models[1].parallelism.context=4"
        ],
    ),
    (
        "sequence-parallel-without-tensor",
        "sequence-parallel-needs-tensor",
        DPO,
        set_field("models.1.parallelism.sequenceParallel", True),
        ["model 'reference' (spec.models[1]): spec.models[1].parallelism.sequenceParallel needs"],
    ),
    (
        "batch-per-reference-replicas",
        "batch-per-data-parallel",
        DPO,
        set_field("recipe.globalBatchSize", 6),
        [
            "model 'reference' (spec.models[1]): spec.recipe.globalBatchSize=6 is not divisible "
            "by spec.recipe.microBatchSize=1 times the data-parallel degree=4"
        ],
    ),
    (
        "seq-beyond-reference",
        "seq-within-model",
        DPO,
        set_field("models.1.overrides", {"maxPositionEmbeddings": 128}),
        [
            "model 'reference' (spec.models[1]): spec.recipe.seqLength=256 exceeds the model's "
            "maxPositionEmbeddings=128"
        ],
    ),
    (
        "router-topk",
        "router-topk",
        DPO,
        changes(
            set_field("models.0.preset", "gpt-tiny-moe"),
            set_field("models.0.overrides", {"moeRouterTopk": 5}),
        ),
        ["model 'policy' (spec.models[0]): spec.models[0]: model moeRouterTopk=5 exceeds"],
    ),
    (
        "cpu-pipeline",
        "cpu-pipeline",
        DPO,
        changes(
            set_field("resources.device", "cpu"),
            set_field("recipe.precision", "fp32"),
            set_field("models.1.parallelism", {"pipeline": 2}),
        ),
        ["model 'reference' (spec.models[1]): spec.models[1].parallelism.pipeline > 1 needs GPUs"],
    ),
    (
        "cpu-sequence-parallel",
        "cpu-sequence-parallel",
        DPO,
        changes(
            set_field("resources.device", "cpu"),
            set_field("recipe.precision", "fp32"),
            set_field("models.0.parallelism.sequenceParallel", True),
        ),
        ["model 'policy' (spec.models[0]): spec.models[0].parallelism.sequenceParallel needs GPUs"],
    ),
    (
        "slice-start",
        "slice-start-per-tensor",
        DPO,
        changes(
            set_field("models.0.parallelism.tensor", 4),
            set_field("models.0.ranks", {"first": 2, "count": 6}),
            set_field("models.1.ranks", {"first": 0, "count": 2}),
        ),
        [
            "model 'policy' (spec.models[0]): spec.models[0].ranks.first=2 is not a multiple of "
            "spec.models[0].parallelism.tensor=4"
        ],
    ),
    (
        "distill-pipeline",
        "distill-needs-pipeline-1",
        DISTILL,
        set_field("models.0.parallelism", {"pipeline": 2}),
        [
            "model 'student' (spec.models[0]): spec.models[0].parallelism.pipeline=2: "
            "recipe.kind distill needs pipeline 1"
        ],
    ),
]

# (case id, the rule, base spec, change, fragments of the message)
JOB_CASES: list[tuple[str, str, Spec, Callable[[Spec], None], list[str]]] = [
    (
        "frozen-pipelined",
        "frozen-model-pipeline-1",
        DPO,
        set_field("models.1.parallelism", {"pipeline": 2}),
        ["frozen models run forward only in one pipeline stage", "['reference']"],
    ),
    (
        "trained-off-rank-0",
        "trained-slice-from-rank-0",
        DPO,
        changes(
            set_field("models.0.ranks", {"first": 4, "count": 4}),
            set_field("models.1.ranks", {"first": 0, "count": 4}),
        ),
        ["the trainable model's slice must start at rank 0", "['policy']"],
    ),
    (
        "async-save-on-slices",
        "slices-save-synchronously",
        DPO,
        changes(set_field("checkpoint", {"path": "/ckpt", "asyncSave": True})),
        ["spec.checkpoint.asyncSave needs co-located models"],
    ),
    (
        "model-and-models",
        "model-or-models",
        DPO,
        set_field("model", {"preset": "gpt-tiny"}),
        ["spec.models: set exactly one of spec.model (a job of one model) and spec.models"],
    ),
    (
        "neither-model-nor-models",
        "model-or-models",
        DPO,
        changes(set_field("models", None), set_field("recipe.kind", "pretrain")),
        ["spec.models: set exactly one of spec.model"],
    ),
    (
        "pretrain-with-models",
        "models-need-multi-model-recipe",
        DPO,
        set_field("recipe.kind", "pretrain"),
        ["spec.recipe.kind=pretrain does not fit the spec's models"],
    ),
    (
        "dpo-with-one-model",
        "models-need-multi-model-recipe",
        DPO,
        changes(set_field("models", None), set_field("model", {"preset": "gpt-tiny"})),
        ["spec.recipe.kind=dpo does not fit the spec's models"],
    ),
    (
        "parallelism-with-models",
        "models-leave-parallelism",
        DPO,
        set_field("parallelism", {"tensor": 2}),
        ["set each model's shape under spec.models[i].parallelism"],
    ),
    (
        "repeated-name",
        "model-names-unique",
        DPO,
        set_field("models.1.name", "policy"),
        ["spec.models[i].name must differ", "repeated names=['policy', 'policy']"],
    ),
    (
        "two-trainable",
        "one-trainable-model",
        DPO,
        set_field("models.1.trainable", True),
        ["exactly one of spec.models must be trainable", "['policy', 'reference']"],
    ),
    (
        "none-trainable",
        "one-trainable-model",
        DPO,
        changes(set_field("models.0.trainable", False), set_field("models.0.weights", "/models/a")),
        ["exactly one of spec.models must be trainable", "trainable models=[]"],
    ),
    (
        "frozen-without-weights",
        "frozen-model-needs-weights",
        DPO,
        set_field("models.1.weights", None),
        ["a frozen model (trainable false) needs spec.models[i].weights", "=['reference']"],
    ),
    (
        "ranks-on-one-model",
        "ranks-on-every-model-or-none",
        DPO,
        set_field("models.1.ranks", None),
        ["set spec.models[i].ranks on every model", "models with ranks=['policy']"],
    ),
    (
        "slice-beyond-world",
        "ranks-inside-world",
        DPO,
        set_field("models.1.ranks", {"first": 4, "count": 8}),
        ["lie inside the job's ranks 0..world-1", "=8); models outside=['reference']"],
    ),
    (
        "overlapping-slices",
        "ranks-disjoint",
        DPO,
        set_field("models.1.ranks", {"first": 2, "count": 6}),
        ["must not overlap", "overlapping models=['policy', 'reference']"],
    ),
    (
        "ranks-left-over",
        "ranks-cover-world",
        DPO,
        set_field("models.1.ranks", {"first": 4, "count": 2}),
        ["must together cover every rank of the job: their counts sum=6", "gpusPerNode=8"],
    ),
    (
        "three-models",
        "two-models",
        DISTILL,
        lambda s: s["models"].append({**s["models"][1], "name": "teacher-2"}),
        ["spec.recipe.kind=distill takes exactly two spec.models"],
    ),
    (
        "distill-on-slices",
        "distill-co-located",
        DISTILL,
        changes(
            set_field("models.0.ranks", {"first": 0, "count": 4}),
            set_field("models.1.ranks", {"first": 4, "count": 4}),
        ),
        ["recipe.kind distill runs the student and the teacher on the same ranks"],
    ),
    (
        "tensors-not-nested",
        "distill-tensor-nested",
        DISTILL,
        changes(
            set_field("resources.gpusPerNode", 6),
            set_field("recipe.globalBatchSize", 6),
            set_field("models.0.parallelism", {"tensor": 2}),
            set_field("models.1.parallelism", {"tensor": 3}),
            set_field("models.1.overrides", {**SMALL_QWEN3, "numAttentionHeads": 6}),
            set_field("models.1.overrides.numQueryGroups", 3),
        ),
        ["tensor degrees that divide one another", "tensor=['student=2', 'teacher=3']"],
    ),
    (
        "vocabularies-differ",
        "distill-same-vocabulary",
        DISTILL,
        set_field("models.1.overrides", {**SMALL_QWEN3, "vocabSize": None}),
        ["recipe.kind distill needs one vocabulary", "=['student=512', 'teacher=151936']"],
    ),
    (
        "preference-data-for-distill",
        "preference-data-needs-dpo",
        DISTILL,
        set_field("data", {"type": "preference", "paths": [{"prefix": "/data/pairs"}]}),
        ["spec.recipe.kind=distill cannot read spec.data.type preference"],
    ),
    (
        "dpo-on-text",
        "dpo-needs-preference-data",
        DPO,
        set_field("data", {"type": "indexed", "paths": [{"prefix": "/data/text"}]}),
        ["spec.data.type=indexed holds no preference pairs"],
    ),
    (
        "fused-ce-listed",
        "several-models-without-fused-ce",
        DPO,
        changes(set_field("recipe.fastPath", "ce,norm"), set_field("models.0.parallelism", {})),
        ["spec.recipe.fastPath lists ce", "spec.recipe.kind=dpo needs them"],
    ),
]


def _refused(spec: Spec, change: Callable[[Spec], None]) -> str:
    with pytest.raises(PlanError) as info:
        _plan(spec, change)
    return "\n".join(info.value.problems)


@pytest.mark.parametrize(
    ("spec", "change", "fragments"),
    [c[2:] for c in MODEL_CASES + JOB_CASES],
    ids=[c[0] for c in MODEL_CASES + JOB_CASES],
)
def test_bad_spec_is_refused_naming_the_model_and_field(
    spec: Spec, change: Callable[[Spec], None], fragments: list[str]
) -> None:
    text = _refused(spec, change)
    for fragment in fragments:
        assert fragment in text, f"missing {fragment!r} in:\n{text}"


def test_every_rule_of_several_models_has_a_case() -> None:
    cased = {c[1] for c in MODEL_CASES + JOB_CASES}
    assert {r.name for r in MODEL_RULES + MODELS_RULES} <= cased
    names = [r.name for r in RULES + MODEL_RULES + MODELS_RULES]
    assert len(names) == len(set(names))


def test_job_rules_are_reported_once_not_per_model() -> None:
    text = _refused(DPO, set_field("data", {"type": "preference"}))
    assert text.count("spec.data.paths must list exactly one dataset") == 1


def test_finetune_rule_leaves_the_models_weights_alone() -> None:
    # the reference has weights, the recipe is dpo: no finetune message
    assert _plan(DPO).trainer_config.recipe.kind == "dpo"
    text = _refused(DPO, set_field("recipe.kind", "pretrain"))
    assert "finetune" not in text.replace("pretrain and finetune train", "")


def test_model_parallel_level_refuses_groups_of_several_models_across_pods() -> None:
    scheduling = {"queue": "q", "topology": {"modelParallelLevel": "kubernetes.io/hostname"}}
    spanning = changes(
        set_field("resources", {"nodes": 2, "gpusPerNode": 4}),
        set_field("models.0.ranks", None),
        set_field("models.1.ranks", None),
        set_field("models.0.parallelism", {"pipeline": 2}),
        set_field("scheduling", scheduling),
    )
    text = _refused(DPO, spanning)
    assert "spec.scheduling.topology.modelParallelLevel places the model-parallel groups" in text
    assert "['policy']" in text
    # groups inside a pod: the level asks nothing
    assert _plan(DPO, set_field("scheduling", scheduling)).placement is None


# --------------------------------------------------------------------------- outputs


def test_status_lists_each_models_ranks_and_shape() -> None:
    p = _plan(DPO)
    observed = Observed(generation=1, old_status={}, pytorch_job=None, pods=[])
    status = job_status(observed, p, "mm", Verdict("wait"), 1, "2026-01-01T00:00:00Z")
    assert status["worldSize"] == 8 and status["parallelism"]["tensor"] == 2
    assert [(m["name"], m["trainable"], m["ranks"]) for m in status["models"]] == [
        ("policy", True, "0-3"),
        ("reference", False, "4-7"),
    ]
    assert status["models"][1]["parallelism"]["data"] == 4
    one = job_status(observed, plan(make_job()), "j", Verdict("wait"), 1, "now")
    assert "models" not in one


def test_crd_checks_each_model_and_the_rules_between_them() -> None:
    rules = {v["rule"]: v for v in crd_validations()}
    each = [v for v in rules.values() if v["rule"].startswith("!has(self.models) || self.models")]
    assert any("spec.models[i].parallelism.tensor must divide" in v["message"] for v in each)
    assert all(v["fieldPath"] == ".models" for v in each)
    messages = " ".join(v["message"] for v in rules.values())
    for fragment in ("set exactly one of spec.model", "must be trainable", "must not overlap"):
        assert fragment in messages
    # a preset's numbers and a parsed string: Python only
    assert "one vocabulary" not in messages and "per-token log-probabilities" not in messages


@pytest.fixture
def dpo_file(tmp_path: Path) -> Path:
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(multi_model_job(DPO)))
    return path


def test_validate_prints_each_models_grid(
    dpo_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = dpo_file
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: valid: world=8" in out
    assert "  policy: ranks 0-3, world=4 tensor=2 " in out and "data=2, trainable" in out
    assert "  reference: ranks 4-7, world=4 tensor=1 " in out and "data=4, frozen" in out


def test_render_heads_the_objects_with_each_model_as_comments(
    dpo_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["render", str(dpo_file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# mm: model policy: ranks 0-3, ")
    assert [o["kind"] for o in yaml.safe_load_all(out)] == ["ConfigMap", "PyTorchJob"]


def test_render_matches_golden() -> None:
    job = parse_job(multi_model_job(DPO))
    text = to_yaml(render(job, plan(job)))
    golden = GOLDEN / "multi-model-dpo.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}; run with UPDATE_GOLDEN=1"
    assert text == golden.read_text(), "render output changed for the two-slice DPO job"
