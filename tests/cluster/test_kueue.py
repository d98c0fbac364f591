"""Queued MegatronJobs through the real Kueue (v0.17, started by the harness for this module).

Kueue admits a job's PyTorchJob when its ClusterQueue has quota and un-suspends it; a job over
quota waits suspended, with the MegatronJob in phase Queued and Kueue's reason in its Queued
condition, and runs once the first finishes; the operator never un-suspends what Kueue holds,
even when it re-applies the PyTorchJob for a new generation; a user's suspend deactivates the
Workload and a resume queues the job again; and topology-aware scheduling places a 4-node job
inside one block of labelled kwok nodes and each model-parallel group of a TP8 x PP2 x DP2 job
inside one rack.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.cluster import GPU_PRODUCT, Cluster, ClusterError, kwok_gpu_node
from devtools.cluster.kubetron import fake_gpu_job, wait_phase
from kubetron_api.dims import ParallelDims
from kubetron_api.wire import NODE_RANKS_ENV
from kubetron_operator.render import REPLICA_INDEX_LABEL
from kubetron_operator.scheduling.kueue import JOB_UID_LABEL, SLICE_SIZE, SLICE_TOPOLOGY

pytestmark = pytest.mark.cluster

KUEUE_API = "kueue.x-k8s.io/v1beta2"
FLAVOR, CLUSTER_QUEUE, QUEUE = "kubetron-gpu", "kubetron-gpus", "team"
TAS_FLAVOR, TAS_CLUSTER_QUEUE, TAS_QUEUE = "kubetron-tas", "kubetron-tas", "tas"
PREEMPT_CLUSTER_QUEUE = "kubetron-preempting"  # 8 GPUs; higher priority preempts lower
LOW, HIGH = "kubetron-test-low", "kubetron-test-high"  # PriorityClasses
# Nodes of their own for the placement test, tainted so no other test's pods land there.
TAS_LABEL = "kubetron.io/topology-test"
TAS_TAINT = {"key": TAS_LABEL, "value": "true", "effect": "NoSchedule"}
BLOCK, RACK, HOST = "kubetron.io/test-block", "kubetron.io/test-rack", "kubernetes.io/hostname"
# block b0: racks r0, r1 with one node each; block b1: rack r2 with three nodes, r3 with two
TAS_NODES = {"tas-0": ("b0", "r0"), "tas-1": ("b0", "r1"), "tas-2": ("b1", "r2"),
             "tas-3": ("b1", "r2"), "tas-4": ("b1", "r2"), "tas-5": ("b1", "r3"),
             "tas-6": ("b1", "r3")}  # fmt: skip
COVERED = ["cpu", "memory", "nvidia.com/gpu"]


def cluster_queue(name: str, flavor: str, gpus: int, preempt: bool = False) -> dict[str, Any]:
    quota = {"cpu": "1000", "memory": "10Ti", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": KUEUE_API,
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {},
            "preemption": {"withinClusterQueue": "LowerPriority" if preempt else "Never"},
            "resourceGroups": [
                {
                    "coveredResources": COVERED,
                    "flavors": [
                        {
                            "name": flavor,
                            "resources": [{"name": r, "nominalQuota": quota[r]} for r in COVERED],
                        }
                    ],
                }
            ],
        },
    }


def tas_nodes() -> list[dict[str, Any]]:
    return [
        kwok_gpu_node(
            name,
            8,
            GPU_PRODUCT,
            labels={TAS_LABEL: "true", BLOCK: block, RACK: rack},
            taints=[TAS_TAINT],
        )
        for name, (block, rack) in TAS_NODES.items()
    ]


def tas_objects() -> list[dict[str, Any]]:
    """Seven labelled nodes of their own (`tas_nodes`), the Topology over them and a
    topology-aware flavor with 56 GPUs in the ClusterQueue TAS_CLUSTER_QUEUE."""
    return [
        *tas_nodes(),
        {
            "apiVersion": KUEUE_API,
            "kind": "Topology",
            "metadata": {"name": "kubetron-test"},
            "spec": {"levels": [{"nodeLabel": BLOCK}, {"nodeLabel": RACK}, {"nodeLabel": HOST}]},
        },
        {
            "apiVersion": KUEUE_API,
            "kind": "ResourceFlavor",
            "metadata": {"name": TAS_FLAVOR},
            "spec": {
                "nodeLabels": {TAS_LABEL: "true"},
                "topologyName": "kubetron-test",
                # Kueue adds these to the pod templates when it starts a job
                "tolerations": [{**TAS_TAINT, "operator": "Equal"}],
            },
        },
        cluster_queue(TAS_CLUSTER_QUEUE, TAS_FLAVOR, 56),
    ]


def remove_tas_nodes(cluster: Cluster) -> None:
    cluster.kubectl("delete", "node", *TAS_NODES, "--ignore-not-found", "--wait=false")


@pytest.fixture(scope="module")
def kueue(kubetron: Cluster) -> Iterator[Cluster]:
    """Kueue running, a quota of 16 GPUs (the two default kwok nodes) and, on seven labelled
    nodes of their own, a topology-aware flavor with 56 GPUs."""
    kubetron.start_kueue()
    kubetron.apply(tas_objects())
    kubetron.apply(
        [
            {"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
            cluster_queue(CLUSTER_QUEUE, FLAVOR, 16),
            cluster_queue(PREEMPT_CLUSTER_QUEUE, FLAVOR, 8, preempt=True),
            *(
                {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                 "metadata": {"name": name}, "value": value}
                for name, value in ((LOW, 100), (HIGH, 1000))
            ),
        ]
    )  # fmt: skip
    try:
        yield kubetron
    finally:
        remove_tas_nodes(kubetron)
        kubetron.kubectl("delete", "priorityclass", LOW, HIGH, "--ignore-not-found")
        kubetron.stop_kueue()


def local_queue(cluster: Cluster, ns: str, name: str, cq: str) -> None:
    cluster.apply({"apiVersion": KUEUE_API, "kind": "LocalQueue",
                   "metadata": {"name": name, "namespace": ns},
                   "spec": {"clusterQueue": cq}})  # fmt: skip


def _apply(cluster: Cluster, ns: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


def _patch(cluster: Cluster, ns: str, name: str, spec: dict[str, Any]) -> None:
    patch = json.dumps({"spec": spec})
    cluster.kubectl("patch", "mj", name, "-n", ns, "--type", "merge", "-p", patch)


def queued_job(name: str, queue: str = QUEUE, **kw: Any) -> dict[str, Any]:
    return fake_gpu_job(name, **{"scheduling": {"queue": queue}, **kw})


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == type_), {})


def workload(
    cluster: Cluster, ns: str, name: str, kind: str = "pytorchjob"
) -> dict[str, Any] | None:
    """The Workload Kueue made of the job's backend job (`kind`), if any."""
    backend_job = cluster.get(kind, name, ns)
    if backend_job is None:
        return None
    out = cluster.kubectl(
        "get", "workloads.kueue.x-k8s.io", "-n", ns, "-l",
        f"{JOB_UID_LABEL}={backend_job['metadata']['uid']}", "-o", "json",
    ).stdout  # fmt: skip
    items = json.loads(out)["items"]
    return items[0] if items else None


