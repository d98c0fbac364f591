"""The chart's TrainJob backend: the `backend` value reaches the operator, and only where the
backend is on does the chart ship kubetron's ClusterTrainingRuntime and grant TrainJobs."""

from __future__ import annotations

import pytest

from kubetron_operator.cli.rbac import RULES, TRAINJOB_RULES
from kubetron_operator.render_trainjob import cluster_training_runtime
from tests.chart.helm import Obj, find, one, template, template_error

RUNTIME = "ClusterTrainingRuntime"


def _operator_args(objs: list[Obj]) -> list[str]:
    (operator,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return list(operator["args"])


def test_by_default_no_runtime_no_trainjob_rbac_and_the_pytorchjob_backend() -> None:
    objs = template()
    assert not find(objs, RUNTIME)
    assert one(objs, "ClusterRole")["rules"] == RULES
    assert "--backend=PyTorchJob" in _operator_args(objs)


@pytest.mark.parametrize(
    ("sets", "flag"),
    [
        ({"backend": "TrainJob"}, "--backend=TrainJob"),
        ({"trainJob.enabled": "true"}, "--backend=PyTorchJob"),
    ],
)
def test_the_trainjob_backend_ships_the_runtime_and_its_rbac(
    sets: dict[str, str], flag: str
) -> None:
    objs = template(sets=sets)
    runtime = one(objs, RUNTIME)
    generated = cluster_training_runtime()
    assert runtime["spec"] == generated["spec"]
    assert runtime["metadata"]["name"] == generated["metadata"]["name"]
    assert generated["metadata"]["labels"].items() <= runtime["metadata"]["labels"].items()
    assert runtime["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert one(objs, "ClusterRole")["rules"] == RULES + TRAINJOB_RULES
    assert flag in _operator_args(objs)


def test_namespace_scoped_roles_grant_trainjobs_too() -> None:
    sets = {"backend": "TrainJob", "rbac.scope": "namespaces", "watchNamespaces[0]": "ml"}
    roles = [r for r in find(template(sets=sets), "Role") if r["metadata"]["namespace"] == "ml"]
    assert [r["rules"] for r in roles] == [RULES + TRAINJOB_RULES]


def test_an_unknown_backend_is_refused_by_the_schema() -> None:
    assert "backend" in template_error(sets={"backend": "MPIJob"})
