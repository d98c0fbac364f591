"""`kubetron validate` and the API server agree on every MegatronJob spec: a property test.

Hypothesis mutates the examples (manifests/examples/, jobs of one model and of several) at the
field paths of the CRD's schema: a value of every wrong JSON type (string, boolean, whole and
fractional number, list, object, null), numbers at and beyond each bound and the 64-bit edges,
each enum's values and a wrong one, an unknown or snake_case field, a field removed. Each spec is
created once with a dry run (fieldValidation Strict, what `kubectl apply` sends) through one
reused client, and the server's verdict (accepted or refused) must be validate's.

What is compared is what the API server can know. validate is `parse_job` (the schema) then
`plan` (every rule); the server has the same schema and, as CEL, the rules that read no preset
number (`kubetron_api.rules.in_crd`). A rule on a preset's numbers (heads per tensor degree,
layers per stage, ...) and the rules outside the rule table (volumes, topology) exist in
validate alone, so a spec breaking only those is refused by validate and created by the server,
by design. The verdict compared is therefore `server_knowable_problems`: parse_job's problems,
else those of exactly the rules the CRD carries, evaluated by the one rule table in Python. That
it is validate's own verdict on this level is checked too: whenever it refuses, `plan` refuses.
metadata is not mutated: the API server checks it and validate does not read it.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client as k8s

from devtools.cluster import Cluster
from devtools.cluster.kubetron import EXAMPLES
from kubetron_api.expr import broken
from kubetron_api.model_rules import (
    MODEL_CEL_PATHS,
    MODEL_SHAPE_RULES,
    MODELS_CEL_PATHS,
    MODELS_RULES,
    model_shape,
    models_values,
)
from kubetron_api.parse import SpecError, parse_job
from kubetron_api.rules import DERIVED, RULES, ShapeSpec, in_crd, reads_model
from kubetron_api.v1alpha1 import GROUP, PLURAL, VERSION, MegatronJobSpec
from kubetron_operator.cli.crd import crd
from kubetron_operator.plan import PlanError, plan

pytestmark = pytest.mark.cluster

SPECS = 2200  # generated specs, each one dry-run create
Path = tuple[str | int, ...]
Schema = dict[str, Any]

# --------------------------------------------------------------------------- validate's verdict

ONE_MODEL = tuple(r for r in RULES if in_crd(r))
JOB_WIDE = tuple(r for r in ONE_MODEL if not reads_model(r))
EACH_MODEL = tuple(r for r in MODEL_SHAPE_RULES if in_crd(r, MODEL_CEL_PATHS))
BETWEEN_MODELS = tuple(r for r in MODELS_RULES if in_crd(r, MODELS_CEL_PATHS))


def crd_rule_problems(spec: MegatronJobSpec) -> list[str]:
    """The problems of the rules the CRD carries as CEL, as the CRD applies them: the one-model
    rules on a job of one model (those on the job alone on any job), each model's rules on every
    model of spec.models, and the rules between the models."""
    problems: list[str] = []
    if spec.models:
        shapes = [model_shape(spec, m)[0] for m in spec.models]
        for shape in shapes:
            problems += broken(EACH_MODEL, shape.values(), DERIVED)
        problems += broken(JOB_WIDE, shapes[0].values(), DERIVED)
    elif spec.model is not None:
        problems += broken(ONE_MODEL, ShapeSpec.of_job(spec).values(), DERIVED)
    return problems + broken(BETWEEN_MODELS, models_values(spec), DERIVED)


def server_knowable_problems(obj: dict[str, Any]) -> list[str]:
    """validate's problems that the API server can know: the schema's, else the CRD rules'."""
    try:
        job = parse_job(obj)
    except SpecError as err:
        return err.problems
    return crd_rule_problems(job.spec)


def validate_refuses(obj: dict[str, Any]) -> bool:
    """`kubetron validate`'s whole verdict (parse_job, then plan)."""
    try:
        plan(parse_job(obj))
    except (SpecError, PlanError):
        return True
    return False