def pods(cluster: Cluster, ns: str, job: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-n", ns, "-l", f"kubetron.io/job-name={job}", "-o", "json"
    ).stdout
    return list(json.loads(out)["items"])


def wait_queued(cluster: Cluster, ns: str, name: str, reason: str, says: str) -> dict[str, Any]:
    """Until the job is Queued with Kueue's `reason` and a message that `says` something."""

    def check() -> dict[str, Any] | None:
        obj = cluster.get("megatronjob", name, ns)
        cond = condition(obj, "Queued")
        phase = ((obj or {}).get("status") or {}).get("phase")
        ok = phase == "Queued" and cond.get("reason") == reason and says in cond["message"]
        return obj if ok else None

    return cluster.wait_for(check, timeout=60, what=f"MegatronJob {name} Queued ({reason}: {says})")


def test_a_changed_waiting_reason_reaches_the_status_through_the_workload_watch(
    kueue: Cluster, namespace: str, start_operator: Any
) -> None:
    """No resync within the test: the job first waits for a LocalQueue that does not exist;
    once it exists the job waits for quota it can never get (16 GPUs from a ClusterQueue of
    8). Only Kueue's Workload changes in between (the PyTorchJob stays suspended), so the new
    reason reaches the status through the operator's watch on Workloads."""
    start_operator("op-0", "--resync-period", "600")
    _apply(kueue, namespace, queued_job("waiting", queue="later", nodes=2))
    wait_queued(kueue, namespace, "waiting", "Inadmissible", "LocalQueue later doesn't exist")
    local_queue(kueue, namespace, "later", PREEMPT_CLUSTER_QUEUE)
    wait_queued(kueue, namespace, "waiting", "Pending", "nvidia.com/gpu")


