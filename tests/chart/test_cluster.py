"""The chart against a real API server: server-side dry runs, `helm install`, the schema at
install time, the CRD's keep policy, and the ServiceAccount's permissions by impersonation.

The monitoring.coreos.com CRDs come from tests/chart/monitoring.py (a strict subset of
prometheus-operator's schema), installed for real so the dry run can check the monitors.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.cluster import KUEUE_CRDS, Cluster, trainer_v2
from kubetron_operator.cli.rbac import LEASE_RULES, RULES, TRAINJOB_RULES
from tests.chart.helm import CHART, CI_VALUES, REPO_ROOT, load_all, require_helm, run_helm
from tests.chart.monitoring import monitoring_crds

pytestmark = pytest.mark.cluster

CRD_NAME = "megatronjobs.kubetron.io"


def helm(c: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_helm("--kubeconfig", str(c.kubeconfig), *args, check=check)


def ensure_namespace(c: Cluster, name: str) -> None:
    if c.get("namespace", name) is None:
        c.kubectl("create", "namespace", name)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def monitoring(cluster: Cluster) -> None:
    """The minimal ServiceMonitor/PodMonitor CRDs, established."""
    cluster.apply(monitoring_crds())
    for crd in monitoring_crds():
        cluster.kubectl(
            "wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}", "--timeout=60s"
        )


@pytest.fixture(scope="module")
def megatronjob_crd(cluster: Cluster) -> None:
    """The MegatronJob CRD, and Kueue's Workload CRD (its queued jobs' RBAC): kubectl must
    resolve megatronjobs.kubetron.io and workloads.kueue.x-k8s.io for `auth can-i`."""
    cluster.apply(REPO_ROOT / "manifests" / "crds" / "kubetron.io_megatronjobs.yaml")
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    cluster.install_crds([cluster.bin_dir / KUEUE_CRDS / "kueue.x-k8s.io_workloads.yaml"])


@pytest.fixture(scope="module")
def trainer_crds(cluster: Cluster) -> None:
    """Kubeflow Trainer v2's CRDs (TrainJob, the training runtimes) and JobSet's, without their
    controllers: the chart's ClusterTrainingRuntime needs its CRD to apply, and `auth can-i`
    must resolve trainjobs.trainer.kubeflow.org and jobsets.jobset.x-k8s.io."""
    cluster.install_crds(sorted((cluster.bin_dir / trainer_v2.CRDS).glob("*.yaml")))


@pytest.fixture
def release(cluster: Cluster, namespace: str, megatronjob_crd: None) -> Iterator[str]:
    """A release name unique to the test; uninstalled afterwards (cluster objects included)."""
    require_helm()
    name = unique("kt")
    yield name
    helm(cluster, "uninstall", name, "--namespace", namespace, "--wait=false", check=False)


# --------------------------------------------------------------------------- dry run


@pytest.mark.parametrize("values", [[], [CI_VALUES]], ids=["default-values", "ci-values"])
def test_rendered_chart_passes_server_side_dry_run(
    cluster: Cluster,
    namespace: str,
    monitoring: None,
    values: list[Path],
) -> None:
    args = [a for v in values for a in ("--values", str(v))]
    for v in values:  # the namespaces a values file grants access to must exist
        for ns in yaml.safe_load(v.read_text()).get("watchNamespaces", []):
            ensure_namespace(cluster, ns)
    kube_version = cluster.kubectl("version", "-o", "json").stdout
    server = yaml.safe_load(kube_version)["serverVersion"]["gitVersion"]
    rendered = run_helm(
        "template", "kubetron", str(CHART), "--namespace", namespace,
        "--kube-version", server, "--set", "crds.install=true", *args,
    ).stdout  # fmt: skip
    kinds = {o["kind"] for o in load_all(rendered)}
    if values:
        assert {"ServiceMonitor", "PodMonitor", "PodDisruptionBudget"} <= kinds
    proc = cluster.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-", input=rendered, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "deployment.apps/" in proc.stdout and "(server dry run)" in proc.stdout


def test_dry_run_catches_a_misspelled_monitor_field(
    cluster: Cluster,
    namespace: str,
    monitoring: None,
) -> None:
    """The stand-in CRDs are strict: the dry run above could fail, it is not a formality."""
    rendered = run_helm(
        "template", "kubetron", str(CHART), "--namespace", namespace,
        "--kube-version", "v1.33.0", "--set", "metrics.podMonitor.enabled=true",
        "--show-only", "templates/podmonitor.yaml",
    ).stdout  # fmt: skip
    broken = rendered.replace("honorLabels:", "honourLabels:")
    assert broken != rendered
    proc = cluster.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-", input=broken, check=False
    )
    assert proc.returncode != 0 and "honourLabels" in proc.stderr


# --------------------------------------------------------------------------- install


def test_helm_install_creates_the_configured_objects(
    cluster: Cluster,
    namespace: str,
    monitoring: None,
    release: str,
) -> None:
    watched = [unique("team"), unique("team")]
    for ns in watched:
        ensure_namespace(cluster, ns)
    proc = helm(
        cluster, "install", release, str(CHART), "--namespace", namespace,
        "--values", str(CI_VALUES),
        "--set", f"fullnameOverride={release}",
        "--set", f"watchNamespaces={{{','.join(watched)}}}",
        "--set", "crds.install=false",  # the session's CRD is shared; see the CRD test
    )  # fmt: skip
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {namespace} rollout status deployment/{release}" in notes
    assert f"kubectl -n {namespace} get lease {release}" in notes
    assert f"get podmonitor {release}-trainer" in notes

    dep = cluster.get("deployment", release, namespace)
    assert dep is not None
    assert dep["spec"]["replicas"] == 2
    ctr = dep["spec"]["template"]["spec"]["containers"][0]
    assert ctr["image"] == "registry.example.com/kubetron/operator:0.1.0-ci"
    assert "--leader-elect" in ctr["args"]
    assert f"--namespaces={','.join(watched)}" in ctr["args"]
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == release
    assert cluster.get("serviceaccount", release, namespace) is not None
    for ns in watched:
        role = cluster.get("role", release, ns)
        assert role is not None and role["rules"] == RULES
        assert cluster.get("rolebinding", release, ns) is not None
    lease_role = cluster.get("role", f"{release}-leader-election", namespace)
    assert lease_role is not None and lease_role["rules"] == LEASE_RULES
    assert cluster.get("clusterrole", release) is None
    assert cluster.get("service", f"{release}-metrics", namespace) is not None
    monitor = cluster.get("servicemonitor", release, namespace)
    assert monitor is not None
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pod_monitor = cluster.get("podmonitor", f"{release}-trainer", namespace)
    assert pod_monitor is not None
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": watched}
    dashboard = cluster.get("configmap", f"{release}-dashboard", namespace)
    assert dashboard is not None and dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cluster.get("poddisruptionbudget", release, namespace) is not None


def test_install_with_values_breaking_the_schema_is_refused(
    cluster: Cluster,
    namespace: str,
    release: str,
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("replicaCount: two\nmetrics:\n  serviceMonitor:\n    enabeld: true\n")
    proc = helm(
        cluster, "install", release, str(CHART), "--namespace", namespace, "--values", str(bad),
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    err = proc.stderr
    assert "values don't meet the specifications of the schema" in err
    assert "replicaCount" in err and "enabeld" in err
    listed = helm(cluster, "list", "--namespace", namespace, "--short").stdout
    assert release not in listed, "nothing is installed"
    assert cluster.get("deployment", release, namespace) is None


def test_crd_is_upgraded_with_the_release_and_kept_on_uninstall(
    cluster: Cluster,
    namespace: str,
    release: str,
) -> None:
    # Other cluster tests apply manifests/crds/ themselves; take the CRD over as an upgrade from
    # a GitOps-managed CRD would (the spec is the same, so nothing changes for them).
    args = [str(CHART), "--namespace", namespace, "--set", f"fullnameOverride={release}"]
    helm(cluster, "install", release, *args, "--take-ownership")
    crd = cluster.get("crd", CRD_NAME)
    assert crd is not None
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")

    helm(cluster, "uninstall", release, "--namespace", namespace, "--wait")
    assert cluster.get("crd", CRD_NAME) is not None, "helm uninstall deleted the CRD"
    assert cluster.get("deployment", release, namespace) is None

    # The kept CRD still names the release, so a reinstall under that name adopts it
    # (docs/install.md); no --take-ownership needed.
    helm(cluster, "install", release, *args)
    assert cluster.get("deployment", release, namespace) is not None


# --------------------------------------------------------------------------- permissions


def can_i(c: Cluster, sa: str, verb: str, resource: str, ns: str | None) -> bool:
    """`kubectl auth can-i` as `sa` in namespace `ns` (None: across all namespaces).

    `resource` is `name[.group][/subresource]`; the subresource goes to --subresource, since
    kubectl silently drops it from `megatronjobs.kubetron.io/status`.
    """
    where = ["--namespace", ns] if ns else ["--all-namespaces"]
    name, _, sub = resource.partition("/")
    extra = [f"--subresource={sub}"] if sub else []
    proc = c.kubectl("auth", "can-i", verb, name, *extra, f"--as={sa}", *where, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {verb} {resource}: {proc.stdout} {proc.stderr}"
    return answer == "yes"


def granted(rules: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(verb, name[.group][/subresource]) for every verb and resource the rules grant."""
    out = []
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                base, _, sub = resource.partition("/")
                name = f"{base}.{group}" if group else base
                for verb in rule["verbs"]:
                    out.append((verb, f"{name}/{sub}" if sub else name))
    return out


