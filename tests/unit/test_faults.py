"""faults.py and its part of the status: failures counted by cause, the latest one, the nodes
whose fault ended an attempt, the affinity that keeps the next attempts off them, and the
NodesAvoided condition while no other node fits."""

from __future__ import annotations

import copy
from typing import Any

from kubetron_api.parse import parse_job
from kubetron_api.v1alpha1 import FailureCause as C
from kubetron_api.v1alpha1 import MegatronJobStatus
from kubetron_operator.faults import keep_off, newly_failed, record, waiting_message
from kubetron_operator.lifecycle import Ended, Verdict
from kubetron_operator.plan import plan
from kubetron_operator.render import render
from kubetron_operator.status import Observed, job_status, restart_status, status_differs
from tests.builders import job_dict, make_job

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z", "2026-01-01T01:00:00Z"
Obj = dict[str, Any]
LOST = Ended(C.NODE_LOST, "job-worker-1", "gpu-3", node_fault=True)
NOT_IN = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["gpu-3", "gpu-7"]}


def test_record_counts_by_cause_keeps_the_last_and_avoids_faulty_nodes() -> None:
    first = record({}, LOST, "pod job-worker-1 lost with its node gpu-3", 1, T0)
    assert first == {
        "failures": {
            "counts": {"NodeLost": 1},
            "last": {
                "cause": "NodeLost",
                "attempt": 1,
                "pod": "job-worker-1",
                "node": "gpu-3",
                "message": "pod job-worker-1 lost with its node gpu-3",
                "time": T0,
            },
        },
        "avoidedNodes": [{"node": "gpu-3", "cause": "NodeLost", "since": T0}],
    }
    assert record(first, LOST, "again", 1, T1) == first  # the same attempt counts once
    second = record(first, Ended(C.SIGNAL, "job-worker-0", "gpu-1"), "exit 143", 2, T1)
    assert second["failures"]["counts"] == {"NodeLost": 1, "Signal": 1}
    assert second["failures"]["last"]["cause"] == "Signal"
    assert second["avoidedNodes"] == first["avoidedNodes"]  # a signal is no node's fault
    assert newly_failed(first, second) == "Signal" and newly_failed(second, second) is None
    # a hang names no pod: None removes the last one's pod and node from the merged status
    hang = record(second, Ended(C.HANG), "step 7 has not advanced", 3, T2)["failures"]["last"]
    assert (hang["cause"], hang["pod"], hang["node"]) == ("Hang", None, None)
    assert (
        status_differs({"goodput": {"since": T0}}, {"goodput": {"since": T0, "x": None}}) is False
    )
    MegatronJobStatus.model_validate(second)  # the schema takes it


def test_keep_off_adds_not_in_within_every_term_of_the_spec_affinity() -> None:
    job = make_job()
    (pj,) = [o for o in render(job, plan(job)) if o["kind"] == "PyTorchJob"]
    untouched = copy.deepcopy(pj)
    keep_off(pj, [])
    assert pj == untouched
    keep_off(pj, ["gpu-7", "gpu-3"])
    spec = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required == {"nodeSelectorTerms": [{"matchExpressions": [NOT_IN]}]}
    # the spec's own terms keep theirs, each one ANDed with the exclusion
    zone: Obj = {"key": "zone", "operator": "In", "values": ["a"]}
    own: Obj = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [zone]}, {"matchFields": []}]
            }
        }
    }
    nested: Obj = {"spec": {"jobs": [{"template": {"spec": {"containers": [], "affinity": own}}}]}}
    keep_off(nested, ["gpu-3", "gpu-7"])
    terms = nested["spec"]["jobs"][0]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert terms == [
        {"matchExpressions": [zone, NOT_IN]},
        {"matchFields": [], "matchExpressions": [NOT_IN]},
    ]
    assert own["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchExpressions"] == [zone]  # unchanged


def test_keep_off_reaches_a_trainjobs_pods() -> None:
    body = job_dict()
    body["spec"]["backend"] = "TrainJob"
    job = parse_job(body)
    (tj,) = [o for o in render(job, plan(job)) if o["kind"] == "TrainJob"]
    keep_off(tj, ["gpu-3", "gpu-7"])
    (patch,) = tj["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    spec = node["template"]["spec"]["template"]["spec"]
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required == {"nodeSelectorTerms": [{"matchExpressions": [NOT_IN]}]}


def test_a_restart_records_the_failure_and_a_permanent_one_fails_with_it() -> None:
    p = plan(make_job())
    running: Obj = {"attempt": 1, "restarts": 0, "runningSince": T0}
    verdict = Verdict("restart", "PodDisrupted", "pod job-worker-1 lost", LOST)
    st = restart_status(
        Observed(1, running, None, []),
        p,
        "job",
        "PodDisrupted",
        "attempt 1 ended: ...",
        T1,
        ended=verdict,
    )
    assert (st["attempt"], st["restarts"]) == (2, 1)
    assert st["failures"]["last"] == {
        "cause": "NodeLost",
        "attempt": 1,
        "pod": "job-worker-1",
        "node": "gpu-3",
        "message": "pod job-worker-1 lost",
        "time": T1,
    }
    assert [a["node"] for a in st["avoidedNodes"]] == ["gpu-3"]
    # attempt 2 OOM-killed: failed at once, counted, nothing more avoided
    oom = Verdict(
        "fail",
        "PodFailed",
        "pod job-worker-0 ... (OOMKilled)",
        Ended(C.OOM_KILLED, "job-worker-0", "gpu-1"),
    )
    failed = job_status(Observed(1, st, None, []), p, "job", oom, 2, T2)
    assert failed["phase"] == "Failed"
    assert failed["failures"]["counts"] == {"NodeLost": 1, "OOMKilled": 1}
    assert failed["failures"]["last"]["attempt"] == 2
    assert failed["avoidedNodes"] == st["avoidedNodes"]
    # a running attempt keeps both
    assert (
        job_status(Observed(1, st, None, []), p, "job", Verdict("run"), 2, T2)["failures"]
        == st["failures"]
    )


def test_pods_that_fit_no_other_node_wait_with_nodes_avoided() -> None:
    p = plan(make_job())
    old: Obj = {
        "attempt": 2,
        "restarts": 1,
        "avoidedNodes": [{"node": "gpu-3", "cause": "NodeLost", "since": T0}],
    }
    pending = {
        "metadata": {"name": "job-worker-0", "labels": {"kubetron.io/attempt": "2"}},
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
        },
    }
    st = job_status(Observed(1, old, None, [pending]), p, "job", Verdict("wait"), 2, T1)
    assert st["phase"] == "Restarting"  # waiting: no restart spent
    cond = next(c for c in st["conditions"] if c["type"] == "NodesAvoided")
    assert (cond["status"], cond["reason"]) == ("True", "NoOtherNode")
    assert cond["message"] == waiting_message(["job-worker-0"], old)
    assert cond["message"].startswith(
        "pods job-worker-0 are Pending Unschedulable while the job avoids nodes gpu-3"
    )
    running = job_status(Observed(1, old, None, []), p, "job", Verdict("run"), 2, T1)
    cond = next(c for c in running["conditions"] if c["type"] == "NodesAvoided")
    assert (cond["status"], cond["reason"]) == ("False", "OtherNodesFit")
    no_avoid = job_status(Observed(1, {}, None, [pending]), p, "job", Verdict("wait"), 1, T1)
    assert all(c["type"] != "NodesAvoided" for c in no_avoid["conditions"])