def test_over_quota_waits_queued_and_runs_after_the_first_finishes(
    kueue: Cluster, namespace: str, start_operator: Any
) -> None:
    start_operator()
    local_queue(kueue, namespace, QUEUE, CLUSTER_QUEUE)
    _apply(kueue, namespace, queued_job("first", nodes=2, complete_after="20s"))
    first = wait_phase(kueue, namespace, "first", "Running", timeout=60)
    admitted = condition(first, "Queued")
    assert (admitted["status"], admitted["reason"]) == ("False", "Admitted")
    assert CLUSTER_QUEUE in admitted["message"]
    wl = workload(kueue, namespace, "first")
    assert wl is not None and condition(wl, "Admitted").get("status") == "True"

    _apply(kueue, namespace, queued_job("second", nodes=1, complete_after="2s"))
    second = wait_queued(kueue, namespace, "second", "Pending", "insufficient")
    message = condition(second, "Queued")["message"]
    assert "insufficient" in message and "nvidia.com/gpu" in message, message
    # an edited PyTorchJob is re-applied (drift repair): what Kueue holds stays suspended
    image = "/spec/pytorchReplicaSpecs/Worker/template/spec/containers/0/image"
    edit = json.dumps([{"op": "replace", "path": image, "value": "someone/else:1"}])
    kueue.kubectl("patch", "pytorchjob", "second", "-n", namespace, "--type", "json", "-p", edit)
    pj = kueue.wait_for(
        lambda: (
            (p := kueue.get("pytorchjob", "second", namespace))
            and p["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0][
                "image"
            ]
            != "someone/else:1"
            and p
        ),
        timeout=30,
        what="the operator to repair the edited PyTorchJob",
    )
    assert pj["spec"]["runPolicy"]["suspend"] is True
    assert pods(kueue, namespace, "second") == []
    assert (kueue.get("megatronjob", "second", namespace) or {})["status"]["phase"] == "Queued"

    wait_phase(kueue, namespace, "first", "Succeeded", timeout=90)
    done = wait_phase(kueue, namespace, "second", "Succeeded", timeout=90)
    assert done["status"]["restarts"] == 0 and done["status"]["attempt"] == 1
    assert condition(done, "Queued")["status"] == "False"


def test_suspend_by_the_user_deactivates_the_workload_and_resume_requeues(
    kueue: Cluster, namespace: str, start_operator: Any
) -> None:
    start_operator()
    local_queue(kueue, namespace, QUEUE, CLUSTER_QUEUE)
    _apply(kueue, namespace, queued_job("paused", nodes=1, complete_after="600s"))
    wait_phase(kueue, namespace, "paused", "Running", timeout=60)
    _patch(kueue, namespace, "paused", {"runPolicy": {"suspend": True}})
    wait_phase(kueue, namespace, "paused", "Suspended", timeout=60)
    kueue.wait_for(
        lambda: (
            (wl := workload(kueue, namespace, "paused"))
            and wl["spec"].get("active") is False
            and condition(wl, "QuotaReserved").get("status") != "True"
        ),
        timeout=60,
        what="the Workload deactivated and its quota released",
    )
    kueue.wait_for(
        lambda: (
            (pj := kueue.get("pytorchjob", "paused", namespace))
            and pj["spec"]["runPolicy"]["suspend"] is True
            and not pods(kueue, namespace, "paused")
        ),
        timeout=60,
        what="Kueue suspended the PyTorchJob and its pods are gone",
    )
    # Kueue would start any admitted job it finds suspended; the job stays suspended
    time.sleep(3)
    assert (kueue.get("megatronjob", "paused", namespace) or {})["status"]["phase"] == "Suspended"

    _patch(kueue, namespace, "paused", {"runPolicy": {"suspend": False}})
    resumed = wait_phase(kueue, namespace, "paused", "Running", timeout=60)
    wl = workload(kueue, namespace, "paused")
    assert wl is not None and wl["spec"].get("active", True) is True
    assert resumed["status"]["restarts"] == 0 and resumed["status"]["attempt"] == 1


