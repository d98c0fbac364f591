"""Minimal stand-ins for prometheus-operator's ServiceMonitor and PodMonitor CRDs.

The real CRDs (monitoring.coreos.com/v1) cannot be fetched offline. These schemas cover the
fields the kubetron chart emits, with the names and types of prometheus-operator's API, and
nothing else: under kubectl's strict field validation an unknown or misspelled field is an
error, so a server-side dry run checks the chart's monitors rather than waving them through
(x-kubernetes-preserve-unknown-fields would accept anything). Objects are only stored; no
Prometheus operator runs in the test cluster.
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]

DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
ACTIONS = [
    "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
    "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
    "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
    "dropequal", "DropEqual",
]  # fmt: skip
STRINGS: Obj = {"type": "array", "items": {"type": "string"}}

RELABELINGS: Obj = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "action": {"type": "string", "enum": ACTIONS},
            "modulus": {"type": "integer", "format": "int64"},
            "regex": {"type": "string"},
            "replacement": {"type": "string"},
            "separator": {"type": "string"},
            "sourceLabels": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
            },
            "targetLabel": {"type": "string"},
        },
    },
}
ENDPOINT: Obj = {
    "type": "object",
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": {"type": "string", "pattern": DURATION},
        "scrapeTimeout": {"type": "string", "pattern": DURATION},
        "honorLabels": {"type": "boolean"},
        "relabelings": RELABELINGS,
        "metricRelabelings": RELABELINGS,
    },
}
SELECTOR: Obj = {
    "type": "object",
    "x-kubernetes-map-type": "atomic",
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"type": "string"},
                    "values": STRINGS,
                },
            },
        },
    },
}
NAMESPACE_SELECTOR: Obj = {
    "type": "object",
    "properties": {"any": {"type": "boolean"}, "matchNames": STRINGS},
}


def _crd(kind: str, endpoints_field: str) -> Obj:
    plural = kind.lower() + "s"
    spec: Obj = {
        "type": "object",
        "required": ["selector", *(["endpoints"] if endpoints_field == "endpoints" else [])],
        "properties": {
            "jobLabel": {"type": "string"},
            "namespaceSelector": NAMESPACE_SELECTOR,
            "selector": SELECTOR,
            endpoints_field: {"type": "array", "items": ENDPOINT},
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": spec}}},
                }
            ],
        },
    }


def monitoring_crds() -> list[Obj]:
    return [_crd("ServiceMonitor", "endpoints"), _crd("PodMonitor", "podMetricsEndpoints")]