# --------------------------------------------------------------------------- the server's


def as_kubectl_sends(value: Any) -> Any:
    """`value` as kubectl encodes it (Go's encoding/json): a float with no fraction below 1e21
    is written without one (2.0 as 2), so the API server reads it as an integer."""
    if isinstance(value, dict):
        return {k: as_kubectl_sends(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_kubectl_sends(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    return value


def server_refuses(api: k8s.CustomObjectsApi, ns: str, obj: dict[str, Any]) -> tuple[bool, str]:
    """A dry-run create as `kubectl apply` sends it: (refused, the server's message)."""
    try:
        api.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, as_kubectl_sends(obj), dry_run="All",
            field_validation="Strict",
        )  # fmt: skip
    except k8s.ApiException as err:
        if err.status not in (400, 422):  # Invalid, or BadRequest (strict decoding)
            raise
        return True, str(json.loads(err.body or "{}").get("message", err.body))
    return False, ""


# --------------------------------------------------------------------------- the specs


def _spec_schema() -> Schema:
    root = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec: Schema = root["properties"]["spec"]
    return spec


def field_paths(schema: Schema, at: Path = ()) -> Iterator[tuple[Path, Schema]]:
    """Every field of the schema under spec, a list's items as its first; free-form objects
    (x-kubernetes-preserve-unknown-fields) as one field."""
    for name, sub in schema.get("properties", {}).items():
        path = (*at, name)
        yield path, sub
        if sub.get("type") == "object" and "properties" in sub:
            yield from field_paths(sub, path)
        items = sub.get("items", {})
        if sub.get("type") == "array" and "properties" in items:
            yield (*path, 0), items
            yield from field_paths(items, (*path, 0))


FIELDS: list[tuple[Path, Schema]] = list(field_paths(_spec_schema()))
OBJECTS: list[Path] = [()] + [p for p, s in FIELDS if "properties" in s]
BASES: list[dict[str, Any]] = [
    doc
    for path in EXAMPLES
    for doc in yaml.safe_load_all(path.read_text())
    if doc and doc.get("kind") == "MegatronJob"
]

INT64 = 2**63
WRONG_TYPES = st.sampled_from(
    ["4", "true", "x", "", True, False, 0, 2, -1, 2.0, 2.5, 1e15, 1e18, [1], [], {"a": 1}, {}, None]
)


def bound_values(schema: Schema) -> st.SearchStrategy[Any]:
    """Values at and beyond a field's bounds and enum: what the rules and ranges decide on."""
    typ = schema.get("type")
    values: list[Any] = list(schema.get("enum", []))
    if typ in ("integer", "number"):
        for key in ("minimum", "maximum"):
            if key in schema:
                bound = schema[key]
                values += [bound - 1, bound, bound + 1, bound - 0.5, bound + 0.5]
        values += [0, 1, 2, 3, 4, 8, 16, INT64 - 1, INT64, -INT64, -INT64 - 1, 2**53 - 1.0]
        if typ == "number":
            values += [0.1, 0.5, 0.99, 1e300]
    elif typ == "string":
        values += ["", "x", "fp32", "99,1,0", "99,0,1", "/data/x", "500m", "1Gi", "a" * 70]
        if "maxLength" in schema:
            values += ["a" * schema["maxLength"], "a" * (schema["maxLength"] + 1)]
    elif typ == "boolean":
        values += [True, False]
    if not values:
        return WRONG_TYPES
    return st.sampled_from(values)


@dataclass
class Mutation:
    """One change to a spec, shown in a disagreement's report."""

    kind: str
    path: Path
    value: Any = None

    def apply(self, spec: dict[str, Any]) -> None:
        """Change `spec` in place, making the objects and lists on the way where missing."""
        *head, last = self.path
        node: Any = spec
        for key, nxt in zip(head, self.path[1:], strict=False):
            kind = list if isinstance(nxt, int) else dict
            if isinstance(node, list):  # key is 0
                if not node or not isinstance(node[0], kind):
                    node[:1] = [kind()]
            elif not isinstance(node.get(key), kind):
                node[key] = kind()
            node = node[key]
        if isinstance(node, list) and not node:
            node.append({})
        if self.kind != "remove":
            node[last] = copy.deepcopy(self.value)
        elif isinstance(node, dict):
            node.pop(last, None)
        else:
            node.clear()


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["wrong-type", "bound", "bound", "unknown", "remove"]))
    if kind == "unknown":
        at = draw(st.sampled_from(OBJECTS))
        name = draw(st.sampled_from(["bogus", "train_iters", "tensr", "gpus_per_node", "Tensor"]))
        return Mutation(kind, (*at, name), draw(st.sampled_from([1, "x", None, {}])))
    path, schema = draw(st.sampled_from(FIELDS))
    if kind == "remove":
        return Mutation(kind, path)
    value = draw(WRONG_TYPES if kind == "wrong-type" else bound_values(schema))
    return Mutation(kind, path, value)


