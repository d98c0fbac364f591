"""Trainer pods of every example pass the restricted Pod Security Standard, checked by the real
API server's admission in a namespace that enforces it (server-side dry run of the pods the
training-operator would create from the rendered templates, to which it adds no container:
kubetron's PyTorchJobs have no Master, the only replica type it adds an init container for).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.cluster import Cluster, ClusterError
from devtools.cluster.kubetron import EXAMPLES
from kubetron_api.parse import load_documents, parse_job
from kubetron_operator.plan import plan
from kubetron_operator.render import render

pytestmark = pytest.mark.cluster

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}  # fmt: skip


def _pods(path: Path, namespace: str) -> list[dict[str, Any]]:
    (_, obj), *_ = load_documents(path)
    obj["metadata"]["namespace"] = namespace
    job = parse_job(obj)
    pytorchjob = render(job, plan(job))[1]
    pods = []
    for replica, spec in pytorchjob["spec"]["pytorchReplicaSpecs"].items():
        template = spec["template"]
        metadata = {**template["metadata"], "name": f"{job.name}-{replica.lower()}-0",
                    "namespace": namespace}  # fmt: skip
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                     "spec": template["spec"]})  # fmt: skip
    return pods


@pytest.fixture
def restricted(cluster: Cluster, namespace: str) -> str:
    cluster.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in RESTRICTED.items()))
    return namespace


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_pods_are_admitted_under_restricted(
    cluster: Cluster, restricted: str, path: Path
) -> None:
    for pod in _pods(path, restricted):
        if name := pod["spec"].get("priorityClassName"):  # admission checks that it exists
            cluster.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                           "metadata": {"name": name}, "value": 100})  # fmt: skip
        cluster.kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(pod))


def test_restricted_namespace_does_refuse_a_pod_without_the_defaults(
    cluster: Cluster, restricted: str
) -> None:
    """The check above can fail: the same pod with the securityContexts removed is refused."""
    pod = _pods(EXAMPLES[0], restricted)[0]
    del pod["spec"]["securityContext"]
    for container in pod["spec"]["containers"]:
        del container["securityContext"]
    with pytest.raises(ClusterError, match="violates PodSecurity"):
        cluster.kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(pod))
