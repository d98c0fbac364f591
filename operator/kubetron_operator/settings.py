"""Operator settings from flags, with environment variables as defaults (12-factor style).

One frozen dataclass, so every component reads the same values; the Helm chart sets the env.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from kubetron_api.v1alpha1 import Backend


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()
    leader_elect: bool = True
    lease_name: str = "kubetron-operator"
    lease_namespace: str = "kubetron-system"
    identity: str = ""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    metrics_port: int = 8080
    health_port: int = 8081
    bind_address: str = "0.0.0.0"
    log_format: str = "text"
    log_level: str = "INFO"
    resync_period: float = 30.0
    progress_period: float = 15.0
    kubeconfig: str | None = None
    backend: Backend = Backend.PYTORCHJOB

    @property
    def all_namespaces(self) -> bool:
        return not self.namespaces


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ
) -> Settings:
    """Flags override env (KUBETRON_*, POD_NAME, POD_NAMESPACE), which override defaults."""
    p = _parser(env)
    a = p.parse_args(argv)
    if a.renew_deadline >= a.lease_duration:
        p.error("--renew-deadline must be shorter than --lease-duration")
    if a.retry_period >= a.renew_deadline:
        p.error("--retry-period must be shorter than --renew-deadline")
    values = {f.name: getattr(a, f.name) for f in fields(Settings)}
    values["namespaces"] = tuple(ns.strip() for ns in a.namespaces.split(",") if ns.strip())
    values["log_level"] = a.log_level.upper()
    values["backend"] = Backend(a.backend)
    return Settings(**values)


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """One flag per Settings field (its dest is the field's name), defaults from `env`."""
    d = Settings()
    p = argparse.ArgumentParser(prog="kubetron-operator", description="The MegatronJob operator.")
    p.add_argument(
        "--namespaces",
        default=env.get("KUBETRON_NAMESPACES", ""),
        help="comma-separated namespaces to watch; empty watches all",
    )
    p.add_argument(
        "--leader-elect",
        type=_bool,
        nargs="?",
        const=True,
        default=_bool(env.get("KUBETRON_LEADER_ELECT", "true")),
        help="elect a leader on a coordination.k8s.io Lease (default true)",
    )
    p.add_argument("--no-leader-elect", dest="leader_elect", action="store_false")
    p.add_argument("--lease-name", default=env.get("KUBETRON_LEASE_NAME", d.lease_name))
    p.add_argument("--lease-namespace", default=env.get("POD_NAMESPACE", d.lease_namespace))
    p.add_argument("--identity", default=env.get("POD_NAME") or socket.gethostname())
    p.add_argument("--lease-duration", type=float, default=d.lease_duration)
    p.add_argument("--renew-deadline", type=float, default=d.renew_deadline)
    p.add_argument("--retry-period", type=float, default=d.retry_period)
    p.add_argument(
        "--metrics-port", type=int, default=int(env.get("KUBETRON_METRICS_PORT", d.metrics_port))
    )
    p.add_argument(
        "--health-port", type=int, default=int(env.get("KUBETRON_HEALTH_PORT", d.health_port))
    )
    p.add_argument("--bind-address", default=env.get("KUBETRON_BIND_ADDRESS", d.bind_address))
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=env.get("KUBETRON_LOG_FORMAT", d.log_format),
    )
    p.add_argument("--log-level", default=env.get("KUBETRON_LOG_LEVEL", d.log_level))
    p.add_argument(
        "--resync-period",
        type=float,
        default=d.resync_period,
        help="seconds between full re-reconciles of every MegatronJob",
    )
    p.add_argument(
        "--progress-period",
        type=float,
        default=d.progress_period,
        help="seconds between reads of a running job's progress from its rank 0 metrics "
        "endpoint, on reconcile (0: never; status.progress stays empty)",
    )
    p.add_argument(
        "--kubeconfig",
        default=env.get("KUBECONFIG"),
        help="kubeconfig file; in-cluster config when unset",
    )
    p.add_argument(
        "--backend",
        choices=[b.value for b in Backend],
        default=env.get("KUBETRON_BACKEND", d.backend.value),
        help="the Kubeflow job of a MegatronJob without spec.backend (TrainJob: Kubeflow "
        "Trainer v2 on kubetron's ClusterTrainingRuntime)",
    )
    return p
