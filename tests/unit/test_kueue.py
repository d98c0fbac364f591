"""Kueue: placement from the parallel shape (rank arithmetic against the trainer's own grid),
the annotations and suspended creation of a queued job's PyTorchJob, and the reconcile paths of
a queued job against the in-memory fake (the real Kueue runs them in tests/cluster/test_kueue.py):
Kueue owns runPolicy.suspend after creation, a user's suspend deactivates the Workload, and the
MegatronJob shows Queued with Kueue's reason while it waits."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from kubetron_api.dims import ParallelDims
from kubetron_api.parse import parse_job
from kubetron_api.v1alpha1 import SchedulingSpec
from kubetron_operator.controller import Controller
from kubetron_operator.metrics import OperatorMetrics
from kubetron_operator.plan import PlanError, plan
from kubetron_operator.render import render
from kubetron_operator.scheduling import kueue
from kubetron_trainer.runtime.parallel import make_grids
from tests.builders import job_dict
from tests.unit.fake_kube import FakeKube

Obj = dict[str, Any]


# --------------------------------------------------------------------- rank arithmetic


def test_model_parallel_ranks_are_the_trainers_tensor_context_pipeline_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The groups the operator places are the trainer's own: HyperCommGrid over [tp, cp, dp, pp]
    enumerates the tp x cp x pp groups, one per data-parallel index."""
    for tp, cp, pp, dp in itertools.product([1, 2, 4, 8], [1, 2], [1, 2, 4], [1, 2, 3]):
        dims = ParallelDims.from_degrees(tp * cp * pp * dp, tp=tp, cp=cp, pp=pp)
        monkeypatch.setenv("WORLD_SIZE", str(dims.world_size))  # HyperCommGrid's job size
        dense, _ = make_grids(dims)
        trainer = sorted(sorted(g) for g in dense.get_rank_enum(["tp", "cp", "pp"]))
        assert sorted(dims.model_parallel_ranks(d) for d in range(dims.dp)) == trainer


def test_the_dense_rank_formula() -> None:
    dims = ParallelDims.from_degrees(32, tp=2, cp=2, pp=2)  # dp 4
    assert dims.dense_rank(tp=1, cp=0, dp=0, pp=0) == 1
    assert dims.dense_rank(tp=0, cp=1, dp=0, pp=0) == 2
    assert dims.dense_rank(tp=0, cp=0, dp=1, pp=0) == 4
    assert dims.dense_rank(tp=0, cp=0, dp=0, pp=1) == 16
    # replica 1: its two stages are DP*TP*CP = 16 ranks apart
    assert dims.model_parallel_ranks(1) == [4, 5, 6, 7, 20, 21, 22, 23]


@pytest.mark.parametrize(
    ("world", "degrees", "procs", "pods", "order"),
    [
        (16, {"tp": 8, "pp": 2}, 8, [[0, 1]], [0, 1]),  # the whole job is one group
        # stages DP*TP pods apart: replica 0 on pods 0 and 2, so node ranks reorder
        (32, {"tp": 8, "pp": 2}, 8, [[0, 2], [1, 3]], [0, 2, 1, 3]),
        (32, {"tp": 16}, 8, [[0, 1], [2, 3]], [0, 1, 2, 3]),  # consecutive pairs of pods
        (16, {"tp": 4}, 8, [[0], [1]], [0, 1]),  # two groups per pod
        # tensor 2 x pipeline 2 on 8-GPU pods: all four replicas share both pods
        (16, {"tp": 2, "pp": 2}, 8, [[0, 1]], [0, 1]),
        (
            48,
            {"tp": 4, "pp": 3},
            4,
            [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]],
            [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11],
        ),
    ],
)
def test_pod_groups_and_the_pod_order(
    world: int, degrees: dict[str, int], procs: int, pods: list[list[int]], order: list[int]
) -> None:
    dims = ParallelDims.from_degrees(world, **degrees)
    assert (dims.pod_groups(procs), dims.pod_order(procs)) == (pods, order)


