"""Kubeflow Trainer v2 and JobSet on the dev control plane: the controllers of the TrainJob backend.

kubetron renders a MegatronJob with `spec.backend: TrainJob` as a Trainer v2 TrainJob on its
ClusterTrainingRuntime; the Trainer v2 controller turns it into a JobSet, and the JobSet
controller into one indexed Job and its pods (kwok runs them). Both managers run outside the
cluster, as the training-operator does, from the binaries and CRDs that `make tools` builds:

- each with its own configuration file: no leader election, no metrics, health probes and the
  webhook server on free loopback ports, and internal certificate management off;
- their webhook servers present the harness's webhook certificate (pki.py: loopback SANs), and
  their admission webhooks are registered by URL on loopback, so the API server runs the real
  TrainJob/ClusterTrainingRuntime validation and defaulting and JobSet's. JobSet's pod webhooks
  (exclusive placement only) are not registered: they would intercept every pod of the cluster.

The Trainer's webhook server has no certificate directory setting; it reads
$TMPDIR/k8s-webhook-server/serving-certs, so it runs with a TMPDIR of its own under the workdir.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from devtools.cluster.pki import b64
from devtools.cluster.waiting import ClusterError, http_get
from devtools.ports import free_port

if TYPE_CHECKING:
    from devtools.cluster.control_plane import Cluster

TRAINER = "trainer"
JOBSET = "jobset"
TRAINER_BINARY = "trainer-controller-manager"
JOBSET_BINARY = "jobset"
CRDS = "crds/trainer"  # TrainJob, TrainingRuntime, ClusterTrainingRuntime, JobSet
WEBHOOKS = {TRAINER: "crds/trainer-webhooks.yaml", JOBSET: "crds/jobset-webhooks.yaml"}
# Registered webhook configurations carry this prefix, so stop() finds them again.
WEBHOOK_PREFIX = "kubetron-dev-"


@dataclass(frozen=True)
class TrainerPorts:
    """Loopback ports of the two managers, picked free when they start."""

    trainer_probe: int = field(default_factory=free_port)
    trainer_webhook: int = field(default_factory=free_port)
    jobset_probe: int = field(default_factory=free_port)
    jobset_webhook: int = field(default_factory=free_port)


def _trainer_config(ports: TrainerPorts) -> dict[str, Any]:
    return {
        "apiVersion": "config.trainer.kubeflow.org/v1alpha1",
        "kind": "Configuration",
        "webhook": {"host": "127.0.0.1", "port": ports.trainer_webhook},
        "metrics": {"bindAddress": "0"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports.trainer_probe}"},
        "leaderElection": {"leaderElect": False},
        "certManagement": {"enable": False},
    }


def _jobset_config(ports: TrainerPorts, certs: Path) -> dict[str, Any]:
    return {
        "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
        "kind": "Configuration",
        "webhook": {"host": "127.0.0.1", "port": ports.jobset_webhook, "certDir": str(certs)},
        "metrics": {"bindAddress": "0", "certDir": str(certs)},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports.jobset_probe}"},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
    }


def webhook_configs(cluster: Cluster, ports: TrainerPorts | None = None) -> list[dict[str, Any]]:
    """Both managers' webhook configurations, pointed at them on loopback by URL (without
    `ports`: only the names, for removal). JobSet's pod webhooks are left out."""
    base = {
        TRAINER: f"https://127.0.0.1:{ports.trainer_webhook}" if ports else "",
        JOBSET: f"https://127.0.0.1:{ports.jobset_webhook}" if ports else "",
    }
    configs = []
    for component, path in WEBHOOKS.items():
        for doc in yaml.safe_load_all((cluster.bin_dir / path).read_text()):
            if not doc:
                continue
            hooks = [
                hook
                for hook in doc.get("webhooks", [])
                if not any("pods" in rule.get("resources", []) for rule in hook.get("rules", []))
            ]
            for hook in hooks:
                url = base[component] + hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": url, "caBundle": b64(cluster.pki.ca_crt)}
            name = f"{WEBHOOK_PREFIX}{component}-{doc['metadata']['name']}"
            configs.append({**doc, "metadata": {"name": name}, "webhooks": hooks})
    return configs


def _ready(port: int) -> bool:
    return http_get(f"http://127.0.0.1:{port}/readyz") == "ok"


def start(cluster: Cluster) -> None:
    """Install the CRDs, start JobSet and the Trainer, wait for /readyz, register the webhooks.
    Idempotent: nothing happens while both run."""
    running = [cluster.components.get(name) for name in (TRAINER, JOBSET)]
    if all(c is not None and c.alive() for c in running):
        return
    missing = [b for b in (TRAINER_BINARY, JOBSET_BINARY) if not (cluster.bin_dir / b).is_file()]
    if missing:
        raise ClusterError(f"missing in {cluster.bin_dir}: {', '.join(missing)}; run `make tools`")
    cluster.install_crds(sorted((cluster.bin_dir / CRDS).glob("*.yaml")))
    ports = TrainerPorts()
    tmp = cluster.workdir / "trainer-v2"
    certs = tmp / "k8s-webhook-server" / "serving-certs"  # the Trainer's fixed place in TMPDIR
    certs.mkdir(parents=True, exist_ok=True)
    shutil.copy(cluster.pki.webhook_crt, certs / "tls.crt")
    shutil.copy(cluster.pki.webhook_key, certs / "tls.key")
    for name, config in ((TRAINER, _trainer_config(ports)), (JOBSET, _jobset_config(ports, certs))):
        path = tmp / f"{name}-config.yaml"
        path.write_text(yaml.safe_dump(config))
        binary = cluster.bin_dir / (TRAINER_BINARY if name == TRAINER else JOBSET_BINARY)
        argv = [str(binary), f"--config={path}", "--zap-log-level=info"]
        cluster._launch(name, argv, cluster._env({"TMPDIR": str(tmp)}))
    for name, port in ((TRAINER, ports.trainer_probe), (JOBSET, ports.jobset_probe)):
        cluster.wait_for(
            functools.partial(_ready, port),
            timeout=cluster.config.startup_timeout,
            what=f"{name} /readyz",
            interval=0.3,
        )
    cluster.apply(webhook_configs(cluster, ports))


def stop(cluster: Cluster) -> None:
    """Unregister the webhooks, then stop both managers (their CRDs and objects stay)."""
    for doc in webhook_configs(cluster):
        kind = doc["kind"].lower()
        cluster.kubectl("delete", kind, doc["metadata"]["name"], "--ignore-not-found")
    for name in (TRAINER, JOBSET):
        component = cluster.components.pop(name, None)
        if component is not None:
            component.stop()
