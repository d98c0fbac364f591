"""kubetron itself on a dev cluster: its CRD and RBAC, operator processes, fake GPU jobs.

The operator runs as a real process (`python -m kubetron_operator`) against the real API server,
authenticated as its ServiceAccount with a token from the TokenRequest API and bound to exactly
the RBAC of manifests/rbac/, so every cluster test also proves the RBAC is enough. Its jobs land
on kwok's fake GPU nodes and end as their annotations say (kwok_stages.yaml).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from devtools.cluster.base import ClusterBase
from devtools.cluster.config import (
    COMPLETE_AFTER_ANNOTATION,
    EXIT_CODE_ANNOTATION,
    FAKE_NODE_SELECTOR,
    FAKE_NODE_TOLERATIONS,
)
from devtools.cluster.paths import REPO_ROOT
from devtools.cluster.waiting import http_get, wait_until
from devtools.ports import free_port

CRD = REPO_ROOT / "manifests" / "crds" / "kubetron.io_megatronjobs.yaml"
RBAC = REPO_ROOT / "manifests" / "rbac" / "operator.yaml"
EXAMPLES = sorted((REPO_ROOT / "manifests" / "examples").glob("*.yaml"))
OPERATOR_NS = "kubetron-system"
OPERATOR_SA = f"system:serviceaccount:{OPERATOR_NS}:kubetron-operator"


def install_kubetron(cluster: ClusterBase) -> None:
    """The CRD (waiting until Established) and the operator's RBAC."""
    cluster.apply(CRD)
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/megatronjobs.kubetron.io", "--timeout=60s"
    )
    if cluster.get("namespace", OPERATOR_NS) is None:
        cluster.kubectl("create", "namespace", OPERATOR_NS)
    cluster.apply(RBAC)


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
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
        )
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
            COMPLETE_AFTER_ANNOTATION: complete_after,
            EXIT_CODE_ANNOTATION: str(exit_code),
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


def wait_phase(cluster: ClusterBase, ns: str, name: str, phase: str, timeout: float = 90) -> dict:
    def check() -> dict | None:
        obj = cluster.get("megatronjob", name, ns)
        status = (obj or {}).get("status") or {}
        return obj if status.get("phase") == phase else None

    return cluster.wait_for(check, timeout=timeout, what=f"MegatronJob {ns}/{name} {phase}")
