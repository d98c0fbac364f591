"""Training across two real nodes: the CPU example's two pods, kept apart by pod anti-affinity
(`spec.resources.affinity`), run one on each node, in two pod networks (10.213.0.0/24 on the
first node, 10.213.2.0/24 in the second node's network namespace); torchrun's rendezvous
through worker 0's Service DNS name and gloo's collectives cross between them, and the job ends
Succeeded. A pod on the second node resolves names through the cluster DNS, reaches the API
server through the `kubernetes` Service, and nothing off the machine. When the second node is
lost mid-run (its link down, every process of it killed; then declared out-of-service, as
Kubernetes' non-graceful node shutdown asks), the job restarts as a new attempt on the
remaining node, resumes from its last checkpoint and succeeds.

The second node is added to the session's cluster by this module (`Cluster.add_node`) and
removed at its end; the operator is installed before, pinned to the first node.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator

import pytest

from devtools.cluster import Cluster, deploy, faults, host, read_versions
from devtools.cluster.node import RealNode
from tests.e2e.test_lifecycle import FIRST_SAVE, ITERS, SAVE, resumed_and_trained_once
from tests.e2e.test_node import create, pod, wait_phase
from tests.e2e.test_train import report

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

TIMEOUT = 600.0


@pytest.fixture(scope="module")
def two_nodes(cluster: Cluster) -> Iterator[tuple[str, RealNode]]:
    """A namespace watched by a `helm install`ed operator on the first node, and the second
    node (added here unless the cluster has one: `python -m devtools.cluster up --nodes 2`)."""
    namespace, release = "e2e-nodes", "kubetron-nodes"
    restricted = {"pod-security.kubernetes.io/enforce": "restricted"}
    for ns in (namespace, release):
        metadata = {"name": ns, "labels": restricted}
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})
    first = {"kubernetes.io/hostname": host.NODE_NAME}
    deploy.install_operator(cluster, release, release, watch=[namespace], crds=False,
                            progress_seconds=2, node_selector=first)  # fmt: skip
    added = cluster.add_node() if len(cluster.real_nodes) < 2 else None
    try:
        yield namespace, cluster.real_nodes[1]
    finally:
        deploy.uninstall_operator(cluster, release, release)
        cluster.kubectl("delete", "namespace", namespace, release, "--wait=false")
        if added is not None:
            cluster.remove_node(added)


def test_a_job_trains_with_one_pod_on_each_node(
    cluster: Cluster, two_nodes: tuple[str, RealNode]
) -> None:
    namespace, second = two_nodes
    name = "two-nodes"
    faults.apply_long_job(cluster, namespace, name, 40, 20,
                          resources={"affinity": deploy.one_pod_per_node(name)})  # fmt: skip
    status = deploy.wait_final(cluster, namespace, name, TIMEOUT)["status"]
    assert status["phase"] == "Succeeded", (status, report(cluster, namespace, name))
    pods = deploy.pods(cluster, namespace, name)
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    placed = {p["spec"]["nodeName"]: p["status"]["podIP"] for p in pods}
    assert set(placed) == {host.NODE_NAME, second.name}, placed
    for node_name, pod_ip in placed.items():
        net = host.NodeNet() if node_name == host.NODE_NAME else second.net
        assert ipaddress.ip_address(pod_ip) in ipaddress.ip_network(net.pod_cidr), placed
    log = deploy.logs(cluster, namespace, f"{name}-worker-0")
    assert [s for s, _, _ in deploy.steps(log)][-1] == 40, log[-3000:]


# Run in a pod on the second node: the cluster DNS (CoreDNS on the first node) through the kube-dns
# Service, the API server through the `kubernetes` Service, and no way off the machine.
REACH = f"""
import socket
from kubernetes import client, config
print("dns", socket.gethostbyname("kubernetes.default.svc.{host.CLUSTER_DOMAIN}"))
config.load_incluster_config()
print("version", client.VersionApi().get_code().git_version)
for target in ("1.1.1.1", "pypi.org."):
    try:
        socket.create_connection((target, 443), timeout=3).close()
        print("left", target)
    except OSError as err:
        print("stayed", target, type(err).__name__)
"""


def test_a_pod_on_the_second_node_reaches_dns_and_the_api_server_and_nothing_else(
    cluster: Cluster, two_nodes: tuple[str, RealNode], namespace: str
) -> None:
    _, second = two_nodes
    probe = pod(cluster, "reach", ["python", "-c", REACH])
    probe["spec"]["nodeName"] = second.name
    create(cluster, namespace, probe)
    done = wait_phase(cluster, namespace, "reach", "Succeeded", "Failed")
    logs = cluster.kubectl("logs", "-n", namespace, "reach").stdout
    assert done["status"]["phase"] == "Succeeded", logs
    assert f"dns {host.KUBERNETES_SERVICE_IP}" in logs, logs
    assert f"version {read_versions()['KUBERNETES_VERSION']}" in logs, logs
    assert "left" not in logs and logs.count("stayed") == 2, logs


def test_a_lost_node_restarts_the_job_on_the_remaining_node_from_its_checkpoint(
    cluster: Cluster, two_nodes: tuple[str, RealNode]
) -> None:
    """Runs after the test above (its second node is taken away for good). The survivor's
    collective hangs on the silent peer; the out-of-service taint evicts the lost pod
    (DeletionByTaintManager), which the operator reads as NodeLost: it restarts the job and
    keeps the next attempt off that node. The progress deadline is only a backstop, long enough
    for the node controller's grace period and a slow start of the next attempt."""
    namespace, second = two_nodes
    name = "node-loss"
    volume = faults.apply_long_job(
        cluster, namespace, name, ITERS, SAVE,
        resources={"affinity": deploy.one_pod_per_node(name, required=False)},
        runPolicy={"progressDeadlineSeconds": 300},
    )  # fmt: skip
    faults.wait_for_log(cluster, namespace, f"{name}-worker-0", FIRST_SAVE)
    before = deploy.placement(cluster, namespace, name)
    assert set(before.values()) == {host.NODE_NAME, second.name}, before
    lost = time.monotonic()
    faults.lose_node(cluster, second)
    faults.declare_out_of_service(cluster, second.name)
    not_ready_s = time.monotonic() - lost
    status = deploy.wait_final(cluster, namespace, name, TIMEOUT)["status"]
    assert status["phase"] == "Succeeded", (status, report(cluster, namespace, name))
    assert (status["attempt"], status["restarts"]) == (2, 1), status
    last = status["failures"]["last"]
    assert (last["cause"], last["node"], last["attempt"]) == ("NodeLost", second.name, 1), status
    assert [a["node"] for a in status["avoidedNodes"]] == [second.name], status
    after = deploy.placement(cluster, namespace, name)
    assert set(after.values()) == {host.NODE_NAME}, after
    resumed_and_trained_once(cluster, namespace, name, volume)
    print(f"node lost -> not Ready and tainted out-of-service after {not_ready_s:.0f} s; "
          f"job Succeeded {time.monotonic() - lost:.0f} s after the loss")  # fmt: skip
