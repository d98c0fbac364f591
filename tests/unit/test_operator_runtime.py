"""The operator process around its reconciles: liveness that notices a stuck event loop, the
process metrics every Prometheus target has, and a lease namespace that is missing."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client import generate_latest

from kubetron_operator.kube import ApiError
from kubetron_operator.leader import LeaderElector, LeaseConfig, LeaseNamespaceMissing
from kubetron_operator.metrics import Health, OperatorMetrics, health_routes, serve


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_healthz_fails_when_the_event_loop_stops_beating() -> None:
    clock = Clock()
    health = Health(stuck_after=30, clock=clock)
    server = serve("127.0.0.1", 0, health_routes(health))
    url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
    try:
        clock.now += 1000  # no loop yet (a standby waiting for the lease): alive
        assert _get(url) == (200, "ok\n")
        health.beat()
        clock.now += 29
        assert _get(url) == (200, "ok\n")
        clock.now += 2
        assert _get(url) == (500, "event loop stuck: no heartbeat for 31s\n")
        health.beat()
        assert _get(url)[0] == 200
    finally:
        server.shutdown()


def test_operator_exports_process_metrics() -> None:
    text = generate_latest(OperatorMetrics().registry).decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_info",
                 "python_gc_collections_total", "kubetron_operator_reconciles_total"):  # fmt: skip
        assert f"\n{name}" in text or text.startswith(name), name


class NoNamespaceKube:
    """The API answers as it does for a Lease in a namespace that does not exist."""

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    def request(self, method: str, url: str, body: Any = None) -> dict[str, Any]:
        raise ApiError(404, "Not Found", f'namespaces "{url.split("/")[5]}" not found')


def test_missing_lease_namespace_ends_election_with_the_fix() -> None:
    cfg = LeaseConfig("kubetron", "kubetron-sytem", "op-0", retry_period=0.01)
    elector = LeaderElector(NoNamespaceKube(), cfg)  # type: ignore[arg-type]
    with pytest.raises(LeaseNamespaceMissing) as err:
        elector.run(threading.Event())  # would retry forever if it swallowed the 404
    assert "'kubetron-sytem' does not exist" in str(err.value)
    assert "kubectl create namespace kubetron-sytem" in str(err.value)
    assert "--lease-namespace" in str(err.value)
