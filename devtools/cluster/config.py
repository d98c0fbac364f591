"""What a dev cluster is made of: its knobs, its loopback ports, and the fake GPU nodes of kwok.

kwok fakes GPU nodes (`nvidia.com/gpu: 8`) and the lifecycle of the pods bound to them
(kwok_stages.yaml: pod annotations pick when a pod ends and with which exit code); tests put
FAKE_NODE_SELECTOR and FAKE_NODE_TOLERATIONS on pods to land there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from devtools.cluster.node import NodePorts
from devtools.ports import free_port

# What the fake GPU nodes look like; tests put these on pods to land there.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
FAKE_GPU_LABEL = "kubetron.io/fake-gpu"
FAKE_NODE_SELECTOR = {FAKE_GPU_LABEL: "true"}
FAKE_NODE_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
FAKE_NODE_TOLERATIONS = [{**FAKE_NODE_TAINT, "operator": "Equal"}]
# Pod annotations read by kwok_stages.yaml.
COMPLETE_AFTER_ANNOTATION = "kwok.kubetron.io/complete-after"
EXIT_CODE_ANNOTATION = "kwok.kubetron.io/exit-code"


@dataclass
class ClusterConfig:
    """Knobs of a test cluster; the defaults are what the `cluster` fixture uses."""

    nodes: int = 2
    gpus_per_node: int = 8
    gpu_product: str = GPU_PRODUCT
    training_operator: bool = True
    startup_timeout: float = 90.0
    # A real worker node (node.py): needs root, `make tools` and `make images`.
    real_node: bool = False
    # How many real nodes (with real_node): the first on the host's bridge, each further one in
    # a network namespace of its own (node.py); Cluster.add_node() adds one to a running cluster.
    real_nodes: int = 1
    # CRD files installed before kube-controller-manager starts, so that its garbage collector
    # watches them from the start (it rediscovers API resources only every 30 s).
    crds: list[str] = field(default_factory=list)


@dataclass
class Ports:
    """Loopback ports of one cluster, picked free at start."""

    etcd: int = field(default_factory=free_port)
    etcd_peer: int = field(default_factory=free_port)
    apiserver: int = field(default_factory=free_port)
    controller_manager: int = field(default_factory=free_port)
    scheduler: int = field(default_factory=free_port)
    kwok: int = field(default_factory=free_port)
    operator_probe: int = field(default_factory=free_port)
    operator_webhook: int = field(default_factory=free_port)
    kueue_probe: int = field(default_factory=free_port)
    kueue_webhook: int = field(default_factory=free_port)
    node: NodePorts = field(default_factory=NodePorts.pick)


def kwok_gpu_node(
    name: str,
    gpus: int,
    gpu_product: str,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """A kwok fake GPU node (kwok's stages make its pods run), with `labels` and `taints` added
    to the defaults (hostname, the fake-GPU label and taint, the GPU product and count)."""
    resources = {
        "cpu": "128", "memory": "2Ti", "pods": "110", "ephemeral-storage": "10Ti",
        GPU_RESOURCE: str(gpus),
    }  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                FAKE_GPU_LABEL: "true",
                "nvidia.com/gpu.product": gpu_product,
                "nvidia.com/gpu.count": str(gpus),
                **(labels or {}),
            },
        },
        "spec": {"taints": [FAKE_NODE_TAINT, *(taints or [])]},
        "status": {"allocatable": resources, "capacity": resources},
    }
