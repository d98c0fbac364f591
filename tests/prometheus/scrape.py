"""Prometheus scrape configs written the way prometheus-operator writes them for the chart's
ServiceMonitor and PodMonitor, but over static targets (no Kubernetes service discovery here).

Each target carries the `__meta_kubernetes_*` labels Kubernetes discovery would give it (the
Service's or pod's real labels, from the chart and from the operator's render()), and the job's
relabelings are prometheus-operator's fixed ones (keep by selector and port name; namespace, pod,
service, job, endpoint) followed by the monitor's own. So a selector that misses the pods, a
port name that does not exist, or a relabeling that breaks the labels the dashboard groups by
shows up here as a missing target or missing series.
"""

from __future__ import annotations

import re
from typing import Any

Obj = dict[str, Any]


def sanitize(label: str) -> str:
    """Kubernetes label name -> Prometheus meta label suffix (app.kubernetes.io/name -> app_..)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _keep_selected(kind: str, selector: Obj) -> list[Obj]:
    rules = []
    for key, value in sorted(selector.get("matchLabels", {}).items()):
        name = sanitize(key)
        rules.append(
            {
                "source_labels": [
                    f"__meta_kubernetes_{kind}_label_{name}",
                    f"__meta_kubernetes_{kind}_labelpresent_{name}",
                ],
                "regex": f"({re.escape(value)});true",
                "action": "keep",
            }
        )
    return rules


def _relabel(rule: Obj) -> Obj:
    """prometheus-operator's RelabelConfig (camelCase) -> Prometheus's (snake_case)."""
    names = {
        "sourceLabels": "source_labels",
        "targetLabel": "target_label",
        "separator": "separator",
        "regex": "regex",
        "modulus": "modulus",
        "replacement": "replacement",
        "action": "action",
    }
    out = {names[k]: v for k, v in rule.items()}
    if "action" in out:
        out["action"] = str(out["action"]).lower()
    return out


def _endpoint_settings(endpoint: Obj) -> Obj:
    settings: Obj = {
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "metrics_path": endpoint.get("path", "/metrics"),
    }
    return settings


def service_monitor_job(monitor: Obj, target: str, service: Obj, pod_name: str) -> Obj:
    """The scrape job for endpoint 0 of a ServiceMonitor, over one static target."""
    spec = monitor["spec"]
    (endpoint,) = spec["endpoints"]
    meta = {
        "__meta_kubernetes_namespace": service["metadata"]["namespace"],
        "__meta_kubernetes_service_name": service["metadata"]["name"],
        "__meta_kubernetes_pod_name": pod_name,
        "__meta_kubernetes_endpoint_port_name": service["spec"]["ports"][0]["name"],
    }
    for key, value in service["metadata"].get("labels", {}).items():
        meta[f"__meta_kubernetes_service_label_{sanitize(key)}"] = value
        meta[f"__meta_kubernetes_service_labelpresent_{sanitize(key)}"] = "true"
    relabel = _keep_selected("service", spec["selector"])
    relabel += [
        {
            "source_labels": ["__meta_kubernetes_endpoint_port_name"],
            "regex": endpoint["port"],
            "action": "keep",
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
    ]
    if spec.get("jobLabel"):
        label = sanitize(spec["jobLabel"])
        relabel.append(
            {
                "source_labels": [f"__meta_kubernetes_service_label_{label}"],
                "target_label": "job",
                "regex": "(.+)",
                "replacement": "${1}",
            }
        )
    relabel.append({"target_label": "endpoint", "replacement": endpoint["port"]})
    relabel += [_relabel(r) for r in endpoint.get("relabelings", [])]
    ns, name = monitor["metadata"]["namespace"], monitor["metadata"]["name"]
    return {
        "job_name": f"serviceMonitor/{ns}/{name}/0",
        **_endpoint_settings(endpoint),
        "static_configs": [{"targets": [target], "labels": meta}],
        "relabel_configs": relabel,
        "metric_relabel_configs": [_relabel(r) for r in endpoint.get("metricRelabelings", [])],
    }


def pod_monitor_job(monitor: Obj, target: str, pod: Obj, namespace: str, pod_name: str) -> Obj:
    """The scrape job for endpoint 0 of a PodMonitor, over one static target (a trainer pod)."""
    spec = monitor["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    (container,) = pod["spec"]["containers"]
    meta = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": pod_name,
        "__meta_kubernetes_pod_container_name": container["name"],
        "__meta_kubernetes_pod_container_port_name": "metrics",
    }
    port_names = {p["name"] for p in container.get("ports", [])}
    assert "metrics" in port_names, f"the trainer container has no `metrics` port: {port_names}"
    for key, value in pod["metadata"].get("labels", {}).items():
        meta[f"__meta_kubernetes_pod_label_{sanitize(key)}"] = value
        meta[f"__meta_kubernetes_pod_labelpresent_{sanitize(key)}"] = "true"
    ns, name = monitor["metadata"]["namespace"], monitor["metadata"]["name"]
    relabel = _keep_selected("pod", spec["selector"])
    relabel += [
        {
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": endpoint["port"],
            "action": "keep",
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": f"{ns}/{name}"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
    ]
    relabel += [_relabel(r) for r in endpoint.get("relabelings", [])]
    return {
        "job_name": f"podMonitor/{ns}/{name}/0",
        **_endpoint_settings(endpoint),
        "static_configs": [{"targets": [target], "labels": meta}],
        "relabel_configs": relabel,
        "metric_relabel_configs": [_relabel(r) for r in endpoint.get("metricRelabelings", [])],
    }