FORBIDDEN = [
    ("get", "secrets"),
    ("list", "secrets"),
    ("watch", "secrets"),
    ("create", "pods/exec"),
    ("create", "pods/attach"),
    ("create", "pods/portforward"),
    ("create", "pods"),  # (delete pods is granted: a whole-group restart removes them)
    ("get", "pods/log"),
    ("create", "megatronjobs.kubetron.io"),
    ("delete", "megatronjobs.kubetron.io"),
    ("update", "megatronjobs.kubetron.io"),
    ("update", "megatronjobs.kubetron.io/scale"),
    ("delete", "pytorchjobs.kubeflow.org/status"),
    ("deletecollection", "pytorchjobs.kubeflow.org"),
    ("create", "serviceaccounts/token"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("escalate", "roles.rbac.authorization.k8s.io"),
    ("impersonate", "serviceaccounts"),
    ("create", "deployments.apps"),
    ("create", "jobs.batch"),
    ("update", "leases.coordination.k8s.io"),  # outside the release namespace
]
CLUSTER_FORBIDDEN = [
    ("list", "nodes"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("update", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "namespaces"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
]


def test_cluster_scope_service_account_can_do_what_the_operator_does_and_no_more(
    cluster: Cluster,
    namespace: str,
    release: str,
    trainer_crds: None,
) -> None:
    helm(
        cluster, "install", release, str(CHART), "--namespace", namespace,
        "--set", f"fullnameOverride={release}", "--set", "crds.install=false",
    )  # fmt: skip
    sa = f"system:serviceaccount:{namespace}:{release}"
    elsewhere = unique("other")
    ensure_namespace(cluster, elsewhere)
    try:
        for verb, resource in granted(RULES):
            for ns in (elsewhere, None):  # any namespace, and across all of them
                assert can_i(cluster, sa, verb, resource, ns), f"cannot {verb} {resource} in {ns}"
        for verb, resource in granted(LEASE_RULES):
            assert can_i(cluster, sa, verb, resource, namespace), f"cannot {verb} {resource}"
            assert not can_i(cluster, sa, verb, resource, elsewhere), f"may {verb} {resource}"
        for verb, resource in FORBIDDEN + granted(TRAINJOB_RULES):  # default backend: PyTorchJob
            assert not can_i(cluster, sa, verb, resource, elsewhere), f"may {verb} {resource}"
        for verb, resource in CLUSTER_FORBIDDEN:
            assert not can_i(cluster, sa, verb, resource, None), f"may {verb} {resource}"
    finally:
        cluster.kubectl("delete", "namespace", elsewhere, "--wait=false", check=False)


def test_namespaces_scope_grants_nothing_outside_the_watched_namespaces(
    cluster: Cluster,
    namespace: str,
    release: str,
    trainer_crds: None,
) -> None:
    watched, other = unique("team"), unique("other")
    for ns in (watched, other):
        ensure_namespace(cluster, ns)
    try:
        helm(
            cluster, "install", release, str(CHART), "--namespace", namespace,
            "--set", f"fullnameOverride={release}", "--set", "crds.install=false",
            "--set", "rbac.scope=namespaces", "--set", f"watchNamespaces={{{watched}}}",
        )  # fmt: skip
        sa = f"system:serviceaccount:{namespace}:{release}"
        for verb, resource in granted(RULES):
            assert can_i(cluster, sa, verb, resource, watched), f"cannot {verb} {resource}"
            assert not can_i(cluster, sa, verb, resource, other), (
                f"may {verb} {resource} in {other}"
            )
            assert not can_i(cluster, sa, verb, resource, None), f"may {verb} {resource} anywhere"
        for verb, resource in FORBIDDEN + granted(TRAINJOB_RULES):  # default backend: PyTorchJob
            assert not can_i(cluster, sa, verb, resource, watched), f"may {verb} {resource}"
        assert can_i(cluster, sa, "update", "leases.coordination.k8s.io", namespace)
    finally:
        for ns in (watched, other):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
