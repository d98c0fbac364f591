"""The generated CRD: checked-in copy matches the models; schema is structural and documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetron_operator.cli.crd import crd, crd_yaml

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "manifests" / "crds" / "kubetron.io_megatronjobs.yaml"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for name, sub in node.get("properties", {}).items():
            out += _walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            out += _walk(node["items"], f"{path}[]")
    return out


def _schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crd_matches_models() -> None:
    assert CHECKED_IN.read_text() == crd_yaml(), (
        "manifests/crds/ is stale: run `make generate` and commit the result"
    )


@pytest.mark.parametrize(
    ("checked_in", "generate"),
    [
        ("manifests/rbac/operator.yaml", "rbac_yaml"),
        ("charts/kubetron/templates/_rbac.tpl", "helm_rules_template"),
        ("charts/kubetron/files/crds/kubetron.io_megatronjobs.yaml", "crd_yaml"),
    ],
)
def test_generated_files_are_current(checked_in: str, generate: str) -> None:
    from kubetron_operator.cli import crd as crd_module
    from kubetron_operator.cli import rbac

    make = getattr(rbac, generate, None) or getattr(crd_module, generate)
    assert (ROOT / checked_in).read_text() == make(), (
        f"{checked_in} is stale: run `make generate` and commit the result"
    )


def test_schema_is_structural() -> None:
    for path, node in _walk(_schema()):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        assert "const" not in node, path  # the API server refuses the CRD (a one-value enum)
        free = node.get("x-kubernetes-preserve-unknown-fields")
        assert node.get("type") or free, f"{path} has no type"


def test_every_spec_field_has_a_description() -> None:
    spec = _schema()["properties"]["spec"]
    missing = [p for p, n in _walk(spec) if p and not p.endswith("[]") and not n.get("description")]
    assert missing == []


def test_names_columns_and_subresource() -> None:
    obj = crd()
    names = obj["spec"]["names"]
    assert (names["kind"], names["shortNames"], names["categories"]) == (
        "MegatronJob",
        ["mj"],
        ["kubetron"],
    )
    version = obj["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == [
        "Phase",
        "World",
        "TP",
        "PP",
        "DP",
        "Step",
        "Loss",
        "Tokens/s",
        "MFU",
        "Val-Loss",
        "ETA(s)",
        "Restarts",
        "Age",
    ]


def test_defaults_enums_and_minimums_reach_the_schema() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    tensor = spec["parallelism"]["properties"]["tensor"]
    assert (tensor["default"], tensor["minimum"]) == (1, 1)
    assert spec["recipe"]["properties"]["precision"]["enum"] == ["bf16", "fp8", "fp32"]
    assert spec["parallelism"]["default"] == {}
    lr = spec["recipe"]["properties"]["optimizer"]["properties"]["lr"]
    assert (lr["minimum"], lr["exclusiveMinimum"]) == (0, True)
    assert "dataParallel" not in spec["parallelism"]["properties"]


def test_cel_rules_name_fields_and_cover_immutability() -> None:
    rules = _schema()["properties"]["spec"]["x-kubernetes-validations"]
    messages = " ".join(r["message"] for r in rules)
    for field in ("parallelism.tensor", "resources.gpusPerNode", "recipe.globalBatchSize"):
        assert field in messages
    immutable = {r["fieldPath"] for r in rules if "immutable" in r["message"]}
    assert ".parallelism" in immutable and ".model" in immutable
    assert not any("suspend" in p for p in immutable)


def test_crd_yaml_round_trips() -> None:
    assert yaml.safe_load(crd_yaml()) == crd()


def test_shape_columns_read_the_resolved_shape() -> None:
    # the trainable model's shape in a job of several models, spec.parallelism's otherwise
    columns = crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    paths = {c["name"]: c["jsonPath"] for c in columns}
    assert [paths[n] for n in ("TP", "PP", "DP")] == [
        ".status.parallelism.tensor",
        ".status.parallelism.pipeline",
        ".status.parallelism.data",
    ]


def test_immutability_of_an_optional_field_reads_it_only_where_set() -> None:
    rules = _schema()["properties"]["spec"]["x-kubernetes-validations"]
    immutable = {r["fieldPath"]: r["rule"] for r in rules if "immutable" in r["message"]}
    assert immutable[".models"] == (
        "has(self.models) == has(oldSelf.models) && "
        "(!has(self.models) || self.models == oldSelf.models)"
    )
    assert immutable[".model"].startswith("has(self.model) == has(oldSelf.model) && ")
    assert immutable[".recipe"] == "self.recipe == oldSelf.recipe"


def test_a_bound_that_is_not_a_whole_number_is_a_cel_rule() -> None:
    recipe = _schema()["properties"]["spec"]["properties"]["recipe"]["properties"]
    smoothing = recipe["dpo"]["properties"]["labelSmoothing"]
    assert "exclusiveMaximum" not in smoothing and "maximum" not in smoothing
    assert smoothing["x-kubernetes-validations"] == [
        {"rule": "self < 0.5", "message": "must be less than 0.5"}
    ]
    beta1 = recipe["optimizer"]["properties"]["adamBeta1"]
    assert (beta1["maximum"], beta1["exclusiveMaximum"]) == (1, True)
