"""kubetron on a cluster with a real node, as a user installs and uses it: `helm install` of the
chart (operator in a pod from the locally built image), a PersistentVolumeClaim for checkpoints,
`kubectl apply` of a MegatronJob, and watching it. Shared by `make demo` (devtools/demo.py)
and the e2e tests, so the demo shows exactly what the tests check.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from devtools.cluster import node
from devtools.cluster.control_plane import Cluster
from devtools.cluster.host import NodeError
from devtools.cluster.node import RealNode
from devtools.cluster.paths import REPO_ROOT, cache_dir
from devtools.cluster.waiting import ClusterError
from kubetron_operator.render import CONTAINER, JOB_NAME_LABEL

CHART = REPO_ROOT / "charts" / "kubetron"
EXAMPLE = REPO_ROOT / "manifests" / "examples" / "gpt-tiny-cpu.yaml"
OPERATOR_IMAGE = "ghcr.io/kubetron/operator:"
TRAINER_CPU_IMAGE = "ghcr.io/kubetron/trainer:"
FINAL_PHASES = ("Succeeded", "Failed")
# A trainer's step line (kubetron_trainer.runtime.loop.Progress.line).
STEP_LINE = re.compile(r"step (\d+)/(\d+) \| loss ([0-9.]+) .*? \| ([0-9,]+) tok/s")

Obj = dict[str, Any]


def built_image(prefix: str) -> str:
    """The name of the image `make images` built with this prefix (trainer: the CPU build)."""
    return node.built_image(cache_dir(), prefix, "-cpu" if prefix == TRAINER_CPU_IMAGE else "")


def real_node(cluster: Cluster) -> RealNode:
    if cluster.node is None:
        raise NodeError("this cluster has no real node (ClusterConfig.real_node)")
    return cluster.node


def helm(cluster: Cluster, *args: str, timeout: float = 300) -> str:
    argv = [str(cluster.bin_dir / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ClusterError(f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def install_operator(
    cluster: Cluster,
    release: str = "kubetron",
    namespace: str = "kubetron-system",
    watch: list[str] | None = None,
    crds: bool = True,
    progress_seconds: int | None = None,
    node_selector: dict[str, str] | None = None,
    train_job: bool = False,
) -> None:
    """`helm upgrade --install` the chart with the built operator image; waits until it is
    Available (its readiness probe passes only once it reaches the API server from the pod).
    `crds=False` when the CRD is already there (the test session applies it at start);
    `progress_seconds` reconciles and reads live progress that often (default: 30 s, 15 s);
    `node_selector` pins the operator's pod (off a node a test takes away); `train_job` turns
    the TrainJob backend on beside the PyTorchJob (its runtime and RBAC; Trainer v2 runs)."""
    repository, _, tag = built_image(OPERATOR_IMAGE).rpartition(":")
    sets = {
        "image.repository": repository,
        "image.tag": tag,
        "image.pullPolicy": "Never",  # imported into the node's containerd, never pulled
        "crds.install": str(crds).lower(),
        "trainJob.enabled": str(train_job).lower(),
    }
    args = ["upgrade", "--install", release, str(CHART), "--namespace", namespace]
    args += ["--create-namespace", "--wait", "--timeout", "180s"]
    args += [a for key, value in sets.items() for a in ("--set", f"{key}={value}")]
    if watch:
        args += ["--set", f"watchNamespaces={{{','.join(watch)}}}"]
    if progress_seconds:  # a short job's progress shows only with frequent reconciles
        flags = f"--resync-period={progress_seconds},--progress-period={progress_seconds}"
        args += ["--set", f"operator.extraArgs={{{flags}}}"]
    if node_selector:
        args += ["--set-json", f"nodeSelector={json.dumps(node_selector)}"]
    helm(cluster, *args)


def uninstall_operator(
    cluster: Cluster, release: str = "kubetron", namespace: str = "kubetron-system"
) -> None:
    helm(cluster, "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s")


def checkpoint_claim(cluster: Cluster, namespace: str, claim: str) -> Path:
    """A ReadWriteMany claim `claim` in `namespace`, bound to a hostPath volume on the real
    node; returns the volume's directory on the host (where the checkpoints land)."""
    real = real_node(cluster)
    pv = real.host_path_volume(f"{namespace}-{claim}")
    spec = {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": pv["spec"]["storageClassName"],
        "volumeName": pv["metadata"]["name"],
        "resources": {"requests": {"storage": "1Gi"}},
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": namespace},
        "spec": spec,
    }
    cluster.apply([pv, pvc])
    cluster.wait_for(
        lambda: (
            (cluster.get("pvc", claim, namespace) or {}).get("status", {}).get("phase") == "Bound"
        ),
        timeout=30,
        what=f"PersistentVolumeClaim {namespace}/{claim} Bound",
    )
    return Path(pv["spec"]["hostPath"]["path"])


def example_job(path: Path = EXAMPLE, **changes: Any) -> Obj:
    """The example MegatronJob as written, with `changes` merged into its spec (dicts merge)."""
    job: Obj = yaml.safe_load(path.read_text())
    _merge(job["spec"], changes)
    return job


def _merge(into: Obj, changes: Obj) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def one_pod_per_node(name: str, required: bool = True) -> Obj:
    """`spec.resources.affinity` for job `name`: no two of its pods on one node (`required`), or
    spread where they can be but together where they must (a restart on the nodes that
    remain)."""
    term = {"labelSelector": {"matchLabels": {JOB_NAME_LABEL: name}},
            "topologyKey": "kubernetes.io/hostname"}  # fmt: skip
    if required:
        return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    preferred = [{"weight": 100, "podAffinityTerm": term}]
    return {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": preferred}}


def placement(cluster: Cluster, namespace: str, job: str) -> dict[str, str]:
    """pod name -> node name, of the job's pods."""
    return {p["metadata"]["name"]: p["spec"].get("nodeName", "")
            for p in pods(cluster, namespace, job)}  # fmt: skip


def wait_final(
    cluster: Cluster,
    namespace: str,
    name: str,
    timeout: float,
    on_phase: Callable[[str, float], None] = lambda phase, elapsed: None,
) -> Obj:
    """Wait until the MegatronJob is Succeeded or Failed; report each change of phase or of
    the progress step."""
    started, seen = time.monotonic(), ("", None)

    def final() -> Obj | None:
        nonlocal seen
        job = cluster.get("megatronjob", name, namespace) or {}
        status = job.get("status", {})
        current = str(status.get("phase", ""))
        step = (status.get("progress") or {}).get("step")
        if current and (current, step) != seen:
            seen = (current, step)
            on_phase(current, time.monotonic() - started)
        return job if current in FINAL_PHASES else None

    return cluster.wait_for(
        final, timeout=timeout, what=f"MegatronJob {namespace}/{name} to finish", interval=1.0
    )


def pods(cluster: Cluster, namespace: str, job: str) -> list[Obj]:
    selector = f"{JOB_NAME_LABEL}={job}"  # kubetron's, on the pods of either backend
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    items: list[Obj] = json.loads(out)["items"]
    return sorted(items, key=lambda p: p["metadata"]["name"])


def logs(cluster: Cluster, namespace: str, pod: str, container: str = CONTAINER) -> str:
    return cluster.kubectl("logs", "-n", namespace, pod, "-c", container).stdout


def steps(log: str) -> list[tuple[int, float, float]]:
    """(step, loss, tokens/s) of every step line in a trainer log."""
    return [(int(m[1]), float(m[3]), float(m[4].replace(",", ""))) for m in STEP_LINE.finditer(log)]