def test_the_pod_order_puts_every_model_parallel_group_on_consecutive_pods_of_equal_slices() -> (
    None
):
    """For every shape: the order is a permutation starting at node rank 0 (the rendezvous),
    the pod sets have one size, and with pods taken in order, slices of that size each hold
    whole model-parallel groups (what Kueue's podset-slice-size places in one domain)."""
    for tp, cp, pp, dp, procs in itertools.product(
        [1, 2, 4, 8], [1, 2], [1, 2, 4], [1, 2, 3], [1, 2, 4, 8]
    ):
        dims = ParallelDims.from_degrees(tp * cp * pp * dp, tp=tp, cp=cp, pp=pp)
        if dims.world_size % procs:
            continue
        order = dims.pod_order(procs)
        assert sorted(order) == list(range(dims.world_size // procs)) and order[0] == 0
        sizes = {len(s) for s in dims.pod_groups(procs)}
        assert len(sizes) == 1, (dims.describe(), procs)
        (size,) = sizes
        slice_of = {node: i // size for i, node in enumerate(order)}
        for d in range(dims.dp):
            slices = {slice_of[r // procs] for r in dims.model_parallel_ranks(d)}
            assert len(slices) == 1, (dims.describe(), procs, d)


# --------------------------------------------------------------------- placement


def _placement(topology: Obj, world: int = 16, procs: int = 8, queue: str | None = "q",
               **degrees: int) -> tuple[kueue.Placement | None, list[str]]:  # fmt: skip
    spec = SchedulingSpec.model_validate({"queue": queue, "topology": topology})
    return kueue.placement(spec, ParallelDims.from_degrees(world, **degrees), procs)


def test_topology_needs_a_queue() -> None:
    where, problems = _placement({"jobLevel": "rack"}, queue=None)
    assert where is None and "needs a Kueue queue" in problems[0]
    assert _placement({}, queue=None) == (None, [])  # what the CRD's defaulting stores


def test_with_volcano_the_queue_is_volcanos_and_nothing_goes_to_kueue() -> None:
    body = job_dict(nodes=2)
    body["spec"]["scheduling"] = {"queue": "research", "schedulerName": "volcano"}
    job = parse_job(body)
    pj = render(job, plan(job))[1]
    assert kueue.QUEUE_LABEL not in pj["metadata"]["labels"]
    assert pj["spec"]["runPolicy"]["suspend"] is False
    assert pj["spec"]["runPolicy"]["schedulingPolicy"]["queue"] == "research"
    body["spec"]["scheduling"]["topology"] = {"jobLevel": "rack"}
    with pytest.raises(PlanError, match=r"no spec\.scheduling\.schedulerName volcano"):
        plan(parse_job(body))


def test_job_level_places_the_one_pod_set() -> None:
    where, problems = _placement({"jobLevel": "example.com/block", "jobPolicy": "Preferred"})
    assert problems == [] and where is not None
    assert where.annotations() == {kueue.PREFERRED_TOPOLOGY: "example.com/block"}


def test_a_model_parallel_group_inside_one_pod_needs_nothing() -> None:
    assert _placement({"modelParallelLevel": "rack"}, tp=4) == (None, [])
    where, _ = _placement({"modelParallelLevel": "rack", "jobLevel": "block"}, tp=4)
    assert where == kueue.Placement("block", kueue.TopologyPolicy.REQUIRED)
    assert where.annotations() == {kueue.REQUIRED_TOPOLOGY: "block"}


def test_a_model_parallel_group_that_is_the_whole_job_is_the_jobs_required_level() -> None:
    where, problems = _placement({"modelParallelLevel": "rack"}, tp=8, pp=2)
    assert problems == [] and where == kueue.Placement("rack", kueue.TopologyPolicy.REQUIRED)
    _, problems = _placement({"modelParallelLevel": "rack", "jobLevel": "block"}, tp=8, pp=2)
    assert "remove jobLevel (block) or modelParallelLevel" in problems[0]


def test_groups_across_pods_with_data_parallel_are_slices_of_consecutive_pods() -> None:
    where, problems = _placement({"modelParallelLevel": "rack"}, world=32, tp=8, pp=2)
    assert problems == [] and where is not None
    assert where.annotations() == {kueue.SLICE_TOPOLOGY: "rack", kueue.SLICE_SIZE: "2"}
    where, _ = _placement({"modelParallelLevel": "rack", "jobLevel": "block"}, world=64, tp=16)
    assert where is not None and where.annotations() == {
        kueue.REQUIRED_TOPOLOGY: "block",
        kueue.SLICE_TOPOLOGY: "rack",
        kueue.SLICE_SIZE: "2",
    }


def test_plan_reports_topology_problems() -> None:
    body = job_dict(nodes=4, tensor=8)
    body["spec"]["scheduling"] = {"topology": {"jobLevel": "rack"}}
    with pytest.raises(PlanError, match="needs a Kueue queue"):
        plan(parse_job(body))


def test_a_queued_pytorchjob_is_created_suspended_with_the_label_and_annotations() -> None:
    body = job_dict(nodes=4, tensor=8)
    body["spec"]["scheduling"] = {"queue": "team", "topology": {"jobLevel": "rack"}}
    body["spec"]["resources"]["podAnnotations"] = {"a": "b"}
    job = parse_job(body)
    pj = render(job, plan(job))[1]
    assert pj["metadata"]["labels"][kueue.QUEUE_LABEL] == "team"
    assert pj["spec"]["runPolicy"]["suspend"] is True
    assert list(pj["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    ann = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["annotations"]
    assert ann == {"a": "b", kueue.REQUIRED_TOPOLOGY: "rack"}


# --------------------------------------------------------------------- the Workload


def workload(conditions: list[Obj], active: bool = True, cq: str | None = None) -> Obj:
    status: Obj = {"conditions": conditions}
    if cq:
        status["admission"] = {"clusterQueue": cq}
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {"name": "pytorchjob-job-1", "namespace": "ml",
                     "labels": {kueue.JOB_UID_LABEL: "pj-uid"}},
        "spec": {"active": active, "queueName": "team"},
        "status": status,
    }  # fmt: skip


PENDING = {"type": "QuotaReserved", "status": "False", "reason": "Pending",
           "message": "couldn't assign flavors to pod set Master: insufficient unused quota for "
                      "nvidia.com/gpu in flavor gpu, 8 more needed"}  # fmt: skip


def test_waiting_reads_kueues_reason_and_message() -> None:
    reason, message = kueue.waiting(None, "team", "job")
    assert reason == "WaitingForWorkload" and "kubeflow.org/pytorchjob" in message
    assert kueue.waiting(workload([PENDING]), "team", "job") == ("Pending", PENDING["message"])
    evicted = {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "by x"}
    assert kueue.waiting(workload([PENDING, evicted]), "team", "job") == ("Preempted", "by x")
    assert (
        kueue.admitted_message(workload([], cq="gpus")) == "admitted by Kueue (ClusterQueue gpus)"
    )


# --------------------------------------------------------------------- reconcile


@pytest.fixture
def queued(kube: FakeKube) -> FakeKube:
    kube.objects[("MegatronJob", "ml", "job")]["spec"]["scheduling"] = {"queue": "team"}
    return kube


def _pj(kube: FakeKube) -> Obj:
    return kube.objects[("PyTorchJob", "ml", "job")]


def _status(kube: FakeKube) -> Obj:
    return kube.objects[("MegatronJob", "ml", "job")]["status"]


def _kueue_made_workload(kube: FakeKube, *conditions: Obj) -> None:
    _pj(kube)["metadata"]["uid"] = "pj-uid"
    kube.put(workload(list(conditions)))


def _queued_condition(kube: FakeKube) -> Obj:
    return next(c for c in _status(kube)["conditions"] if c["type"] == "Queued")


def test_a_queued_job_waits_with_kueues_reason_and_kueue_owns_suspend(queued: FakeKube) -> None:
    c = Controller(queued, OperatorMetrics())  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    assert _pj(queued)["spec"]["runPolicy"]["suspend"] is True
    assert _status(queued)["phase"] == "Queued"
    _kueue_made_workload(queued, PENDING)
    c.reconcile("ml", "job")
    cond = _queued_condition(queued)
    assert (cond["status"], cond["reason"], cond["message"]) == ("True", "Pending",
                                                                 PENDING["message"])  # fmt: skip
    # Kueue admits and un-suspends; a new generation re-applies the PyTorchJob: it stays running
    _pj(queued)["spec"]["runPolicy"]["suspend"] = False
    admitted = {"type": "Admitted", "status": "True", "reason": "Admitted", "message": "ok"}
    queued.put(workload([admitted], cq="gpus"))
    body = queued.objects[("MegatronJob", "ml", "job")]
    body["metadata"]["generation"] = 2
    body["spec"]["runPolicy"] = {"activeDeadlineSeconds": 600}
    queued.applied.clear()
    c.reconcile("ml", "job")
    assert "PyTorchJob" in queued.applied
    assert _pj(queued)["spec"]["runPolicy"]["suspend"] is False
    assert _status(queued)["phase"] == "Pending"  # admitted, pods not running yet
    cond = _queued_condition(queued)
    assert (cond["status"], cond["message"]) == ("False", "admitted by Kueue (ClusterQueue gpus)")


def test_what_kueue_adds_when_it_starts_the_job_is_no_drift_and_survives_a_repair(
    queued: FakeKube,
) -> None:
    c = Controller(queued, OperatorMetrics())  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    # Kueue admits: un-suspends and adds its ResourceFlavor's toleration and node labels
    flavor = {"key": "gpu-pool", "operator": "Exists", "effect": "NoSchedule"}
    _pj(queued)["spec"]["runPolicy"]["suspend"] = False
    pod = _pj(queued)["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    pod["tolerations"] = [*pod.get("tolerations", []), flavor]
    pod["nodeSelector"] = {**pod.get("nodeSelector", {}), "pool": "h100"}
    queued.applied.clear()
    c.reconcile("ml", "job")
    assert queued.applied == []  # no drift
    pod["containers"][0]["image"] = "someone/else:1"  # an edit: repaired
    c.reconcile("ml", "job")
    assert queued.applied == ["PyTorchJob"]
    repaired = _pj(queued)
    pod = repaired["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["containers"][0]["image"] != "someone/else:1"
    assert flavor in pod["tolerations"] and repaired["spec"]["runPolicy"]["suspend"] is False


def test_kueue_evicting_a_running_job_is_no_failure(queued: FakeKube) -> None:
    from tests.unit.test_controller import trainer_pod

    c = Controller(queued, OperatorMetrics())  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    _pj(queued)["spec"]["runPolicy"]["suspend"] = False  # admitted
    trainer_pod(queued, "worker-0", 1)
    c.reconcile("ml", "job")
    assert _status(queued)["phase"] == "Running"
    # preempted: Kueue suspends the PyTorchJob, the training-operator stops the pods (143)
    evicted = {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "by hi"}
    _kueue_made_workload(queued, evicted)
    _pj(queued)["spec"]["runPolicy"]["suspend"] = True
    trainer_pod(queued, "worker-0", 1, "Failed", code=143)
    assert c.reconcile("ml", "job") == "success"
    st = _status(queued)
    assert (st["phase"], st["restarts"], st["attempt"]) == ("Queued", 0, 1)
    assert "runningSince" not in st
    assert _queued_condition(queued)["reason"] == "Preempted"


def test_an_eviction_between_the_reads_is_no_failure(queued: FakeKube) -> None:
    """The PyTorchJob read before Kueue's suspend, the pods after it (gone): the operator reads
    the PyTorchJob again before it restarts or fails anything."""
    from tests.unit.test_controller import trainer_pod

    c = Controller(queued, OperatorMetrics())  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    _pj(queued)["spec"]["runPolicy"]["suspend"] = False
    trainer_pod(queued, "worker-0", 1)
    c.reconcile("ml", "job")
    assert _status(queued)["phase"] == "Running"
    stale = queued.get("PyTorchJob", "ml", "job")
    _pj(queued)["spec"]["runPolicy"]["suspend"] = True  # Kueue evicts
    del queued.objects[("Pod", "ml", "job-worker-0")]  # the training-operator stops the pods
    reads = iter([stale])
    get = queued.get
    queued.get = lambda kind, ns, name: (  # type: ignore[method-assign]
        next(reads, None) or get(kind, ns, name) if kind == "PyTorchJob" else get(kind, ns, name)
    )
    assert c.reconcile("ml", "job") == "success"
    st = _status(queued)
    assert (st["phase"], st["restarts"]) == ("Queued", 0), st


def test_a_users_suspend_deactivates_the_workload_and_resume_reactivates_it(
    queued: FakeKube,
) -> None:
    c = Controller(queued, OperatorMetrics())  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    _kueue_made_workload(queued, PENDING)
    spec = queued.objects[("MegatronJob", "ml", "job")]["spec"]
    spec["runPolicy"] = {"suspend": True}
    c.reconcile("ml", "job")
    assert queued.objects[("Workload", "ml", "pytorchjob-job-1")]["spec"]["active"] is False
    assert _status(queued)["phase"] == "Suspended"
    spec["runPolicy"] = {"suspend": False}
    c.reconcile("ml", "job")
    assert queued.objects[("Workload", "ml", "pytorchjob-job-1")]["spec"]["active"] is True
    assert _status(queued)["phase"] == "Queued"


def test_a_queued_job_suspended_from_the_start_asks_for_no_quota(queued: FakeKube) -> None:
    queued.objects[("MegatronJob", "ml", "job")]["spec"]["runPolicy"] = {"suspend": True}
    c = Controller(queued, OperatorMetrics())  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    assert ("PyTorchJob", "ml", "job") not in queued.objects
    assert _status(queued)["phase"] == "Suspended"
    queued.objects[("MegatronJob", "ml", "job")]["spec"]["runPolicy"] = {"suspend": False}
    c.reconcile("ml", "job")
    assert _pj(queued)["spec"]["runPolicy"]["suspend"] is True
    assert _status(queued)["phase"] == "Queued"


def test_a_workload_names_its_megatronjob_by_the_pod_template_label() -> None:
    body = job_dict(nodes=2)
    body["spec"]["scheduling"] = {"queue": "team"}
    job = parse_job(body)
    template = render(job, plan(job))[1]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    ours = {"spec": {"podSets": [{"name": "worker", "count": 2, "template": template}]}}
    assert Controller.workload_job(ours) == job.name
    other = {"spec": {"podSets": [{"name": "main", "template": {"metadata": {"labels": {}}}}]}}
    assert Controller.workload_job(other) is None
    assert Controller.workload_job({}) is None
