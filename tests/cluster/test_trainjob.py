"""The TrainJob backend against the real Kubeflow Trainer v2 and JobSet controllers.

A MegatronJob with `spec.backend: TrainJob` is stored by the API server (its CRD's rules), its
render -- the ConfigMap and the TrainJob on kubetron's ClusterTrainingRuntime -- is applied
through Trainer v2's admission webhooks, and the Trainer v2 controller makes a JobSet of it,
the JobSet controller one indexed Job, the Job controller the pods, which kwok runs on its fake
GPU nodes. The live pods are compared with the pods the PyTorchJob backend renders for the same
job (created in a namespace that enforces the restricted Pod Security Standard): the same
container, requests, security contexts, volumes and placement, with the rank
environment split between Trainer v2 (PET_*) and kubetron (the index and the node-rank order).

The first test applies the render itself, to compare pods; then the operator (a process bound
to `kubetron rbac --trainjob`) drives a job on this backend: it creates and owns the TrainJob,
restarts the whole group as a new TrainJob when a pod fails, and ends Succeeded. The backend's
CEL transition rule is checked against the same API server. With the real Kueue and its TrainJob
integration, a queued job's TrainJob is admitted, and a topology-aware one keeps each
model-parallel group inside one rack, as the PyTorchJob does in test_kueue.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.utils import parse_quantity

from devtools.cluster import Cluster, ClusterError
from devtools.cluster.kubetron import RBAC, fake_gpu_job, wait_phase
from kubetron_api.dims import ParallelDims
from kubetron_api.parse import parse_job
from kubetron_api.wire import MASTER_ADDR_ENV, MASTER_PORT_ENV, NODE_RANKS_ENV, REPLICA_INDEX_ENV
from kubetron_operator.backends import COMPLETION_INDEX_LABEL
from kubetron_operator.cli.rbac import manifests
from kubetron_operator.lifecycle import ATTEMPT_LABEL
from kubetron_operator.plan import plan
from kubetron_operator.render import CONTAINER, WORKER, PyTorchJobBuilder, drifted, render
from kubetron_operator.render_trainjob import (
    COMPLETION_INDEX_ANNOTATION,
    NODE,
    PATCH_MANAGER,
    cluster_training_runtime,
)
from kubetron_operator.scheduling.kueue import QUEUE_LABEL, SLICE_SIZE, SLICE_TOPOLOGY
from tests.cluster.test_control_plane_restarts import _fail
from tests.cluster.test_kueue import (
    KUEUE_API,
    RACK,
    TAS_CLUSTER_QUEUE,
    TAS_NODES,
    TAS_QUEUE,
    TAS_TAINT,
    cluster_queue,
    local_queue,
    rack_groups_job,
    remove_tas_nodes,
    tas_objects,
    workload,
)

pytestmark = pytest.mark.cluster

Obj = dict[str, Any]
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
PSS_ENFORCE = "pod-security.kubernetes.io/enforce"
TRAINER_PORT = "29500"  # Trainer v2's rendezvous port (PET_MASTER_PORT)
# What the live pods must share with the PyTorchJob backend's worker template.
POD_FIELDS: tuple[str, ...] = ("automountServiceAccountToken", "enableServiceLinks")
POD_FIELDS += ("securityContext", "terminationGracePeriodSeconds", "volumes", "nodeSelector")
CONTAINER_FIELDS: tuple[str, ...] = ("image", "imagePullPolicy", "command", "args")
CONTAINER_FIELDS += ("securityContext", "volumeMounts")


@pytest.fixture(scope="module")
def trainer_v2(kubetron: Cluster) -> Iterator[Cluster]:
    """Trainer v2 and JobSet beside the session's training-operator, kubetron's runtime in."""
    kubetron.start_trainer_v2()
    runtime = cluster_training_runtime()
    try:
        kubetron.apply(runtime)
        kubetron.apply(manifests(trainjob=True))  # the operator's RBAC with the backend on
        yield kubetron
    finally:
        kubetron.apply(RBAC)  # the other tests' operators run without it
        # cluster-wide: a later `helm install` of the chart with the backend on ships its own
        # (its TrainJobs first: Trainer v2 keeps a runtime in use)
        kubetron.kubectl("delete", "trainjobs", "--all", "--all-namespaces", "--wait=true")
        kind, name = runtime["kind"].lower(), runtime["metadata"]["name"]
        kubetron.kubectl("delete", kind, name, "--ignore-not-found", "--wait=true")
        kubetron.stop_trainer_v2()


def _create(cluster: Cluster, namespace: str, name: str, backend: str | None) -> Obj:
    body = fake_gpu_job(name, nodes=2, complete_after="600s")
    if backend:
        body["spec"]["backend"] = backend
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    stored = cluster.get("megatronjob", name, namespace)
    assert stored is not None
    return stored


def _pods(cluster: Cluster, namespace: str, name: str, count: int) -> list[Obj]:
    def listed() -> list[Obj] | None:
        out = cluster.kubectl("get", "pods", "-n", namespace, "-l",
                              f"{JOBSET_NAME_LABEL}={name}", "-o", "json").stdout  # fmt: skip
        pods = json.loads(out)["items"]
        return pods if len(pods) == count else None

    return cluster.wait_for(listed, timeout=90, what=f"{count} pods of the JobSet {name}")


def _quantities(resources: Obj) -> dict[str, dict[str, Any]]:
    return {kind: {name: parse_quantity(value) for name, value in values.items()}
            for kind, values in resources.items()}  # fmt: skip


def _env(container: Obj) -> dict[str, Obj]:
    return {var["name"]: var for var in container.get("env", [])}


def test_a_trainjob_job_becomes_a_jobset_of_the_pods_the_pytorchjob_backend_renders(
    trainer_v2: Cluster, namespace: str
) -> None:
    cluster = trainer_v2
    # the pods are created under the restricted Pod Security Standard, as the PyTorchJob's are
    cluster.kubectl("label", "namespace", namespace, f"{PSS_ENFORCE}=restricted")
    job = parse_job(_create(cluster, namespace, "tj", "TrainJob"))
    job_plan = plan(job)
    objs = render(job, job_plan)
    assert [o["kind"] for o in objs] == ["ConfigMap", "TrainJob"]
    cluster.apply(objs)

    jobset = cluster.wait_for(
        lambda: cluster.get("jobset", "tj", namespace), timeout=60, what="the JobSet tj"
    )
    assert jobset["metadata"]["ownerReferences"][0]["kind"] == "TrainJob"
    assert jobset["spec"]["failurePolicy"].get("maxRestarts", 0) == 0  # 0 is left out
    (replicated,) = jobset["spec"]["replicatedJobs"]
    job_spec = replicated["template"]["spec"]
    assert (replicated["name"], replicated["replicas"]) == (NODE, 1)
    assert (job_spec["parallelism"], job_spec["completions"]) == (2, 2)
    assert job_spec["completionMode"] == "Indexed"
    # pod index 0 is the rendezvous: JobSet's headless Service gives it a DNS name
    assert cluster.get("service", "tj", namespace) is not None

    want = PyTorchJobBuilder().build(job, job_plan, 1)["spec"]["pytorchReplicaSpecs"][WORKER]
    want_pod, want_meta = want["template"]["spec"], want["template"]["metadata"]
    (want_container,) = want_pod["containers"]
    assert want_container["name"] == CONTAINER
    pods = sorted(
        _pods(cluster, namespace, "tj", 2),
        key=lambda p: int(p["metadata"]["annotations"][COMPLETION_INDEX_ANNOTATION]),
    )
    for index, pod in enumerate(pods):
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["annotations"][COMPLETION_INDEX_ANNOTATION] == str(index)
        assert (spec["hostname"], spec["subdomain"]) == (f"tj-node-0-{index}", "tj")
        assert not drifted(want_meta["labels"], meta["labels"]), meta["labels"]
        assert not drifted(want_meta["annotations"], meta["annotations"]), meta["annotations"]
        for key in POD_FIELDS:
            assert not drifted(want_pod[key], spec[key]), (key, spec[key])
        # admission adds the not-ready/unreachable tolerations to every pod
        assert all(t in spec["tolerations"] for t in want_pod["tolerations"]), spec["tolerations"]
        assert spec["restartPolicy"] == "Never"
        assert spec["nodeName"].startswith("kwok-gpu-")
        (container,) = spec["containers"]
        assert container["name"] == NODE
        for key in CONTAINER_FIELDS:
            assert not drifted(want_container[key], container[key]), (key, container[key])
        # quantities as numbers: the API server writes them canonically (147456Mi as 144Gi)
        want_res, res = (
            _quantities(want_container["resources"]),
            _quantities(container["resources"]),
        )
        assert not drifted(want_res, res), container["resources"]
        assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]

        env, want_env = _env(container), _env(want_container)
        # Trainer v2's torch plugin: the rank environment torchrun reads
        assert env["PET_NNODES"]["value"] == "2"
        assert env["PET_NPROC_PER_NODE"]["value"] == "8"
        index_ref = {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
        assert not drifted(index_ref, env["PET_NODE_RANK"]["valueFrom"]["fieldRef"])
        assert env[MASTER_ADDR_ENV]["value"] == "tj-node-0-0.tj"
        assert env[MASTER_PORT_ENV]["value"] == TRAINER_PORT
        # kubetron's: the same pod index (the launcher's node rank), everything else as rendered
        assert not drifted(index_ref, env[REPLICA_INDEX_ENV]["valueFrom"]["fieldRef"])
        for name, var in want_env.items():
            if name not in (REPLICA_INDEX_ENV, MASTER_ADDR_ENV, MASTER_PORT_ENV):
                assert not drifted(var, env[name]), (name, env[name])


def test_a_running_job_cannot_switch_backend(kubetron: Cluster, namespace: str) -> None:
    """The CEL transition rule on spec.backend, in both directions and for an unset one."""
    _create(kubetron, namespace, "pinned", "TrainJob")
    _create(kubetron, namespace, "default", None)
    changes = [
        ("pinned", {"spec": {"backend": "PyTorchJob"}}),
        ("pinned", {"spec": {"backend": None}}),
        ("default", {"spec": {"backend": "TrainJob"}}),
    ]
    for name, patch in changes:
        with pytest.raises(ClusterError, match=r"spec\.backend is immutable"):
            kubetron.kubectl("patch", "megatronjob", name, "-n", namespace, "--type=merge",
                             "-p", json.dumps(patch))  # fmt: skip
    kubetron.kubectl("patch", "megatronjob", "pinned", "-n", namespace, "--type=merge",
                     "-p", json.dumps({"spec": {"runPolicy": {"suspend": True}}}))  # fmt: skip
    stored = kubetron.get("megatronjob", "pinned", namespace)
    assert stored is not None and stored["spec"]["backend"] == "TrainJob"


def test_the_operator_runs_a_trainjob_restarts_its_group_and_succeeds(
    trainer_v2: Cluster, namespace: str, start_operator: Any
) -> None:
    cluster = trainer_v2
    op = start_operator()
    body = fake_gpu_job("run", nodes=2, complete_after="25s")
    body["spec"]["backend"] = "TrainJob"
    body["spec"]["runPolicy"]["backoffLimit"] = 2
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    tj = cluster.wait_for(lambda: cluster.get("trainjob", "run", namespace), timeout=30,
                          what="the operator's TrainJob")  # fmt: skip
    stored = cluster.get("megatronjob", "run", namespace)
    assert stored is not None and cluster.get("pytorchjob", "run", namespace) is None
    (ref,) = tj["metadata"]["ownerReferences"]
    assert (ref["uid"], ref["controller"]) == (stored["metadata"]["uid"], True)
    assert tj["metadata"]["labels"][ATTEMPT_LABEL] == "1"
    wait_phase(cluster, namespace, "run", "Running", timeout=90)
    pods = _pods(cluster, namespace, "run", 2)
    assert all(p["metadata"]["labels"][ATTEMPT_LABEL] == "1" for p in pods)

    _fail(cluster, namespace, pods[1])
    first = tj["metadata"]["uid"]

    def second_attempt() -> bool:
        tj = cluster.get("trainjob", "run", namespace) or {"metadata": {"labels": {}}}
        labels = tj["metadata"]["labels"]
        return tj["metadata"].get("uid") != first and labels.get(ATTEMPT_LABEL) == "2"

    cluster.wait_for(second_attempt, timeout=90, what="attempt 2's TrainJob")
    running = wait_phase(cluster, namespace, "run", "Running", timeout=90)["status"]
    assert (running["attempt"], running["restarts"]) == (2, 1)
    assert running["failures"]["last"]["cause"] == "Signal"
    pods = _pods(cluster, namespace, "run", 2)
    assert all(p["metadata"]["labels"][ATTEMPT_LABEL] == "2" for p in pods)
    done = wait_phase(cluster, namespace, "run", "Succeeded", timeout=120)["status"]
    assert (done["attempt"], done["restarts"]) == (2, 1) and done["completionTime"]
    assert op.sample("kubetron_megatronjobs", namespace=namespace, phase="Succeeded") == 1.0


TJ_FLAVOR, TJ_CLUSTER_QUEUE, TJ_QUEUE = "kubetron-trainjob", "kubetron-trainjob", "tj-team"


@pytest.fixture(scope="module")
def kueue_v2(trainer_v2: Cluster) -> Iterator[Cluster]:
    """Kueue with its TrainJob integration beside Trainer v2: a plain flavor with 16 GPUs in
    TJ_CLUSTER_QUEUE, and the topology-aware one of the Kueue tests on nodes of its own."""
    cluster = trainer_v2
    cluster.start_kueue()
    try:
        cluster.apply([{"apiVersion": KUEUE_API, "kind": "ResourceFlavor",
                        "metadata": {"name": TJ_FLAVOR}},
                       cluster_queue(TJ_CLUSTER_QUEUE, TJ_FLAVOR, 16), *tas_objects()])  # fmt: skip
        yield cluster
    finally:
        for cq in (TJ_CLUSTER_QUEUE, TAS_CLUSTER_QUEUE):
            cluster.kubectl("delete", "clusterqueue", cq, "--ignore-not-found", "--wait=false")
        remove_tas_nodes(cluster)
        cluster.stop_kueue()


def test_kueue_admits_a_queued_trainjob_job(
    kueue_v2: Cluster, namespace: str, start_operator: Any
) -> None:
    """Kueue with its TrainJob integration: the operator creates the TrainJob suspended with the
    queue label, Kueue admits its Workload and un-suspends it, the job runs and succeeds."""
    cluster = kueue_v2
    local_queue(cluster, namespace, TJ_QUEUE, TJ_CLUSTER_QUEUE)
    start_operator()
    body = fake_gpu_job("queued", nodes=2, complete_after="10s", scheduling={"queue": TJ_QUEUE})
    body["spec"]["backend"] = "TrainJob"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    tj = cluster.wait_for(lambda: cluster.get("trainjob", "queued", namespace), timeout=30,
                          what="the queued job's TrainJob")  # fmt: skip
    assert tj["metadata"]["labels"][QUEUE_LABEL] == TJ_QUEUE
    running = wait_phase(cluster, namespace, "queued", "Running", timeout=90)
    queued = next(c for c in running["status"]["conditions"] if c["type"] == "Queued")
    assert (queued["status"], queued["reason"]) == ("False", "Admitted"), queued
    assert TJ_CLUSTER_QUEUE in queued["message"]
    done = wait_phase(cluster, namespace, "queued", "Succeeded", timeout=90)["status"]
    assert (done["attempt"], done["restarts"]) == (1, 0)


def test_kueue_places_each_model_parallel_group_of_a_trainjob_inside_one_rack(
    kueue_v2: Cluster, namespace: str, start_operator: Any
) -> None:
    """The Kueue placement test's TP8 x PP2 x DP2 job on the TrainJob backend: the slice
    annotations ride in the TrainJob's runtime patch, Kueue's TrainJob integration reads them
    from the JobSet's pod template and assigns a topology, and each data-parallel replica's two
    pods (node ranks {0, 2} and {1, 3}, consecutive pod indices) land inside one rack."""
    cluster = kueue_v2
    local_queue(cluster, namespace, TAS_QUEUE, TAS_CLUSTER_QUEUE)
    start_operator()
    body = rack_groups_job("sliced", nodes=4, complete_after="15s")
    body["spec"]["backend"] = "TrainJob"
    # The job tolerates the nodes' taint itself: Kueue's node controller judges taints by the
    # Workload's pod sets, which lack the toleration the flavor adds at admission, and evicts a
    # Workload whose pods on a tainted node have all ended -- which for a TrainJob lasts until
    # the Job, JobSet and TrainJob have each marked themselves complete.
    resources = body["spec"]["resources"]
    resources["tolerations"] = [*resources["tolerations"], {**TAS_TAINT, "operator": "Equal"}]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    wait_phase(cluster, namespace, "sliced", "Running", timeout=90)
    tj = cluster.get("trainjob", "sliced", namespace)
    assert tj is not None
    (patch,) = [p for p in tj["spec"]["runtimePatches"] if p["manager"] == PATCH_MANAGER]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    annotations = node["template"]["spec"]["template"]["metadata"]["annotations"]
    assert (annotations[SLICE_TOPOLOGY], annotations[SLICE_SIZE]) == (RACK, "2")
    order = [int(r) for r in _env(tj["spec"]["trainer"])[NODE_RANKS_ENV]["value"].split(",")]
    assert order == [0, 2, 1, 3]
    wl = workload(cluster, namespace, "sliced", kind="trainjob")
    assert wl is not None
    assignments = wl["status"]["admission"]["podSetAssignments"]
    assert all(a.get("topologyAssignment") for a in assignments), assignments
    pods = _pods(cluster, namespace, "sliced", 4)
    rack_of_node_rank = {
        order[int(p["metadata"]["labels"][COMPLETION_INDEX_LABEL])]:
            TAS_NODES[p["spec"]["nodeName"]][1]
        for p in pods
    }  # fmt: skip
    assert len(rack_of_node_rank) == 4, rack_of_node_rank
    dims = ParallelDims.from_degrees(32, tp=8, pp=2)
    racks = [{rack_of_node_rank[r // 8] for r in dims.model_parallel_ranks(d)} for d in range(2)]
    assert all(len(r) == 1 for r in racks) and racks[0] != racks[1], rack_of_node_rank
    wait_phase(cluster, namespace, "sliced", "Succeeded", timeout=90)
