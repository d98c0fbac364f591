"""Fixtures that put kubetron itself on the test control plane: its CRD, and operator processes.

The operator runs as a real process (`python -m kubetron_operator`) against the real API server,
authenticated as its ServiceAccount with a token from the TokenRequest API and bound to exactly
the RBAC of manifests/rbac/, so every test also proves the RBAC is enough.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.harness import (
    FAKE_NODE_SELECTOR,
    FAKE_NODE_TOLERATIONS,
    Cluster,
    http_get,
    wait_until,
)
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "manifests" / "crds" / "kubetron.io_megatronjobs.yaml"
RBAC = ROOT / "manifests" / "rbac" / "operator.yaml"
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
OPERATOR_NS = "kubetron-system"
OPERATOR_SA = f"system:serviceaccount:{OPERATOR_NS}:kubetron-operator"


def install_kubetron(cluster: Cluster) -> None:
    """The CRD (waiting until Established) and the operator's RBAC."""
    cluster.apply(CRD)
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/megatronjobs.kubetron.io", "--timeout=60s"
    )
    if cluster.get("namespace", OPERATOR_NS) is None:
        cluster.kubectl("create", "namespace", OPERATOR_NS)
    cluster.apply(RBAC)


@pytest.fixture(scope="session")
def kubetron(cluster: Cluster) -> Cluster:
    install_kubetron(cluster)
    return cluster


@pytest.fixture(scope="session")
def operator_kubeconfig(kubetron: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig that authenticates as the operator's ServiceAccount (bearer token)."""
    token = kubetron.kubectl(
        "create", "token", "kubetron-operator", "-n", OPERATOR_NS, "--duration=4h"
    ).stdout.strip()
    admin = yaml.safe_load(kubetron.kubeconfig.read_text())
    cfg = copy.deepcopy(admin)
    cfg["users"] = [{"name": "operator", "user": {"token": token}}]
    for ctx in cfg["contexts"]:
        ctx["context"]["user"] = "operator"
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    return path


class OperatorProcess:
    """One `python -m kubetron_operator` with its own ports and log file."""

    def __init__(self, kubeconfig: Path, log_dir: Path, name: str, *extra: str) -> None:
        self.name = name
        self.metrics_port, self.health_port = free_port(), free_port()
        self.log_path = log_dir / f"{name}.log"
        argv = [
            sys.executable, "-m", "kubetron_operator",
            "--kubeconfig", str(kubeconfig),
            "--identity", name,
            "--lease-namespace", OPERATOR_NS,
            "--metrics-port", str(self.metrics_port),
            "--health-port", str(self.health_port),
            "--bind-address", "127.0.0.1",
            "--resync-period", "5",
            # kwok's pods have made-up IPs that exist on no network: never dial them
            "--progress-period", "0",
            *extra,
        ]  # fmt: skip
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until(self.ready, timeout=60, what=f"operator {name} /readyz", interval=0.2)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator {self.name} exited:\n{self.log()}")
        try:
            return "ready" in http_get(f"http://127.0.0.1:{self.health_port}/readyz")
        except OSError:
            return False

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def sample(self, name: str, **labels: str) -> float | None:
        """One sample's value from /metrics, None when absent."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        key = f"{name}{{{want}}}" if labels else name
        for line in self.metrics().splitlines():
            if line.startswith(key + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def is_leader(self) -> bool:
        return self.sample("kubetron_operator_leader") == 1.0

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-6000:]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        self._log.close()


@pytest.fixture
def start_operator(operator_kubeconfig: Path, tmp_path: Path) -> Iterator[Any]:
    """Factory: start_operator(name, *flags) -> OperatorProcess; all stopped after the test."""
    started: list[OperatorProcess] = []

    def start(name: str = "op-0", *extra: str) -> OperatorProcess:
        op = OperatorProcess(operator_kubeconfig, tmp_path, name, *extra)
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
        if os.environ.get("KUBETRON_SHOW_OPERATOR_LOGS"):
            print(op.log())


def fake_gpu_job(
    name: str,
    *,
    preset: str = "qwen3-0.6b",
    nodes: int = 2,
    complete_after: str = "2s",
    exit_code: int = 0,
    suspend: bool = False,
    **spec: Any,
) -> dict[str, Any]:
    """A MegatronJob whose pods land on kwok's fake GPU nodes and end as told."""
    resources = {
        "nodes": nodes,
        "gpusPerNode": 8,
        "nodeSelector": FAKE_NODE_SELECTOR,
        "tolerations": FAKE_NODE_TOLERATIONS,
        "podAnnotations": {
            "kwok.kubetron.io/complete-after": complete_after,
            "kwok.kubetron.io/exit-code": str(exit_code),
        },
    }
    body: dict[str, Any] = {
        "model": {"preset": preset},
        "recipe": {"globalBatchSize": 16 * nodes, "microBatchSize": 1, "seqLength": 1024},
        "resources": resources,
        "runPolicy": {"suspend": suspend, "backoffLimit": 0},
    }
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value}
    return {
        "apiVersion": "kubetron.io/v1alpha1",
        "kind": "MegatronJob",
        "metadata": {"name": name},
        "spec": body,
    }


def wait_phase(cluster: Cluster, ns: str, name: str, phase: str, timeout: float = 90) -> dict:
    def check() -> dict | None:
        obj = cluster.get("megatronjob", name, ns)
        status = (obj or {}).get("status") or {}
        return obj if status.get("phase") == phase else None

    return cluster.wait_for(check, timeout=timeout, what=f"MegatronJob {ns}/{name} {phase}")
