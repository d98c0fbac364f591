"""The chart as `helm lint` and `helm template` see it: no cluster needed, only the helm binary.

What users rely on: the CRD is the generated one, the RBAC is exactly the operator's
least-privilege rules, the Deployment runs restricted, values are checked by the schema, and the
monitors select what the operator really creates (pod labels and port names from render()).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kubetron_api.parse import load_documents, parse_job
from kubetron_operator.cli.rbac import LEASE_RULES, RULES
from kubetron_operator.plan import plan
from kubetron_operator.render import render
from tests.chart.helm import (
    CHART,
    CI_VALUES,
    KUBE_VERSION,
    REPO_ROOT,
    Obj,
    find,
    one,
    run_helm,
    template,
    template_error,
)

MANIFEST_CRD = REPO_ROOT / "manifests" / "crds" / "kubetron.io_megatronjobs.yaml"
CHART_CRD = CHART / "files" / "crds" / "kubetron.io_megatronjobs.yaml"
DASHBOARD = CHART / "files" / "dashboards" / "kubetron.json"
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())


def deployment(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment")


def container(objs: list[Obj]) -> Obj:
    containers = deployment(objs)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def trainer_pod_template() -> Obj:
    """The CPU example's pod template, as the operator renders it: what the PodMonitor selects."""
    (source, obj), *_ = load_documents(REPO_ROOT / "manifests" / "examples" / "gpt-tiny-cpu.yaml")
    obj.setdefault("metadata", {}).update(namespace="research", uid="uid")
    job = parse_job(obj, source)
    pytorchjob = next(o for o in render(job, plan(job)) if o["kind"] == "PyTorchJob")
    return dict(pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["template"])


# --------------------------------------------------------------------------- lint


@pytest.mark.parametrize("values", [[], [CI_VALUES]], ids=["default-values", "ci-values"])
def test_helm_lint_strict_passes(values: list[Path]) -> None:
    args = [arg for v in values for arg in ("--values", str(v))]
    proc = run_helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *args)
    assert "0 chart(s) failed" in proc.stdout


def test_chart_metadata_pins_kubernetes_and_app_version() -> None:
    assert CHART_META["apiVersion"] == "v2"
    assert CHART_META["kubeVersion"] == ">=1.29.0-0"
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version is not None
    assert CHART_META["appVersion"] == version.group(1), "appVersion follows pyproject's version"


def test_kube_version_below_129_is_refused() -> None:
    proc = run_helm("template", "kubetron", str(CHART), "--kube-version", "1.28.9", check=False)
    assert proc.returncode != 0
    assert "kubeVersion" in proc.stderr or "incompatible" in proc.stderr


# --------------------------------------------------------------------------- CRD


def test_chart_crd_file_is_a_copy_of_the_generated_manifest() -> None:
    assert CHART_CRD.read_text() == MANIFEST_CRD.read_text(), (
        "charts/kubetron/files/crds/ drifted from manifests/crds/ (`make generate`): "
        f"cp {MANIFEST_CRD.relative_to(REPO_ROOT)} {CHART_CRD.relative_to(REPO_ROOT)}"
    )


def test_rendered_crd_equals_manifest_apart_from_helm_metadata() -> None:
    crd = one(template(), "CustomResourceDefinition")
    want = yaml.safe_load(MANIFEST_CRD.read_text())
    assert crd["spec"] == want["spec"]
    assert crd["metadata"]["name"] == want["metadata"]["name"]
    labels = crd["metadata"]["labels"]
    assert want["metadata"]["labels"].items() <= labels.items()
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_crd_can_be_left_out_or_not_kept() -> None:
    assert not find(template(sets={"crds.install": "false"}), "CustomResourceDefinition")
    crd = one(template(sets={"crds.keep": "false"}), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})


# --------------------------------------------------------------------------- RBAC


