"""An in-memory fake of the project's own Kube interface (the verbs the controller uses), for
fast reconcile tests; the real API server runs the same paths in tests/cluster."""

from __future__ import annotations

import copy
from typing import Any

Obj = dict[str, Any]


class FakeKube:
    """The verbs Controller uses, over a dict keyed by (kind, namespace, name)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.applied: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.status_writes = 0
        self.deleted: list[tuple[str, str, int | None]] = []

    def put(self, obj: Obj) -> None:
        meta = obj["metadata"]
        self.objects[(obj["kind"], meta.get("namespace", ""), meta["name"])] = copy.deepcopy(obj)

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        obj = self.objects.get((kind, namespace or "", name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(
        self, kind: str, namespace: str | None, selector: str = "", limit: int = 0
    ) -> list[Obj]:
        """Objects of `kind` whose labels match every `key=value` of `selector`."""
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in self.objects.items()
            if k == kind
            and (namespace is None or ns == namespace)
            and all(o["metadata"].get("labels", {}).get(key) == v for key, v in wanted.items())
        ]

    def delete(
        self,
        kind: str,
        namespace: str,
        name: str,
        grace_seconds: int | None = None,
        propagation: str = "Background",
    ) -> None:
        self.deleted.append((kind, name, grace_seconds))
        self.objects.pop((kind, namespace, name), None)

    def apply(self, obj: Obj) -> Obj:
        self.applied.append(obj["kind"])
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        live = self.objects.get(key, {})
        merged = {**copy.deepcopy(obj), "status": live.get("status", {})}
        if live.get("metadata", {}).get("uid"):  # the server keeps an object's identity
            merged["metadata"]["uid"] = live["metadata"]["uid"]
        self.objects[key] = merged
        return copy.deepcopy(merged)

    def patch(self, kind: str, namespace: str, name: str, body: Obj) -> Obj:
        """A JSON merge patch: dicts merge, None removes a key, anything else replaces."""

        def merge(live: Obj, patch: Obj) -> Obj:
            out = dict(live)
            for key, value in patch.items():
                if value is None:
                    out.pop(key, None)
                elif isinstance(value, dict) and isinstance(out.get(key), dict):
                    out[key] = merge(out[key], value)
                else:
                    out[key] = copy.deepcopy(value)
            return out

        key = (kind, namespace, name)
        self.objects[key] = merge(self.objects[key], body)
        return copy.deepcopy(self.objects[key])

    def patch_status(self, kind: str, namespace: str, name: str, status: Obj) -> Obj:
        self.status_writes += 1  # a JSON merge patch, as the real one: None removes a key
        merged = dict(self.objects[(kind, namespace, name)].get("status") or {})
        for key, value in status.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = copy.deepcopy(value)
        self.objects[(kind, namespace, name)]["status"] = merged
        return self.get(kind, namespace, name) or {}

    def event(self, involved: Obj, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason))