def test_a_job_kueue_preempts_is_queued_again_without_a_restart(
    kueue: Cluster, namespace: str, start_operator: Any
) -> None:
    """Suspended by Kueue, not by the user: a higher-priority job takes the quota, Kueue evicts
    the running one (suspends its PyTorchJob, the training-operator deletes its pods), which
    shows Queued and no restart, and runs again once the quota is free."""
    start_operator()
    local_queue(kueue, namespace, QUEUE, PREEMPT_CLUSTER_QUEUE)
    low = queued_job("low", nodes=1, complete_after="600s", resources={"priorityClassName": LOW})
    _apply(kueue, namespace, low)
    wait_phase(kueue, namespace, "low", "Running", timeout=60)
    low_wl = workload(kueue, namespace, "low")
    assert low_wl is not None and low_wl["spec"].get("priority") == 100, low_wl
    high = queued_job("high", nodes=1, complete_after="5s", resources={"priorityClassName": HIGH})
    _apply(kueue, namespace, high)
    try:
        evicted = wait_phase(kueue, namespace, "low", "Queued", timeout=60)
    except ClusterError as err:
        workloads = kueue.kubectl("get", "workloads.kueue.x-k8s.io", "-n", namespace, "-o", "yaml")
        raise AssertionError(f"{err}\n{workloads.stdout}") from err
    assert evicted["status"]["restarts"] == 0, evicted["status"]
    assert condition(evicted, "Queued")["status"] == "True"
    wait_phase(kueue, namespace, "high", "Succeeded", timeout=90)
    again = wait_phase(kueue, namespace, "low", "Running", timeout=90)
    assert (again["status"]["restarts"], again["status"]["attempt"]) == (0, 1), again["status"]
    assert condition(again, "Queued")["status"] == "False"