def test_cluster_scope_rbac_is_exactly_the_operator_rules() -> None:
    objs = template()
    role = one(objs, "ClusterRole")
    assert role["rules"] == RULES
    lease_role = one(objs, "Role")
    assert lease_role["metadata"]["namespace"] == "kubetron-system"
    assert lease_role["rules"] == LEASE_RULES
    sa = one(objs, "ServiceAccount")
    for binding in (one(objs, "ClusterRoleBinding"), one(objs, "RoleBinding")):
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": sa["metadata"]["name"],
                "namespace": "kubetron-system",
            }
        ]
    assert one(objs, "ClusterRoleBinding")["roleRef"]["name"] == role["metadata"]["name"]
    assert one(objs, "RoleBinding")["roleRef"]["name"] == lease_role["metadata"]["name"]
    assert not any(a.startswith("--namespaces") for a in container(objs)["args"])


def test_namespaces_scope_grants_roles_only_in_watched_namespaces() -> None:
    objs = template(sets={"rbac.scope": "namespaces", "watchNamespaces": "{team-a,team-b}"})
    assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in find(objs, "Role")}
    assert set(roles) == {"team-a", "team-b", "kubetron-system"}
    assert roles["team-a"]["rules"] == RULES == roles["team-b"]["rules"]
    assert roles["kubetron-system"]["rules"] == LEASE_RULES
    bindings = {b["metadata"]["namespace"] for b in find(objs, "RoleBinding")}
    assert bindings == {"team-a", "team-b", "kubetron-system"}
    assert "--namespaces=team-a,team-b" in container(objs)["args"]


def test_namespaces_scope_without_namespaces_is_refused() -> None:
    err = template_error(sets={"rbac.scope": "namespaces"})
    assert "watchNamespaces" in err and "rbac.scope" in err


def test_rbac_can_be_left_to_the_cluster_admin() -> None:
    objs = template(sets={"rbac.create": "false"})
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {
        o["kind"] for o in objs
    }


# --------------------------------------------------------------------------- Deployment


