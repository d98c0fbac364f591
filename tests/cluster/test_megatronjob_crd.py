"""kubetron's CRD on a real API server: examples apply, explain and columns, every CEL rule."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.cluster import Cluster
from devtools.cluster.kubetron import EXAMPLES
from kubetron_api.expr import broken, static_message
from kubetron_api.model_rules import (
    MODEL_CEL_PATHS,
    MODEL_SHAPE_RULES,
    MODELS_CEL_PATHS,
    MODELS_RULES,
    model_crd_message,
)
from kubetron_api.parse import parse_job
from kubetron_api.rules import DERIVED, RULES, ShapeSpec, in_crd
from kubetron_operator.plan import PlanError, plan
from tests.unit.test_multi_model_spec import (
    DISTILL,
    DPO,
    JOB_CASES,
    MODEL_CASES,
    Spec,
    multi_model_job,
    set_field,
)

pytestmark = pytest.mark.cluster


def _apply(cluster: Cluster, ns: str, obj: dict[str, Any]) -> tuple[int, str]:
    res = cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj), check=False)
    return res.returncode, res.stdout + res.stderr


def _job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"preset": "qwen3-1.7b"},
        "recipe": {"globalBatchSize": 16, "microBatchSize": 1, "seqLength": 4096},
        "resources": {"nodes": 1, "gpusPerNode": 8},
    }
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value}
    return {
        "apiVersion": "kubetron.io/v1alpha1",
        "kind": "MegatronJob",
        "metadata": {"name": "cel"},
        "spec": base,
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_applies(kubetron: Cluster, namespace: str, path: Path) -> None:
    kubetron.kubectl("apply", "-n", namespace, "-f", str(path))
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    stored = kubetron.get("megatronjob", name, namespace)
    assert stored is not None
    # the API server filled the schema defaults
    assert stored["spec"]["parallelism"]["context"] == 1
    assert stored["spec"]["metrics"]["port"] == 9400


def test_explain_shows_descriptions(kubetron: Cluster) -> None:
    out = kubetron.kubectl("explain", "megatronjob.spec.parallelism").stdout
    assert "data parallel is derived" in out
    assert "Tensor-parallel degree" in out


def test_get_mj_shows_printer_columns(kubetron: Cluster, namespace: str) -> None:
    kubetron.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES[0]))
    header = kubetron.kubectl("get", "mj", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "WORLD", "TP", "PP", "DP", "STEP", "LOSS", "TOKENS/S", "AGE"]
    wide = kubetron.kubectl("get", "kubetron", "-n", namespace, "-o", "wide").stdout
    assert "MFU" in wide.splitlines()[0] and "ETA(S)" in wide.splitlines()[0]
    assert "RESTARTS" in wide.splitlines()[0] and "VAL-LOSS" in wide.splitlines()[0]


# One spec breaking each rule of the table that the CRD carries (kubetron_api.rules): the API
# server must refuse it with the same message the operator's Python check gives.
CEL_CASES: dict[str, dict[str, Any]] = {
    "world-per-model-parallel": {"parallelism": {"pipeline": 3}},
    "world-per-expert-parallel": {"parallelism": {"expert": 3}},
    "virtual-pipeline-needs-pipeline": {"parallelism": {"virtualPipeline": 2}},
    "tensor-inside-node": {"parallelism": {"tensor": 4}, "resources": {"gpusPerNode": 6}},
    "seq-per-context-chunk": {"parallelism": {"context": 2}, "recipe": {"seqLength": 4098}},
    "sequence-parallel-needs-tensor": {"parallelism": {"sequenceParallel": True}},
    "batch-per-data-parallel": {"recipe": {"globalBatchSize": 12}},
    "indexed-data-needs-paths": {"data": {"type": "indexed"}},
    "mock-data-has-no-paths": {"data": {"paths": [{"prefix": "/data/x"}]}},
    "chat-data-has-one-path": {"data": {"type": "chat"}},
    "preference-data-has-one-path": {"data": {"type": "preference"}},
    "huggingface-tokenizer-needs-name": {"data": {"tokenizer": {"type": "huggingface"}}},
    "finetune-needs-weights": {"recipe": {"kind": "finetune"}},
    "cpu-needs-fp32": {"resources": {"device": "cpu"}, "recipe": {"precision": "bf16"}},
    "cpu-pipeline": {
        "resources": {"device": "cpu"},
        "recipe": {"precision": "fp32"},
        "parallelism": {"pipeline": 2},
    },
    "cpu-sequence-parallel": {
        "resources": {"device": "cpu"},
        "recipe": {"precision": "fp32"},
        "parallelism": {"tensor": 2, "sequenceParallel": True},
    },
    "cpu-recompute": {
        "resources": {"device": "cpu"},
        "recipe": {"precision": "fp32", "recomputeLayers": 1},
    },
    "eval-needs-validation-split": {"recipe": {"eval": {}}, "data": {"split": "99,0,1"}},
    "eval-runs": {"recipe": {"eval": {"atEnd": False}}},
    "eval-needs-one-model": {"recipe": {"kind": "dpo", "eval": {}}},
    "lora-needs-finetune": {"recipe": {"peft": {"type": "lora"}}},
    "lora-needs-one-model": {"recipe": {"kind": "dpo", "peft": {"type": "lora"}}},
}


def test_every_crd_rule_has_a_case() -> None:
    assert set(CEL_CASES) == {rule.name for rule in RULES if in_crd(rule)}


@pytest.mark.parametrize("name", sorted(CEL_CASES))
def test_cel_rule_refuses_with_the_python_message(
    kubetron: Cluster, namespace: str, name: str
) -> None:
    job = _job(**CEL_CASES[name])
    rule = next(r for r in RULES if r.name == name)
    spec = parse_job(job).spec
    values = ShapeSpec.of_job(spec).values()
    [message] = broken((rule,), values, DERIVED)  # the case breaks this rule
    with pytest.raises(PlanError) as info:
        plan(parse_job(job))
    assert message in info.value.problems
    code, out = _apply(kubetron, namespace, job)
    assert code != 0, out
    # The API server shows "<fieldPath>: Invalid value: ...: <message>", the message without
    # the values the Python one shows.
    assert f"{rule.field}: Invalid value" in out, out
    assert static_message(rule.message) in out, (message, out)
    assert kubetron.get("megatronjob", "cel", namespace) is None


SCHEMA_CASES = [
    ("schema-minimum", {"parallelism": {"tensor": 0}}, "spec.parallelism.tensor"),
    (
        "schema-unknown-field",
        {"parallelism": {"tensr": 2}},
        'unknown field "spec.parallelism.tensr"',
    ),
]


@pytest.mark.parametrize(
    ("spec", "message"), [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES]
)
def test_schema_rejects_bad_spec(
    kubetron: Cluster,
    namespace: str,
    spec: dict[str, Any],
    message: str,
) -> None:
    code, out = _apply(kubetron, namespace, _job(**spec))
    assert code != 0, out
    assert message in out, out
    assert kubetron.get("megatronjob", "cel", namespace) is None


def test_valid_base_spec_is_accepted(kubetron: Cluster, namespace: str) -> None:
    code, out = _apply(kubetron, namespace, _job())
    assert code == 0, out


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("parallelism", "tensor"), 2, "spec.parallelism is immutable"),
        (("model", "preset"), "qwen3-4b", "spec.model is immutable"),
        (("resources", "nodes"), 2, "spec.resources is immutable"),
        (("runPolicy", "backoffLimit"), 9, "spec.runPolicy.backoffLimit is immutable"),
    ],
)
def test_update_of_immutable_field_is_rejected(
    kubetron: Cluster,
    namespace: str,
    path: tuple[str, str],
    value: Any,
    message: str,
) -> None:
    job = _job(recipe={"globalBatchSize": 32})
    assert _apply(kubetron, namespace, job)[0] == 0
    changed = copy.deepcopy(job)
    changed["spec"].setdefault(path[0], {})[path[1]] = value
    code, out = _apply(kubetron, namespace, changed)
    assert code != 0 and message in out, out


def test_suspend_may_change(kubetron: Cluster, namespace: str) -> None:
    job = _job()
    assert _apply(kubetron, namespace, job)[0] == 0
    patch = json.dumps({"spec": {"runPolicy": {"suspend": True}}})
    kubetron.kubectl("patch", "mj", "cel", "-n", namespace, "--type", "merge", "-p", patch)
    stored = kubetron.get("megatronjob", "cel", namespace)
    assert stored is not None and stored["spec"]["runPolicy"]["suspend"] is True


# --------------------------------------------------------------------------- spec.models


def _models_job(spec: Spec, change: Any = None) -> dict[str, Any]:
    job = multi_model_job(spec, change)
    job["metadata"] = {"name": "cel"}
    return job


@pytest.mark.parametrize("spec", [DPO, DISTILL], ids=["dpo", "distill"])
def test_multi_model_spec_is_accepted_with_each_models_defaults(
    kubetron: Cluster, namespace: str, spec: Spec
) -> None:
    code, out = _apply(kubetron, namespace, _models_job(spec))
    assert code == 0, out
    stored = kubetron.get("megatronjob", "cel", namespace)
    assert stored is not None and "model" not in stored["spec"]
    first = stored["spec"]["models"][0]
    assert first["trainable"] is True and first["parallelism"]["context"] == 1


# One multi-model spec breaking each rule the CRD carries for spec.models (each model's rules,
# CEL over the list, and the rules between the models): the unit tests' cases.
MODEL_CEL_CASES = {
    rule: (spec, change)
    for _, rule, spec, change, _ in reversed(MODEL_CASES + JOB_CASES)  # each rule's first case
    if rule in {r.name for r in MODEL_SHAPE_RULES if in_crd(r, MODEL_CEL_PATHS)}
    or rule in {r.name for r in MODELS_RULES if in_crd(r, MODELS_CEL_PATHS)}
}


def test_every_crd_rule_of_several_models_has_a_case() -> None:
    carried = {r.name for r in MODEL_SHAPE_RULES if in_crd(r, MODEL_CEL_PATHS)}
    carried |= {r.name for r in MODELS_RULES if in_crd(r, MODELS_CEL_PATHS)}
    assert set(MODEL_CEL_CASES) == carried


@pytest.mark.parametrize("name", sorted(MODEL_CEL_CASES))
def test_cel_refuses_a_bad_multi_model_spec_naming_the_field(
    kubetron: Cluster, namespace: str, name: str
) -> None:
    spec, change = MODEL_CEL_CASES[name]
    job = _models_job(spec, change)
    with pytest.raises(PlanError):  # the operator's Python check refuses it too
        plan(parse_job(job))
    code, out = _apply(kubetron, namespace, job)
    assert code != 0, out
    assert kubetron.get("megatronjob", "cel", namespace) is None
    between = next((r for r in MODELS_RULES if r.name == name), None)
    if between is not None:
        field, message = between.field, between.message
    else:
        rule = next(r for r in MODEL_SHAPE_RULES if r.name == name)
        field, message = "spec.models", model_crd_message(rule)
    assert f"{field}: Invalid value" in out, out
    assert static_message(message) in out, out


def test_models_are_immutable(kubetron: Cluster, namespace: str) -> None:
    job = _models_job(DPO)
    assert _apply(kubetron, namespace, job)[0] == 0
    changed = _models_job(DPO, set_field("models.1.weights", "/models/other"))
    code, out = _apply(kubetron, namespace, changed)
    assert code != 0 and "spec.models is immutable" in out, out