def test_a_four_node_job_lands_inside_one_block(
    kueue: Cluster, namespace: str, start_operator: Any
) -> None:
    """Block b0 has two nodes, b1 five: a job that requires one block for its 4 pods can only
    go to b1, one pod per node; the scheduler alone would spread it over any seven."""
    start_operator()
    local_queue(kueue, namespace, TAS_QUEUE, TAS_CLUSTER_QUEUE)
    job = queued_job(
        "placed", nodes=4, complete_after="15s",
        scheduling={"queue": TAS_QUEUE, "topology": {"jobLevel": BLOCK}},
    )  # fmt: skip
    _apply(kueue, namespace, job)
    wait_phase(kueue, namespace, "placed", "Running", timeout=90)
    placed = {
        p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods(kueue, namespace, "placed")
    }
    assert len(placed) == 4 and len(set(placed.values())) == 4, placed
    assert {TAS_NODES[n][0] for n in placed.values()} == {"b1"}, placed
    wl = workload(kueue, namespace, "placed")
    assert wl is not None
    assignments = wl["status"]["admission"]["podSetAssignments"]
    assert all(a.get("topologyAssignment") for a in assignments), assignments
    # Kueue added its flavor's toleration to the running PyTorchJob's templates: no drift; a
    # repair (a label someone removed) re-applies it without undoing Kueue's additions, so Kueue
    # keeps the Workload and the job runs on
    toleration = {**TAS_TAINT, "operator": "Equal"}
    before = kueue.get("pytorchjob", "placed", namespace)
    assert before is not None
    worker = before["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert toleration in worker["tolerations"], worker
    kueue.kubectl("label", "pytorchjob", "placed", "-n", namespace, "app.kubernetes.io/part-of-")
    pj = kueue.wait_for(
        lambda: (
            (p := kueue.get("pytorchjob", "placed", namespace))
            and "app.kubernetes.io/part-of" in p["metadata"]["labels"]
            and p
        ),
        timeout=30,
        what="the operator to repair the PyTorchJob's labels",
    )
    worker = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert toleration in worker["tolerations"] and pj["spec"]["runPolicy"]["suspend"] is False
    time.sleep(2)
    assert workload(kueue, namespace, "placed") is not None
    assert (kueue.get("megatronjob", "placed", namespace) or {})["status"]["phase"] == "Running"

    # tensor 8 x pipeline 2 over 2 pods: one model-parallel group, required inside one rack;
    # with four of b1's five nodes taken no rack has two free nodes: it waits
    _apply(kueue, namespace, rack_groups_job("pair", nodes=2, complete_after="600s"))
    wait_queued(kueue, namespace, "pair", "Pending", 'topology "kubetron-test"')
    wait_phase(kueue, namespace, "placed", "Succeeded", timeout=90)
    wait_phase(kueue, namespace, "pair", "Running", timeout=90)
    nodes = [p["spec"]["nodeName"] for p in pods(kueue, namespace, "pair")]
    assert len(set(nodes)) == 2 and len({TAS_NODES[n][1] for n in nodes}) == 1, nodes
    _delete_and_wait(kueue, namespace, "pair")


def rack_groups_job(name: str, nodes: int, complete_after: str) -> dict[str, Any]:
    """Tensor 8 x pipeline 2 on 8-GPU pods, each model-parallel group inside one rack."""
    return queued_job(
        name, nodes=nodes, complete_after=complete_after,
        parallelism={"tensor": 8, "pipeline": 2},
        scheduling={"queue": TAS_QUEUE, "topology": {"modelParallelLevel": RACK}},
    )  # fmt: skip


def _delete_and_wait(cluster: Cluster, ns: str, name: str) -> None:
    cluster.kubectl("delete", "mj", name, "-n", ns)
    cluster.wait_for(lambda: not pods(cluster, ns, name), timeout=60, what=f"{name}'s pods gone")


def test_model_parallel_slices_keep_each_group_inside_one_rack(
    kueue: Cluster, namespace: str, start_operator: Any
) -> None:
    """TP8 x PP2 x DP2 on 8-GPU pods: each data-parallel replica's group is two pods, node ranks
    {0, 2} and {1, 3}. The operator orders the node ranks 0,2,1,3 over the pod indices and asks
    Kueue for rack slices of two consecutive pods. Rack r2 has three free nodes and r3 two, so
    filling r2 first would split a pair; Kueue must put two pods in each, and every group lands
    inside one rack."""
    start_operator()
    local_queue(kueue, namespace, TAS_QUEUE, TAS_CLUSTER_QUEUE)
    _apply(kueue, namespace, rack_groups_job("sliced", nodes=4, complete_after="15s"))
    wait_phase(kueue, namespace, "sliced", "Running", timeout=90)
    pj = kueue.get("pytorchjob", "sliced", namespace)
    assert pj is not None
    template = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    assert template["metadata"]["annotations"][SLICE_TOPOLOGY] == RACK
    assert template["metadata"]["annotations"][SLICE_SIZE] == "2"
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
    order = [int(r) for r in env[NODE_RANKS_ENV].split(",")]
    assert order == [0, 2, 1, 3]
    rack_of_node_rank = {
        order[int(p["metadata"]["labels"][REPLICA_INDEX_LABEL])]: TAS_NODES[p["spec"]["nodeName"]][
            1
        ]
        for p in pods(kueue, namespace, "sliced")
    }
    assert len(rack_of_node_rank) == 4, rack_of_node_rank
    dims = ParallelDims.from_degrees(32, tp=8, pp=2)
    racks = [{rack_of_node_rank[r // 8] for r in dims.model_parallel_ranks(d)} for d in range(2)]
    assert all(len(r) == 1 for r in racks) and racks[0] != racks[1], rack_of_node_rank
    wait_phase(kueue, namespace, "sliced", "Succeeded", timeout=90)
