"""A real, throw-away Kubernetes cluster for kubetron's tests, benchmarks and `make demo`.

control_plane.Cluster starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok
(fake GPU nodes) and the Kubeflow training-operator from the binaries `make tools` builds, and
optionally a real worker node (node.py, host.py) whose pods run from `make images`' images.
detached.py keeps one such cluster running across processes (`python -m devtools.cluster up`,
`make demo`); kubetron.py puts the operator on it as a process, deploy.py with its Helm chart,
faults.py breaks running trainer pods. The names below are what callers usually need.
"""

from devtools.cluster.config import (
    COMPLETE_AFTER_ANNOTATION,
    EXIT_CODE_ANNOTATION,
    FAKE_NODE_SELECTOR,
    FAKE_NODE_TOLERATIONS,
    GPU_PRODUCT,
    GPU_RESOURCE,
    ClusterConfig,
    kwok_gpu_node,
)
from devtools.cluster.control_plane import Cluster
from devtools.cluster.detached import running_cluster
from devtools.cluster.paths import (
    KUBETRON_CRDS,
    KUEUE_CRDS,
    REPO_ROOT,
    cache_dir,
    default_bin_dir,
    missing_tools,
    read_versions,
)
from devtools.cluster.waiting import ClusterError, http_get, wait_until

__all__ = [
    "COMPLETE_AFTER_ANNOTATION",
    "EXIT_CODE_ANNOTATION",
    "FAKE_NODE_SELECTOR",
    "FAKE_NODE_TOLERATIONS",
    "GPU_PRODUCT",
    "GPU_RESOURCE",
    "KUBETRON_CRDS",
    "KUEUE_CRDS",
    "REPO_ROOT",
    "Cluster",
    "ClusterConfig",
    "ClusterError",
    "cache_dir",
    "default_bin_dir",
    "http_get",
    "kwok_gpu_node",
    "missing_tools",
    "read_versions",
    "running_cluster",
    "wait_until",
]
