"""Generate the MegatronJob CustomResourceDefinition from the pydantic models.

The API server needs a structural OpenAPI v3 schema: every `$ref` inlined, `anyOf: [X, null]`
turned into X, no `title`, `const` as a one-value `enum`, and JSON-Schema 2020
`exclusiveMinimum` numbers mapped to the OpenAPI 3.0 boolean form. Objects get `default: {}` so
the API server fills nested defaults. The CEL rules come from the one rule table
(`kubetron_api.rules`): each rule that reads no preset number.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from kubetron_api import v1alpha1 as api
from kubetron_api.config import OFF_WHEN_UNSET_KEY
from kubetron_api.model_rules import crd_validations

Schema = dict[str, Any]

_DROP_KEYS = {"title", "additionalProperties", "$defs", OFF_WHEN_UNSET_KEY}

# Everything but runPolicy.suspend is fixed once created: a running job cannot change shape.
IMMUTABLE_FIELDS: tuple[str, ...] = ("model", "models", "recipe", "parallelism", "data")
IMMUTABLE_FIELDS += ("checkpoint", "resources", "scheduling", "metrics", "observability")
IMMUTABLE_FIELDS += ("backend",)  # a running job's pods stay under the one Kubeflow job kind
IMMUTABLE_RUN_POLICY = ("backoffLimit", "cleanPodPolicy")
OPTIONAL_RUN_POLICY = ("activeDeadlineSeconds", "ttlSecondsAfterFinished")


def _unchanged(path: str, optional: bool) -> str:
    """CEL: the field at `path` (under self and oldSelf) did not change; an optional one may not
    appear or go either (reading an absent field is an error in CEL)."""
    same = f"self.{path} == oldSelf.{path}"
    if not optional:
        return same
    return f"has(self.{path}) == has(oldSelf.{path}) && (!has(self.{path}) || {same})"


def _immutability_rules(spec: Schema) -> list[dict[str, str]]:
    hint = "; delete and recreate the MegatronJob to change it (only runPolicy.suspend may change)"
    # spec.model and spec.models: one of them is set, the other absent (no default)
    props, required = spec["properties"], set(spec.get("required", []))
    rules = [
        {
            "rule": _unchanged(f, f not in required and "default" not in props[f]),
            "message": f"spec.{f} is immutable{hint}",
            "fieldPath": f".{f}",
        }
        for f in IMMUTABLE_FIELDS
    ]
    rules += [
        {
            "rule": f"self.runPolicy.{f} == oldSelf.runPolicy.{f}",
            "message": f"spec.runPolicy.{f} is immutable{hint}",
            "fieldPath": f".runPolicy.{f}",
        }
        for f in IMMUTABLE_RUN_POLICY
    ]
    rules += [
        {
            "rule": _unchanged(f"runPolicy.{f}", optional=True),
            "message": f"spec.runPolicy.{f} is immutable{hint}",
            "fieldPath": f".runPolicy.{f}",
        }
        for f in OPTIONAL_RUN_POLICY
    ]
    return rules


def openapi_schema(model: type[api.ApiModel]) -> Schema:
    """The structural OpenAPI v3 schema of a pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(raw, raw.get("$defs", {}))


def _convert(node: Schema, defs: dict[str, Schema]) -> Schema:
    node = _inline(node, defs)
    out: Schema = {}
    off_when_unset = {
        n for n, sub in node.get("properties", {}).items() if sub.get(OFF_WHEN_UNSET_KEY)
    }
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _convert(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "const":  # a one-value Literal: structural schemas have no const
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum" and value != int(value):
            out.setdefault("x-kubernetes-validations", []).append(_below(value))
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        else:
            out[key] = copy.deepcopy(value)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra:
        out["additionalProperties"] = _convert(extra, defs)
    if out.get("type") == "object" and "properties" in out:
        _default_nested_objects(out, off_when_unset)
    return out


def _below(bound: float) -> dict[str, str]:
    """A bound that is not a whole number, as CEL: the API server compares a whole-number value
    (a default of 0.0 arrives as 0) with `maximum` cut to an integer, so `exclusiveMaximum` 0.5
    would refuse 0."""
    return {"rule": f"self < {bound}", "message": f"must be less than {bound}"}


def _inline(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Resolve `$ref` and optional `anyOf: [X, null]`, keeping sibling keys."""
    node = dict(node)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf with {len(options)} options structurally")
        node = {**_inline(options[0], defs), **node}
        if node.get("default", "absent") is None:
            node.pop("default")
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**_inline(target, defs), **node}
    return node


def _default_nested_objects(obj: Schema, off_when_unset: set[str]) -> None:
    """Give optional sub-objects `default: {}` so the API server fills their defaults; not the
    ones marked OFF_WHEN_UNSET, which an object would turn on."""
    required = set(obj.get("required", []))
    for name, prop in obj["properties"].items():
        fillable = prop.get("type") == "object" and "properties" in prop
        fillable = fillable and name not in off_when_unset
        if fillable and name not in required and "default" not in prop and not prop.get("required"):
            prop["default"] = {}


def spec_schema() -> Schema:
    schema = openapi_schema(api.MegatronJobSpec)
    schema["x-kubernetes-validations"] = crd_validations() + _immutability_rules(schema)
    return schema


def _printer_columns() -> list[Schema]:
    def col(name: str, path: str, typ: str = "string", priority: int = 0, desc: str = "") -> Schema:
        c: Schema = {"name": name, "type": typ, "jsonPath": path, "description": desc}
        if priority:
            c["priority"] = priority
        return c

    return [
        col("Phase", ".status.phase", desc="Summary phase"),
        col("World", ".status.worldSize", "integer", desc="Trainer processes"),
        # the resolved shape: the trainable model's in a job of several models
        col("TP", ".status.parallelism.tensor", "integer", desc="Tensor parallel"),
        col("PP", ".status.parallelism.pipeline", "integer", desc="Pipeline parallel"),
        col("DP", ".status.parallelism.data", "integer", desc="Data parallel (derived)"),
        col("Step", ".status.progress.step", "integer", desc="Last training step"),
        col("Loss", ".status.progress.loss", desc="Loss of the last step"),
        col("Tokens/s", ".status.progress.tokensPerSecond", "integer", desc="Throughput"),
        col("MFU", ".status.progress.mfu", priority=1, desc="Model FLOPs utilisation"),
        col("Val-Loss", ".status.progress.validationLoss", priority=1, desc="Validation loss"),
        col("ETA(s)", ".status.progress.etaSeconds", "integer", priority=1, desc="Time left"),
        col("Restarts", ".status.restarts", "integer", priority=1, desc="Whole-group restarts"),
        col("Age", ".metadata.creationTimestamp", "date"),
    ]


def crd() -> Schema:
    """The full CustomResourceDefinition object."""
    root: Schema = {
        "type": "object",
        "description": api.MegatronJob.__doc__ or "",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kubetron.io/v1alpha1"},
            "kind": {"type": "string", "description": "MegatronJob"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": openapi_schema(api.MegatronJobStatus),
        },
    }
    root["description"] = (
        "MegatronJob runs Megatron-Core training as a Kubeflow PyTorchJob: model preset, "
        "recipe, parallel shape (tensor, pipeline, context, expert; data parallel derived) and "
        "resources."
    )
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {
                "app.kubernetes.io/name": "kubetron",
                "app.kubernetes.io/part-of": "kubetron",
            },
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": list(api.CATEGORIES),
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `kubetron crd` from kubetron_api.v1alpha1; do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)