def test_deployment_defaults() -> None:
    objs = template()
    dep = deployment(objs)
    spec = dep["spec"]["template"]["spec"]
    ctr = container(objs)
    assert dep["spec"]["replicas"] == 1
    assert ctr["image"] == f"ghcr.io/kubetron/operator:{CHART_META['appVersion']}"
    assert spec["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    assert spec.get("automountServiceAccountToken", True), "the operator needs its token"
    assert "--leader-elect" in ctr["args"]
    assert "--lease-namespace=$(POD_NAMESPACE)" in ctr["args"]
    assert "--identity=$(POD_NAME)" in ctr["args"]
    assert {"--metrics-port=8080", "--health-port=8081", "--log-format=json"} <= set(ctr["args"])
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in ctr["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert ctr["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert ctr["resources"]["limits"]["memory"] == "512Mi"
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_operator_runs_under_the_restricted_pod_security_standard() -> None:
    objs = template()
    pod_sc = deployment(objs)["spec"]["template"]["spec"]["securityContext"]
    sc = container(objs)["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not sc.get("privileged", False)


def test_image_tag_and_digest() -> None:
    sets = {"image.tag": "1.2.3", "image.digest": "sha256:" + "a" * 64}
    assert container(template(sets=sets))["image"] == (
        "ghcr.io/kubetron/operator:1.2.3@sha256:" + "a" * 64
    )


@pytest.mark.parametrize(
    ("replicas", "enabled", "flag"),
    [
        (1, "true", "--leader-elect"),
        (1, "false", "--no-leader-elect"),
        (3, "true", "--leader-elect"),
    ],
    ids=["one-replica-default", "one-replica-opted-out", "three-replicas"],
)
def test_leader_election_flag(replicas: int, enabled: str, flag: str) -> None:
    sets = {"replicaCount": str(replicas), "leaderElection.enabled": enabled}
    objs = template(sets=sets)
    assert deployment(objs)["spec"]["replicas"] == replicas
    args = container(objs)["args"]
    assert flag in args and not ({"--leader-elect", "--no-leader-elect"} - {flag}) & set(args)


def test_several_replicas_without_leader_election_are_refused() -> None:
    err = template_error(sets={"replicaCount": "2", "leaderElection.enabled": "false"})
    assert "leaderElection.enabled" in err and "replicaCount" in err


def test_names_are_truncated_to_63_characters() -> None:
    release = "r" * 53  # helm's own limit on release names
    objs = template(
        release=release,
        sets={
            "metrics.serviceMonitor.enabled": "true",
            "metrics.podMonitor.enabled": "true",
            "dashboard.enabled": "true",
        },
    )
    names = [o["metadata"]["name"] for o in objs if o["kind"] != "CustomResourceDefinition"]
    for name in names:
        assert len(name) <= 63 and DNS_1123_LABEL.match(name), name
    assert any(n.endswith("-leader-election") for n in names), "suffixes survive truncation"
    assert any(n.endswith("-metrics") for n in names)


def test_fullname_is_the_release_name_when_it_contains_the_chart_name() -> None:
    assert deployment(template(release="kubetron"))["metadata"]["name"] == "kubetron"
    assert deployment(template(release="prod"))["metadata"]["name"] == "prod-kubetron"


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("sets", "named"),
    [
        ({"replicaCont": "2"}, "replicaCont"),
        ({"metrics.serviceMonitor.enabeld": "true"}, "enabeld"),
        ({"securityContext.runAsRoot": "true"}, "runAsRoot"),
        ({"crds.upgrade": "true"}, "upgrade"),
    ],
    ids=["top-level", "nested", "security-context", "crds"],
)
def test_schema_rejects_unknown_keys(sets: dict[str, str], named: str) -> None:
    err = template_error(sets=sets)
    assert "values don't meet the specifications of the schema" in err
    assert named in err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set-string", "replicaCount=two"], "replicaCount"),
        (["--set-string", "metrics.podMonitor.enabled=yes"], "enabled"),
        (["--set", "rbac.scope=everything"], "scope"),
        (["--set", "operator.logFormat=xml"], "logFormat"),
        (["--set", "watchNamespaces[0]=Team_A"], "watchNamespaces"),
        (["--set", "metrics.serviceMonitor.interval=30 seconds"], "interval"),
        (["--set", "nameOverride=Kubetron_Ops"], "nameOverride"),
        (["--set", "fullnameOverride=ml.ops"], "fullnameOverride"),
    ],
    ids=[
        "string-for-int",
        "string-for-bool",
        "enum",
        "log-format",
        "namespace-name",
        "duration",
        "name-not-dns",
        "fullname-not-dns",
    ],
)
def test_schema_rejects_mistyped_values(args: list[str], named: str) -> None:
    proc = run_helm(
        "template", "kubetron", str(CHART), "--kube-version", KUBE_VERSION, *args, check=False
    )
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert named in proc.stderr


