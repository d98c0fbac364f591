"""Operator metrics on its own registry, and the /metrics, /healthz, /readyz HTTP endpoints.

Names and labels are documented in docs/metrics.md and the README. MegatronJobs by phase is a
custom collector: it is read from the operator's view of the jobs, not counted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

RESULTS = ("success", "invalid", "error", "skipped")


class JobPhases(Collector):
    """`kubetron_megatronjobs{namespace, phase}` from the last phase seen per job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}

    def set(self, namespace: str, name: str, phase: str) -> None:
        with self._lock:
            self._phases[(namespace, name)] = phase

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)

    def clear(self) -> None:
        with self._lock:
            self._phases.clear()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            tally = Tally((ns, phase) for (ns, _), phase in self._phases.items())
        family = GaugeMetricFamily(
            "kubetron_megatronjobs", "MegatronJobs by phase", labels=["namespace", "phase"]
        )
        for (ns, phase), count in sorted(tally.items()):
            family.add_metric([ns, phase], count)
        yield family


class OperatorMetrics:
    """Every operator metric, registered on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            "kubetron_operator_reconciles", "Reconciles by result", ["result"], registry=r
        )
        for result in RESULTS:
            self.reconciles.labels(result)
        self.reconcile_duration = Histogram(
            "kubetron_operator_reconcile_duration_seconds",
            "Time of one reconcile",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.leader = Gauge(
            "kubetron_operator_leader", "1 while this replica holds the lease", registry=r
        )
        self.api_errors = Counter(
            "kubetron_operator_api_errors", "Failed API calls", ["verb", "resource"], registry=r
        )
        self.jobs = JobPhases()
        r.register(self.jobs)
        job = ["namespace", "job"]
        self.job_failures = Counter(
            "kubetron_operator_job_failures",
            "Attempts that ended in failure, by cause (a restart, or the job's failure)",
            [*job, "cause"],
            registry=r,
        )
        self.job_lost = Gauge(
            "kubetron_operator_job_lost_seconds",
            "Time lost to failed attempts (from their last checkpoint to the next attempt running)",
            job,
            registry=r,
        )
        self.job_goodput = Gauge(
            "kubetron_operator_job_goodput_ratio",
            "(wall time - lost time) / wall time, since the first attempt ran",
            job,
            registry=r,
        )
        self._job_causes: dict[tuple[str, str], set[str]] = {}
        # process_* (CPU, memory, open files), python_info and python_gc_*, as every
        # prometheus-client process exports on the default registry.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def api_error(self, verb: str, resource: str) -> None:
        self.api_errors.labels(verb, resource).inc()

    def job_failure(self, namespace: str, name: str, cause: str) -> None:
        self._job_causes.setdefault((namespace, name), set()).add(cause)
        self.job_failures.labels(namespace, name, cause).inc()

    def job_goodput_set(self, namespace: str, name: str, lost: float, ratio: float) -> None:
        self.job_lost.labels(namespace, name).set(lost)
        self.job_goodput.labels(namespace, name).set(ratio)

    def forget_job(self, namespace: str, name: str) -> None:
        """Drop a deleted job's series (its phase, failures and goodput)."""
        self.jobs.forget(namespace, name)
        for cause in self._job_causes.pop((namespace, name), set()):
            self.job_failures.remove(namespace, name, cause)
        for gauge in (self.job_lost, self.job_goodput):
            with contextlib.suppress(KeyError):  # never set: the job never ran
                gauge.remove(namespace, name)


class Health:
    """Liveness and readiness. The operator's event loop calls `beat()` every second once it
    runs; liveness fails when it has not for `stuck_after` seconds (a blocked loop reconciles
    nothing, and the kubelet should restart the pod)."""

    def __init__(self, stuck_after: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.alive = True
        self.ready = threading.Event()
        self.stuck_after = stuck_after
        self.clock = clock
        self._last_beat: float | None = None  # None until the event loop runs

    def beat(self) -> None:
        self._last_beat = self.clock()

    def live(self) -> tuple[bool, str]:
        if not self.alive:
            return False, "dead"
        if self._last_beat is not None:
            silent = self.clock() - self._last_beat
            if silent > self.stuck_after:
                return False, f"event loop stuck: no heartbeat for {silent:.0f}s"
        return True, "ok"


def serve(
    host: str, port: int, routes: dict[str, Callable[[], tuple[int, bytes, str]]]
) -> ThreadingHTTPServer:
    """Serve GET routes on a daemon thread; returns the server (port 0 picks a free one)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?")[0])
            code, body, ctype = route() if route else (404, b"not found\n", "text/plain")
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name=f"http-{port}", daemon=True).start()
    return server


def metrics_routes(metrics: OperatorMetrics) -> dict[str, Callable[[], tuple[int, bytes, str]]]:
    ctype = "text/plain; version=0.0.4; charset=utf-8"
    return {"/metrics": lambda: (200, generate_latest(metrics.registry), ctype)}


def health_routes(health: Health) -> dict[str, Callable[[], tuple[int, bytes, str]]]:
    def healthz() -> tuple[int, bytes, str]:
        ok, detail = health.live()
        return (200 if ok else 500), f"{detail}\n".encode(), "text/plain"

    def readyz() -> tuple[int, bytes, str]:
        ok = health.ready.is_set()
        return (200, b"ready\n", "text/plain") if ok else (503, b"not ready\n", "text/plain")

    return {"/healthz": healthz, "/readyz": readyz}
