"""Leader election on a coordination.k8s.io Lease, the way client-go's leaderelection does it.

Only the holder reconciles. A candidate takes an expired lease (no renewal observed for
leaseDuration, measured on its own monotonic clock, so clock skew does not matter); the holder
renews every retryPeriod and gives up when it could not renew for renewDeadline. Conflicting
writes are settled by the API server's resourceVersion check. kopf's peering is not this: it
pauses operators by priority but never fences a stale one.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kubetron_operator.kube import ApiError, Kube, Obj, path

log = logging.getLogger("kubetron.leader")


@dataclass(frozen=True)
class LeaseConfig:
    name: str
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


class LeaseNamespaceMissing(RuntimeError):
    """The lease's namespace does not exist: no retry can succeed, so the operator exits."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        super().__init__(
            f"the lease namespace {namespace!r} does not exist: create it (`kubectl create "
            f"namespace {namespace}`) or point --lease-namespace (env POD_NAMESPACE) at an "
            "existing namespace"
        )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Acquire, hold and release one Lease; `is_leader` is safe to read from any thread."""

    def __init__(
        self,
        kube: Kube,
        cfg: LeaseConfig,
        on_started: Callable[[], None] = lambda: None,
        on_stopped: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube, self.cfg, self.clock = kube, cfg, clock
        self._on_started, self._on_stopped = on_started, on_stopped
        self._leading = threading.Event()
        self._observed: tuple[str, str] | None = None
        self._observed_at = 0.0
        self._renewed_at = -math.inf

    @property
    def is_leader(self) -> bool:
        """Leading and renewed within renewDeadline: a renewal hung in a call (an API server
        whose etcd is down answers nothing for minutes) does not extend the lead past the
        point where a standby may take the lease."""
        overdue = self.clock() - self._renewed_at > self.cfg.renew_deadline
        return self._leading.is_set() and not overdue

    def run(self, stop: threading.Event) -> bool:  # raises LeaseNamespaceMissing
        """Block until leadership is lost (returns True) or `stop` is set (returns False)."""
        while not stop.is_set() and not self._try_safely():
            stop.wait(self.cfg.retry_period)
        if stop.is_set():
            return False
        log.info("became leader of lease %s/%s", self.cfg.namespace, self.cfg.name)
        self._renewed_at = self.clock()
        self._leading.set()
        self._on_started()
        while not stop.wait(self.cfg.retry_period):
            started = self.clock()  # the renewal's renewTime is of then, however long it took
            if self._try_safely():
                self._renewed_at = started
            elif self.clock() - self._renewed_at > self.cfg.renew_deadline:
                log.error("lost the lease: not renewed for %.1fs", self.clock() - self._renewed_at)
                self._leading.clear()
                self._on_stopped()
                return True
        self._leading.clear()
        self._on_stopped()
        self.release()
        return False

    def _try_safely(self) -> bool:
        try:
            return self.try_acquire_or_renew()
        except ApiError as err:
            log.warning("lease %s/%s: %s", self.cfg.namespace, self.cfg.name, err)
            return False

    def try_acquire_or_renew(self) -> bool:
        url = path("Lease", self.cfg.namespace, self.cfg.name)
        lease = self.kube.get("Lease", self.cfg.namespace, self.cfg.name)
        if lease is None:
            return self._create()
        spec = lease.setdefault("spec", {})
        holder = spec.get("holderIdentity") or ""
        record = (holder, str(spec.get("renewTime")))
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()
        expired = self._observed_at + self.cfg.lease_duration <= self.clock()
        if holder and holder != self.cfg.identity and not expired:
            return False
        now = _now()
        if holder != self.cfg.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        spec |= {
            "holderIdentity": self.cfg.identity,
            "renewTime": now,
            "leaseDurationSeconds": int(self.cfg.lease_duration),
        }
        try:
            updated = self.kube.request("PUT", url, body=lease)
        except ApiError as err:
            if err.status == 409:  # someone else wrote first
                return False
            raise
        self._remember(updated)
        return True

    def _create(self) -> bool:
        now = _now()
        body: Obj = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.cfg.name, "namespace": self.cfg.namespace},
            "spec": {
                "holderIdentity": self.cfg.identity,
                "leaseDurationSeconds": int(self.cfg.lease_duration),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }
        try:
            created = self.kube.request("POST", path("Lease", self.cfg.namespace), body=body)
        except ApiError as err:
            if err.status == 409:
                return False
            if err.status == 404:  # a lease is refused with 404 only when its namespace is gone
                raise LeaseNamespaceMissing(self.cfg.namespace) from err
            raise
        self._remember(created)
        return True

    def _remember(self, lease: Obj) -> None:
        spec = lease.get("spec", {})
        self._observed = (spec.get("holderIdentity") or "", str(spec.get("renewTime")))
        self._observed_at = self.clock()

    def release(self) -> None:
        """Hand the lease back on a clean shutdown so a standby takes over at once."""
        try:
            lease = self.kube.get("Lease", self.cfg.namespace, self.cfg.name)
            if lease and lease.get("spec", {}).get("holderIdentity") == self.cfg.identity:
                lease["spec"]["holderIdentity"] = ""
                lease["spec"]["leaseDurationSeconds"] = 1
                url = path("Lease", self.cfg.namespace, self.cfg.name)
                self.kube.request("PUT", url, body=lease)
        except ApiError as err:
            log.warning("could not release the lease: %s", err)
