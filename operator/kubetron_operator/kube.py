"""Thin Kubernetes I/O for the operator: plain dicts in and out, one error type.

The official client's typed models are not needed here: the operator renders dicts and applies
them server-side. Every call goes through `request`, which counts failures for the
`kubetron_operator_api_errors_total` metric and raises `ApiError` with the server's message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

Obj = dict[str, Any]
FIELD_MANAGER = "kubetron-operator"

# Where each kind lives: (path prefix, plural).
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "PyTorchJob": ("/apis/kubeflow.org/v1", "pytorchjobs"),
    "TrainJob": ("/apis/trainer.kubeflow.org/v1alpha1", "trainjobs"),
    "JobSet": ("/apis/jobset.x-k8s.io/v1alpha2", "jobsets"),
    "MegatronJob": ("/apis/kubetron.io/v1alpha1", "megatronjobs"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
    "Workload": ("/apis/kueue.x-k8s.io/v1beta2", "workloads"),
}
_PLURALS = {plural for _, plural in KINDS.values()}


class ApiError(Exception):
    """A failed API call, with the HTTP status and the server's message; status 0 when the
    server was not reached (down, restarting): every caller retries that like a 5xx."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}: {message}")


def load_api_client(kubeconfig: str | None) -> client.ApiClient:
    """Admin or in-cluster credentials, like kubectl would pick them."""
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def path(kind: str, namespace: str | None, name: str | None = None, sub: str = "") -> str:
    prefix, plural = KINDS[kind]
    out = f"{prefix}/namespaces/{quote(namespace)}/{plural}" if namespace else f"{prefix}/{plural}"
    if name:
        out += f"/{quote(name)}"
    return out + (f"/{sub}" if sub else "")


class Kube:
    """A few verbs over `ApiClient`, returning decoded JSON."""

    def __init__(
        self, api: client.ApiClient, on_error: Callable[[str, str], None] | None = None
    ) -> None:
        self.api = api
        self._on_error = on_error or (lambda verb, resource: None)

    def request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        serialized = self.api.param_serialize(
            method=method,
            resource_path=url,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resource = next((part for part in url.split("/") if part in _PLURALS), "unknown")
        try:
            resp = self.api.call_api(*serialized, _request_timeout=30)
            data = resp.read()
            status = resp.status
        except ApiException as err:
            self._on_error(method.lower(), resource)
            raise ApiError(err.status or 0, str(err.reason), str(err.body)) from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            # the client lets transport errors through: they would escape the callers'
            # ApiError handling (and end the leader-election thread) while the server restarts
            self._on_error(method.lower(), resource)
            raise ApiError(0, "Unreachable", str(err)) from err
        if status >= 400:
            self._on_error(method.lower(), resource)
            message = _message(data)
            raise ApiError(status, resp.reason or "", message)
        return json.loads(data) if data else {}

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path(kind, namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def list(
        self, kind: str, namespace: str | None, selector: str = "", limit: int = 0
    ) -> list[Obj]:
        query = [("labelSelector", selector)] if selector else []
        query += [("limit", str(limit))] if limit else []
        return list(self.request("GET", path(kind, namespace), query=query).get("items", []))

    def apply(self, obj: Obj) -> Obj:
        """Server-side apply with kubetron's field manager (force: we own these objects)."""
        meta = obj["metadata"]
        url = path(obj["kind"], meta.get("namespace"), meta["name"])
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        return self.request(
            "PATCH", url, body=obj, query=query, content_type="application/apply-patch+yaml"
        )

    def delete(
        self,
        kind: str,
        namespace: str,
        name: str,
        grace_seconds: int | None = None,
        propagation: str = "Background",
    ) -> None:
        """Delete one object (its dependents in the background, or first with "Foreground");
        gone already is fine."""
        body: Obj = {"kind": "DeleteOptions", "apiVersion": "v1"}
        body["propagationPolicy"] = propagation
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            self.request("DELETE", path(kind, namespace, name), body=body)
        except ApiError as err:
            if err.status != 404:
                raise

    def patch(self, kind: str, namespace: str, name: str, body: Obj) -> Obj:
        """JSON merge patch of one object (fields another controller owns, e.g. a Kueue
        Workload's spec.active)."""
        return self.request(
            "PATCH",
            path(kind, namespace, name),
            body=body,
            content_type="application/merge-patch+json",
        )

    def patch_status(self, kind: str, namespace: str, name: str, status: Obj) -> Obj:
        """JSON merge patch of the status: keys set to None are removed."""
        return self.request(
            "PATCH",
            path(kind, namespace, name, "status"),
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def event(self, involved: Obj, type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about `involved` (Normal or Warning)."""
        meta = involved["metadata"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta['name']}.{time.time_ns():x}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
        }
        self.request("POST", path("Event", meta["namespace"]), body=body)


def _message(data: bytes | None) -> str:
    try:
        return str(json.loads(data or b"{}").get("message", ""))
    except ValueError:
        return (data or b"").decode(errors="replace")[:500]
