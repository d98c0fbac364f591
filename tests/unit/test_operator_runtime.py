"""The operator process around its reconciles: liveness that notices a stuck event loop, the
process metrics every Prometheus target has, and a lease namespace that is missing."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import generate_latest

from devtools.ports import free_port
from kubetron_operator.kube import ApiError, Kube
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


def _unreachable_kube() -> Kube:
    """A Kube whose API server is not there (a port nothing listens on: a restart's gap)."""
    configuration = client.Configuration()
    configuration.host = f"https://127.0.0.1:{free_port()}"
    configuration.retries = 0
    return Kube(client.ApiClient(configuration))


def test_an_unreachable_api_server_is_an_api_error() -> None:
    """The client raises transport errors of its own (urllib3): Kube turns them into the
    ApiError every caller handles, counted like any failed call."""
    errors: list[tuple[str, str]] = []
    kube = _unreachable_kube()
    kube._on_error = lambda verb, resource: errors.append((verb, resource))
    with pytest.raises(ApiError) as err:
        kube.get("Lease", "kubetron-system", "kubetron-operator")
    assert (err.value.status, err.value.reason) == (0, "Unreachable")
    assert errors == [("get", "leases")]


class VanishingKube(Kube):
    """No lease yet; once this replica created it, the API server goes away (it restarts)."""

    created = False

    def request(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        if self.created:
            return super().request(method, url, **kwargs)
        if method != "POST":
            raise ApiError(404, "Not Found", "no lease yet")
        self.created = True
        return dict(kwargs["body"])


def test_a_leader_that_cannot_reach_the_api_server_steps_down_after_the_deadline() -> None:
    """The election thread survives the gap: it keeps trying, and only once renewDeadline has
    passed without a renewal does it step down (rather than die and lead unrenewed)."""
    stopped = threading.Event()
    kube = VanishingKube(_unreachable_kube().api)
    cfg = LeaseConfig("kubetron", "kubetron-system", "op-0", 0.5, 0.2, 0.02)
    elector = LeaderElector(kube, cfg, on_stopped=stopped.set)
    assert elector.run(threading.Event()) is True  # leadership lost, not an exception
    assert stopped.is_set() and not elector.is_leader


class HangingKube(VanishingKube):
    """Creates the lease; then every call hangs until released (etcd down behind the API
    server: requests are accepted and answered minutes later)."""

    def __init__(self) -> None:
        super().__init__(_unreachable_kube().api)
        self.entered, self.release = threading.Event(), threading.Event()

    def request(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        if not self.created:
            return super().request(method, url, **kwargs)
        self.entered.set()
        self.release.wait(10)
        raise ApiError(504, "Gateway Timeout", "etcd is down")


def test_a_leader_whose_renewal_hangs_stops_acting_at_the_renew_deadline() -> None:
    """Fencing does not wait for a hung call to return: past renewDeadline without a renewal
    the replica no longer acts, as the standby may take the lease soon after."""
    clock, kube, stop = Clock(), HangingKube(), threading.Event()
    cfg = LeaseConfig("kubetron", "kubetron-system", "op-0", 15.0, 10.0, 0.01)
    elector = LeaderElector(kube, cfg, clock=clock)
    thread = threading.Thread(target=elector.run, args=(stop,))
    thread.start()
    try:
        assert kube.entered.wait(5)  # leading, its first renewal hanging
        assert elector.is_leader
        clock.now += 10.0
        assert elector.is_leader
        clock.now += 0.5
        assert not elector.is_leader  # the call still hangs
    finally:
        stop.set()
        kube.release.set()
        thread.join(10)
