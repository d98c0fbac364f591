"""The chart's TrainJob backend against a real API server: with Kubeflow Trainer v2's CRDs in
(not its controllers), `helm install --set backend=TrainJob` applies kubetron's
ClusterTrainingRuntime under the name the operator's TrainJobs refer to, and the operator's
ServiceAccount may do, by impersonation, what the operator does to TrainJobs and no more, in
cluster scope and in namespaces scope.

The PyTorchJob rules stay with backend TrainJob: a job keeps the backend it started with, and a
MegatronJob may still ask for spec.backend PyTorchJob.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from devtools.cluster import Cluster
from kubetron_api.parse import parse_job
from kubetron_api.v1alpha1 import Backend
from kubetron_operator.cli.rbac import LEASE_RULES, RULES, TRAINJOB_RULES
from kubetron_operator.plan import plan
from kubetron_operator.render import render
from kubetron_operator.render_trainjob import RUNTIME_NAME, cluster_training_runtime
from tests.builders import job_dict
from tests.chart.helm import CHART, require_helm
from tests.chart.test_cluster import (
    CLUSTER_FORBIDDEN,
    FORBIDDEN,
    can_i,
    ensure_namespace,
    granted,
    helm,
    megatronjob_crd,
    trainer_crds,
    unique,
)

pytestmark = pytest.mark.cluster

__all__ = ["megatronjob_crd", "trainer_crds"]  # fixtures this module uses

# What the operator never does with the TrainJob backend: it never replaces a TrainJob (it applies
# server-side), Trainer v2 runs the TrainJob's status and its JobSet (the operator reads what it
# needs of a running JobSet on the TrainJob, and gets a replaced attempt's by name only to see it
# gone), and the runtime is the chart's, not the operator's.
TRAINJOB_FORBIDDEN = [
    ("update", "trainjobs.trainer.kubeflow.org"),
    ("patch", "trainjobs.trainer.kubeflow.org/status"),
    ("update", "trainjobs.trainer.kubeflow.org/status"),
    ("deletecollection", "trainjobs.trainer.kubeflow.org"),
    *((verb, "jobsets.jobset.x-k8s.io") for verb in ("list", "watch", "create")),
    ("patch", "jobsets.jobset.x-k8s.io"),
    ("delete", "jobsets.jobset.x-k8s.io"),
    ("create", "trainingruntimes.trainer.kubeflow.org"),
    ("patch", "trainingruntimes.trainer.kubeflow.org"),
]
CLUSTER_TRAINJOB_FORBIDDEN = [
    (verb, "clustertrainingruntimes.trainer.kubeflow.org")
    for verb in ("create", "patch", "update", "delete")
]


@pytest.fixture
def trainjob_release(
    cluster: Cluster, namespace: str, megatronjob_crd: None, trainer_crds: None
) -> Iterator[str]:
    """A release name unique to the test, uninstalled afterwards and waited for: its
    ClusterTrainingRuntime is cluster-wide, one name, so the next install must not meet it."""
    require_helm()
    name = unique("kt")
    yield name
    helm(cluster, "uninstall", name, "--namespace", namespace, "--wait", check=False)


def install(cluster: Cluster, namespace: str, release: str, *sets: str) -> None:
    """`helm install` with backend TrainJob. --take-ownership: a cluster reused across test
    runs may hold the runtime another test applied without helm."""
    args = ["--set", f"fullnameOverride={release}", "--set", "crds.install=false"]
    args += ["--set", "backend=TrainJob", *(a for s in sets for a in ("--set", s))]
    helm(cluster, "install", release, str(CHART), "--namespace", namespace, "--take-ownership",
         *args)  # fmt: skip


def rendered_trainjob(namespace: str) -> dict[str, Any]:
    """The TrainJob the operator applies for a small job."""
    obj = job_dict()
    obj["metadata"]["namespace"] = namespace
    job = parse_job(obj)
    (train_job,) = [o for o in render(job, plan(job), default_backend=Backend.TRAINJOB)
                    if o["kind"] == "TrainJob"]  # fmt: skip
    return train_job


def test_backend_trainjob_installs_the_runtime_the_operators_trainjobs_name(
    cluster: Cluster, namespace: str, trainjob_release: str
) -> None:
    install(cluster, namespace, trainjob_release)
    runtime = cluster.get("clustertrainingruntime", RUNTIME_NAME)
    assert runtime is not None, f"no ClusterTrainingRuntime {RUNTIME_NAME}"
    assert runtime["metadata"]["annotations"]["meta.helm.sh/release-name"] == trainjob_release
    generated = cluster_training_runtime()
    assert generated["metadata"]["labels"].items() <= runtime["metadata"]["labels"].items()
    dep = cluster.get("deployment", trainjob_release, namespace)
    assert dep is not None
    assert "--backend=TrainJob" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    # the operator's own TrainJob names that runtime; applied as the operator applies it
    # (server-side, as its ServiceAccount), the CRD takes it and RBAC lets it be created
    train_job = rendered_trainjob(namespace)
    assert train_job["spec"]["runtimeRef"]["name"] == RUNTIME_NAME
    sa = f"system:serviceaccount:{namespace}:{trainjob_release}"
    proc = cluster.kubectl(
        "apply", "--server-side", "--dry-run=server", f"--as={sa}", "--namespace", namespace,
        "-f", "-", input=yaml.safe_dump(train_job), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_cluster_scope_grants_trainjobs_as_the_rules_say_and_no_more(
    cluster: Cluster, namespace: str, trainjob_release: str
) -> None:
    install(cluster, namespace, trainjob_release)
    sa = f"system:serviceaccount:{namespace}:{trainjob_release}"
    elsewhere = unique("other")
    ensure_namespace(cluster, elsewhere)
    try:
        for verb, resource in granted(RULES + TRAINJOB_RULES):
            for ns in (elsewhere, None):  # any namespace, and across all of them
                assert can_i(cluster, sa, verb, resource, ns), f"cannot {verb} {resource} in {ns}"
        for verb, resource in granted(LEASE_RULES):
            assert not can_i(cluster, sa, verb, resource, elsewhere), f"may {verb} {resource}"
        for verb, resource in FORBIDDEN + TRAINJOB_FORBIDDEN:
            assert not can_i(cluster, sa, verb, resource, elsewhere), f"may {verb} {resource}"
        for verb, resource in CLUSTER_FORBIDDEN + CLUSTER_TRAINJOB_FORBIDDEN:
            assert not can_i(cluster, sa, verb, resource, None), f"may {verb} {resource}"
    finally:
        cluster.kubectl("delete", "namespace", elsewhere, "--wait=false", check=False)


def test_namespaces_scope_grants_trainjobs_only_in_the_watched_namespaces(
    cluster: Cluster, namespace: str, trainjob_release: str
) -> None:
    watched, other = unique("team"), unique("other")
    for ns in (watched, other):
        ensure_namespace(cluster, ns)
    try:
        install(cluster, namespace, trainjob_release,
                "rbac.scope=namespaces", f"watchNamespaces={{{watched}}}")  # fmt: skip
        sa = f"system:serviceaccount:{namespace}:{trainjob_release}"
        for verb, resource in granted(RULES + TRAINJOB_RULES):
            assert can_i(cluster, sa, verb, resource, watched), f"cannot {verb} {resource}"
            assert not can_i(cluster, sa, verb, resource, other), f"may {verb} {resource} there"
            assert not can_i(cluster, sa, verb, resource, None), f"may {verb} {resource} anywhere"
        for verb, resource in FORBIDDEN + TRAINJOB_FORBIDDEN:
            assert not can_i(cluster, sa, verb, resource, watched), f"may {verb} {resource}"
        for verb, resource in CLUSTER_TRAINJOB_FORBIDDEN:
            assert not can_i(cluster, sa, verb, resource, None), f"may {verb} {resource}"
    finally:
        for ns in (watched, other):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