@dataclass
class Tally:
    specs: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    disagreements: list[str] = field(default_factory=list)


def _report(obj: dict[str, Any], changes: list[Mutation], server: str, ours: list[str]) -> str:
    shown = ", ".join(f"{m.kind} {'.'.join(map(str, m.path))}={m.value!r}" for m in changes)
    return (
        f"mutations: {shown}\nserver: {'refused: ' + server if server else 'accepted'}\n"
        f"validate: {'refused: ' + '; '.join(ours) if ours else 'accepted'}\n"
        f"spec: {json.dumps(obj['spec'], sort_keys=True)}"
    )


def test_validate_agrees_with_the_api_server(kubetron: Cluster, namespace: str) -> None:
    api_client = kubetron.api_client()
    api = k8s.CustomObjectsApi(api_client)
    tally = Tally()
    started = time.monotonic()

    @settings(
        max_examples=SPECS,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(BASES), st.lists(mutations(), min_size=1, max_size=3))
    def check(base: dict[str, Any], changes: list[Mutation]) -> None:
        obj = copy.deepcopy(base)
        obj["metadata"] = {"name": "agree"}
        for change in changes:
            change.apply(obj["spec"])
        ours = server_knowable_problems(obj)
        refused, message = server_refuses(api, namespace, obj)
        tally.specs += 1
        tally.verdicts[f"server {'refused' if refused else 'accepted'}"] += 1
        if refused != bool(ours):
            tally.disagreements.append(_report(obj, changes, message, ours))
        elif ours and not validate_refuses(obj):
            tally.disagreements.append("plan accepts: " + _report(obj, changes, message, ours))

    with api_client:
        check()
    took = time.monotonic() - started
    print(f"{tally.specs} specs in {took:.0f} s: {dict(tally.verdicts)}")
    assert tally.specs >= 2000
    # both verdicts well represented: the mutations reach past the schema into the CEL rules
    assert min(tally.verdicts.values()) >= tally.specs // 10, tally.verdicts
    assert not tally.disagreements, (
        f"{len(tally.disagreements)} of {tally.specs} specs disagree:\n\n"
        + "\n\n".join(tally.disagreements[:20])
    )


def test_an_unknown_field_is_refused_as_kubectl_apply_refuses_it(
    kubetron: Cluster, namespace: str
) -> None:
    """The CRD prunes an unknown field silently for a client that asks no field validation;
    kubectl apply asks Strict, and the API server refuses it there, as validate does."""
    obj = copy.deepcopy(BASES[0])
    obj["metadata"] = {"name": "agree"}
    obj["spec"]["parallelism"]["tensr"] = 2
    assert any("spec.parallelism.tensr: Extra inputs" in p for p in server_knowable_problems(obj))
    with kubetron.api_client() as api_client:
        api = k8s.CustomObjectsApi(api_client)
        refused, message = server_refuses(api, namespace, obj)
        assert refused and 'unknown field "spec.parallelism.tensr"' in message, message
        pruned = api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, obj, dry_run="All"
        )
    assert isinstance(pruned, dict) and "tensr" not in pruned["spec"]["parallelism"]
