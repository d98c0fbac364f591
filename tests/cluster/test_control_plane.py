"""The test control plane itself works: versions, fake GPU nodes, garbage collection, PyTorchJobs.

These guard the harness that kubetron's operator tests stand on: if a PyTorchJob applied by hand
does not reach Succeeded here, no MegatronJob test can.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from devtools.cluster import (
    COMPLETE_AFTER_ANNOTATION,
    EXIT_CODE_ANNOTATION,
    FAKE_NODE_SELECTOR,
    FAKE_NODE_TOLERATIONS,
    GPU_PRODUCT,
    GPU_RESOURCE,
    Cluster,
    read_versions,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def pytorchjob(
    name: str, namespace: str, *, exit_code: int = 0, restart_policy: str = "ExitCode"
) -> dict[str, Any]:
    """A Master 1 + Worker 1 PyTorchJob on the fake GPU nodes; kwok ends each pod after 2s."""
    annotations = {COMPLETE_AFTER_ANNOTATION: "2s", EXIT_CODE_ANNOTATION: str(exit_code)}

    def replica() -> dict[str, Any]:
        container = {
            "name": "pytorch",
            "image": "example.invalid/megatron:fake",
            "command": ["python", "-c", "pass"],
            "resources": {"limits": {GPU_RESOURCE: 8}},
        }
        return {
            "replicas": 1,
            "restartPolicy": restart_policy,
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {
                    "containers": [container],
                    "nodeSelector": FAKE_NODE_SELECTOR,
                    "tolerations": FAKE_NODE_TOLERATIONS,
                },
            },
        }

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "runPolicy": {"backoffLimit": 0},
            "pytorchReplicaSpecs": {"Master": replica(), "Worker": replica()},
        },
    }


def job_condition(cluster: Cluster, name: str, namespace: str) -> str | None:
    """The type of the PyTorchJob's terminal condition (Succeeded/Failed) once it is True."""
    job = cluster.get("pytorchjob", name, namespace) or {}
    for cond in job.get("status", {}).get("conditions", []):
        if cond["type"] in ("Succeeded", "Failed") and cond["status"] == "True":
            return str(cond["type"])
    return None


def job_pods(cluster: Cluster, name: str, namespace: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-n", namespace, "-l", f"training.kubeflow.org/job-name={name}", "-o", "json"
    ).stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def test_version_reports_pinned_tag(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"] == read_versions()["KUBERNETES_VERSION"]
    client = json.loads(cluster.kubectl("version", "--client", "-o", "json").stdout)
    assert client["clientVersion"]["gitVersion"] == version["gitVersion"]


def test_fake_gpu_nodes_have_eight_gpus(cluster: Cluster) -> None:
    listing = cluster.kubectl("get", "nodes").stdout
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert {n["metadata"]["name"] for n in nodes} >= set(cluster.node_names())
    for node in nodes:
        name = node["metadata"]["name"]
        if name not in cluster.node_names():
            continue  # the real node (devtools/cluster/node.py) has no GPUs
        assert name in listing
        assert node["status"]["allocatable"][GPU_RESOURCE] == "8"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == GPU_PRODUCT


def test_api_client_talks_to_the_cluster(cluster: Cluster) -> None:
    from kubernetes import client

    with cluster.api_client() as api:
        names = {n.metadata.name for n in client.CoreV1Api(api).list_node().items if n.metadata}
    assert set(cluster.node_names()) <= names


def test_garbage_collector_deletes_owned_objects(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    owner = cluster.get("configmap", "owner", namespace)
    assert owner is not None
    ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "owned", "namespace": namespace, "ownerReferences": [ref]},
        }
    )
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace, "--wait=false")
    cluster.wait_for(
        lambda: cluster.get("configmap", "owned", namespace) is None,
        timeout=60,
        what="the garbage collector to delete the owned ConfigMap",
    )


def test_pytorchjob_crd_is_established(cluster: Cluster) -> None:
    crd = cluster.get("crd", "pytorchjobs.kubeflow.org")
    assert crd is not None
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"


def test_pytorchjob_succeeds_on_fake_gpu_nodes(cluster: Cluster, namespace: str) -> None:
    cluster.apply(pytorchjob("ok", namespace))
    result = cluster.wait_for(
        lambda: job_condition(cluster, "ok", namespace),
        timeout=120,
        what="PyTorchJob ok to finish",
        interval=0.5,
    )
    assert result == "Succeeded"
    pods = job_pods(cluster, "ok", namespace)
    assert {p["metadata"]["labels"]["training.kubeflow.org/replica-type"] for p in pods} == {
        "master",
        "worker",
    }
    for pod in pods:
        assert pod["spec"]["nodeName"] in cluster.node_names()
        assert pod["status"]["phase"] == "Succeeded"


@pytest.mark.parametrize("restart_policy", ["ExitCode", "Never"])
def test_pytorchjob_fails_on_permanent_exit_code(
    cluster: Cluster, namespace: str, restart_policy: str
) -> None:
    cluster.apply(pytorchjob("bad", namespace, exit_code=1, restart_policy=restart_policy))
    result = cluster.wait_for(
        lambda: job_condition(cluster, "bad", namespace),
        timeout=120,
        what="PyTorchJob bad to finish",
        interval=0.5,
    )
    assert result == "Failed"