def test_every_default_value_is_described_in_the_schema() -> None:
    """values.yaml and values.schema.json list the same keys, so the schema cannot fall behind."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: object, node: Obj, path: str) -> None:
        assert "description" in node or path == "", f"{path}: no description in the schema"
        if isinstance(value, dict) and node.get("additionalProperties") is False:
            props = node["properties"]
            assert set(value) <= set(props), f"{path}: {set(value) - set(props)} not in schema"
            for key, sub in value.items():
                walk(sub, props[key], f"{path}.{key}".lstrip("."))

    walk(values, schema, "")

    def closed(node: Obj, path: str) -> None:  # every object of our own has a closed key set
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for key, sub in node["properties"].items():
                closed(sub, f"{path}.{key}")

    closed(schema, "values")


# --------------------------------------------------------------------------- monitoring


def test_monitors_and_dashboard_are_off_by_default() -> None:
    kinds = {o["kind"] for o in template()}
    assert not {"ServiceMonitor", "PodMonitor"} & kinds
    assert "Service" in kinds
    assert not any(
        "grafana_dashboard" in o["metadata"].get("labels", {})
        for o in find(template(), "ConfigMap")
    )


def test_service_monitor_selects_the_metrics_service() -> None:
    objs = template(sets={"metrics.serviceMonitor.enabled": "true"})
    monitor, service = one(objs, "ServiceMonitor"), one(objs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["kubetron-system"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert endpoint["honorLabels"] is True  # kubetron_megatronjobs{namespace} is the job's
    pod_labels = deployment(objs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in {
        p["name"] for p in container(objs)["ports"]
    }


def test_service_monitor_needs_the_service() -> None:
    err = template_error(
        sets={"metrics.serviceMonitor.enabled": "true", "metrics.service.enabled": "false"}
    )
    assert "metrics.service.enabled" in err


def test_pod_monitor_selects_the_trainer_pods_the_operator_renders() -> None:
    monitor = one(template(sets={"metrics.podMonitor.enabled": "true"}), "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pod = trainer_pod_template()
    pod_labels = pod["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    port_names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert endpoint["port"] in port_names
    assert endpoint["honorLabels"] is True  # trainer series carry job=<MegatronJob>
    job_label = "kubetron.io/job-name"
    assert job_label in pod_labels
    meta = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", job_label)
    assert {"sourceLabels": [meta], "targetLabel": "job", "action": "replace"} in endpoint[
        "relabelings"
    ]


def test_pod_monitor_follows_watched_namespaces() -> None:
    monitor = one(template(values=[CI_VALUES]), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_monitor_labels_can_be_changed() -> None:
    sets = {
        "metrics.podMonitor.enabled": "true",
        "metrics.podMonitor.additionalLabels.release": "prom",
    }
    assert one(template(sets=sets), "PodMonitor")["metadata"]["labels"]["release"] == "prom"


def documented_metrics() -> set[str]:
    text = (REPO_ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `(kubetron_[a-z_]+)`", text, re.M))


def dashboard_exprs(dashboard: Obj) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_config_map_is_labelled_for_the_grafana_sidecar() -> None:
    cm = one(template(sets={"dashboard.enabled": "true"}), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    rendered = json.loads(cm["data"]["kubetron.json"])
    assert rendered == json.loads(DASHBOARD.read_text())


def test_dashboard_queries_use_only_documented_metric_names() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = documented_metrics()
    assert len(known) >= 15, "docs/metrics.md table format changed"
    histograms = {n for n in known if n.endswith("_seconds")}
    exprs = dashboard_exprs(dashboard)
    used: set[str] = set()
    for expr in exprs:
        for name in re.findall(r"\b(kubetron_[a-z_]+)", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in known or base in histograms, f"{name} is not in docs/metrics.md"
            used.add(base if base in histograms else name)
    for needed in (
        "kubetron_train_tokens_per_second",
        "kubetron_train_mfu_ratio",
        "kubetron_train_loss",
        "kubetron_train_step_duration_seconds",
        "kubetron_gpu_memory_allocated_bytes",
        "kubetron_megatronjobs",
        "kubetron_operator_reconcile_duration_seconds",
        "kubetron_operator_reconciles_total",
        "kubetron_operator_api_errors_total",
    ):
        assert needed in used, f"no panel shows {needed}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "replicaCount=2", "--set", "leaderElection.enabled=false"],
         "more than one replica needs leader election"),
        (["--set", "rbac.scope=namespaces"], "rbac.scope=namespaces needs watchNamespaces"),
        (["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false"],
         "metrics.serviceMonitor.enabled needs metrics.service.enabled"),
        (["--set", "operator.metricsPort=9000", "--set", "operator.healthPort=9000"],
         "operator.metricsPort and operator.healthPort are both 9000"),
        (["--set", "podDisruptionBudget.enabled=true"],
         "podDisruptionBudget.minAvailable=1 with replicaCount=1 lets no operator pod be evicted"),
    ],
    ids=["replicas-without-election", "namespaces-scope-without-list", "monitor-without-service",
         "same-ports", "budget-blocks-drains"],
)  # fmt: skip
def test_values_the_schema_cannot_check_fail_with_the_fix(args: list[str], message: str) -> None:
    proc = run_helm(
        "template", "kubetron", str(CHART), "--kube-version", KUBE_VERSION, *args, check=False
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
