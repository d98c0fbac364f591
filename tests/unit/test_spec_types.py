"""A MegatronJob is read as the API server reads it: strict JSON types, null as an absent field,
camelCase names only (kubetron_api.base, kubetron_api.parse). The cluster tier
(tests/cluster/test_validate_agrees.py) checks the same against a real API server."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from kubetron_api.config import ParallelismSpec, TrainerConfig
from kubetron_api.parse import SpecError, parse_job
from kubetron_api.v1alpha1 import MegatronJob
from kubetron_operator.plan import plan
from kubetron_operator.render import config_json
from tests.unit.test_multi_model_spec import DPO, multi_model_job

JOB: dict[str, Any] = {
    "apiVersion": "kubetron.io/v1alpha1",
    "kind": "MegatronJob",
    "metadata": {"name": "types"},
    "spec": {
        "model": {"preset": "gpt-tiny"},
        "recipe": {
            "trainIters": 30,
            "seqLength": 64,
            "precision": "fp32",
            "optimizer": {"lr": 0.001},
        },
        "resources": {"device": "cpu", "nodes": 1, "gpusPerNode": 2, "podLabels": {"a": "b"}},
        "runPolicy": {"suspend": False},
    },
}


def _with(path: str, value: Any, job: dict[str, Any] = JOB) -> dict[str, Any]:
    out = copy.deepcopy(job)
    *head, last = path.split(".")
    node = out["spec"]
    for key in head:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[last] = value
    return out


def _problems(obj: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_job(obj)
    return info.value.problems


# The coercions plain pydantic makes and the API server refuses, each with its message.
REFUSED = [
    ("recipe.trainIters", "4", "expected an integer, got the string '4' (write 4 without quotes)"),
    ("recipe.trainIters", True, "expected an integer, got the boolean true"),
    ("recipe.trainIters", 2.5, "expected an integer, got the number 2.5"),
    ("recipe.trainIters", 2**63, "expected a 64-bit integer, got 9223372036854775808"),
    ("recipe.trainIters", 1e19, "expected an integer, got the number 1e+19"),
    ("recipe.trainIters", [4], "expected an integer, got a list"),
    ("recipe.optimizer.lr", "0.1", "expected a number, got the string '0.1' (write 0.1 without"),
    ("recipe.optimizer.lr", False, "expected a number, got the boolean false"),
    ("recipe.optimizer.lr", float("inf"), "expected a finite number, got inf"),
    ("runPolicy.suspend", "true", "expected a boolean, got the string 'true' (write true without"),
    ("runPolicy.suspend", 1, "expected a boolean, got the number 1"),
    ("resources.image", 5, "expected a string, got the number 5 (quote it: '5')"),
    ("recipe.precision", True, "expected a string, got the boolean true"),
    ("recipe", "x", "expected an object (a mapping), got the string 'x'"),
    ("resources.tolerations", {"a": 1}, "expected a list, got an object (a mapping)"),
]


@pytest.mark.parametrize(("path", "value", "message"), REFUSED)
def test_a_value_of_the_wrong_json_type_is_refused_naming_the_field(
    path: str, value: Any, message: str
) -> None:
    [problem] = _problems(_with(path, value))
    assert problem.startswith(f"spec.{path}: {message}"), problem


def test_a_field_of_a_model_of_several_names_its_place() -> None:
    job = multi_model_job(DPO)
    [problem] = _problems(_with("models.1.parallelism.tensor", "2", job))
    assert problem == (
        "spec.models[1].parallelism.tensor: expected an integer, got the string '2' "
        "(write 2 without quotes)"
    )


@pytest.mark.parametrize("value", [2.0, 1e18, -0.0])
def test_a_whole_number_is_an_integer_as_kubectl_sends_it(value: float) -> None:
    spec = parse_job(_with("recipe.seed", value)).spec
    assert spec.recipe.seed == int(value) and isinstance(spec.recipe.seed, int)


def test_a_number_field_takes_an_integer() -> None:
    assert parse_job(_with("recipe.optimizer.lr", 1)).spec.recipe.optimizer.lr == 1.0


@pytest.mark.parametrize(
    ("path", "read"),
    [
        ("recipe.trainIters", lambda j: j.spec.recipe.train_iters == 100),
        ("runPolicy", lambda j: j.spec.run_policy.backoff_limit == 3),
        ("resources.cpu", lambda j: j.spec.resources.cpu is None),
        ("recipe.peft", lambda j: j.spec.recipe.peft is None),
        ("model.overrides", lambda j: j.spec.model.overrides.num_layers is None),
    ],
)
def test_null_is_an_absent_field_given_its_default(path: str, read: Any) -> None:
    assert read(parse_job(_with(path, None)))


def test_a_null_in_a_map_of_strings_is_dropped_and_kept_in_a_free_form_object() -> None:
    job = _with("resources.podLabels", {"a": None, "b": "c"})
    job = _with("resources.affinity", {"nodeAffinity": None}, job)
    res = parse_job(job).spec.resources
    assert res.pod_labels == {"b": "c"}
    assert res.affinity == {"nodeAffinity": None}


def test_a_null_model_is_an_absent_one() -> None:
    job = parse_job(_with("model", None))
    assert job.spec.model is None  # the rules then ask for spec.model or spec.models


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("resources.tolerations", [None], "spec.resources.tolerations[0]: Input should be"),
        ("parallelism.tensr", None, "spec.parallelism.tensr: Extra inputs are not permitted"),
        ("recipe.train_iters", 5, "spec.recipe.train_iters: Extra inputs are not permitted"),
    ],
)
def test_a_null_in_a_list_an_unknown_field_and_a_snake_case_name_are_refused(
    path: str, value: Any, message: str
) -> None:
    [problem] = _problems(_with(path, value))
    assert problem.startswith(message), problem
    if "Extra" in message:
        assert "the MegatronJob schema has no field of this name" in problem


def test_python_callers_keep_snake_case_names() -> None:
    assert ParallelismSpec(virtual_pipeline=2).virtual_pipeline == 2
    assert MegatronJob.model_validate(_with("runPolicy", {"backoff_limit": 5})).spec


@pytest.mark.parametrize("job", [JOB, multi_model_job(DPO)], ids=["one-model", "dpo"])
def test_the_trainer_reads_back_the_config_the_operator_writes(job: dict[str, Any]) -> None:
    written = plan(parse_job(job)).trainer_config
    # as kubetron_trainer.__main__.load_config reads the ConfigMap
    assert TrainerConfig.model_validate(json.loads(config_json(written))) == written
