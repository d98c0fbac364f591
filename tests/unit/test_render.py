"""render(): golden files for every example, plus the properties the training-operator relies on.

Regenerate the golden files after an intended change with `UPDATE_GOLDEN=1 make test-unit`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kubetron_api.config import TrainerConfig
from kubetron_api.parse import load_documents, parse_job
from kubetron_operator.plan import plan
from kubetron_operator.render import render, to_yaml
from tests.builders import job_dict, make_job

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"


def _render_example(path: Path) -> list[dict[str, Any]]:
    (_, obj), *_ = load_documents(path)
    obj["metadata"] |= {"namespace": "research", "uid": "5f0c-golden-uid"}
    job = parse_job(obj)
    return render(job, plan(job))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_render_matches_golden(path: Path) -> None:
    text = to_yaml(_render_example(path))
    golden = GOLDEN / f"{path.stem}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}; run with UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"render output changed for {path.name}"


def test_render_is_deterministic() -> None:
    job = make_job("qwen3-8b", nodes=2, tensor=4, pipeline=2, globalBatchSize=64)
    assert to_yaml(render(job, plan(job))) == to_yaml(render(job, plan(job)))


def _pytorchjob(**fields: Any) -> dict[str, Any]:
    job = make_job(**fields)
    return render(job, plan(job))[1]


def test_one_worker_per_node_with_the_rendezvous_on_worker_0() -> None:
    pj = _pytorchjob(nodes=3, globalBatchSize=48)
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    # no Master: worker 0 (node rank 0) is the rendezvous, one pod set for Kueue
    assert list(replicas) == ["Worker"] and replicas["Worker"]["replicas"] == 3
    assert pj["spec"]["nprocPerNode"] == "8"
    env = replicas["Worker"]["template"]["spec"]["containers"][0]["env"]
    values = {e["name"]: e.get("value") for e in env}
    assert (values["PET_MASTER_ADDR"], values["PET_MASTER_PORT"]) == ("job-worker-0", "23456")
    assert values["KUBETRON_NODE_RANKS"] == "0,1,2"
    index = next(e for e in env if e["name"] == "KUBETRON_REPLICA_INDEX")
    path = "metadata.labels['training.kubeflow.org/replica-index']"
    assert index["valueFrom"] == {"fieldRef": {"fieldPath": path}}
    # the operator restarts whole groups itself: the training-operator never restarts a pod
    assert {r["restartPolicy"] for r in replicas.values()} == {"Never"}
    for r in replicas.values():
        assert r["template"]["metadata"]["labels"]["kubetron.io/attempt"] == "1"
        env = {e["name"]: e.get("value") for e in r["template"]["spec"]["containers"][0]["env"]}
        assert env["KUBETRON_ATTEMPT"] == "1"
    assert pj["metadata"]["labels"]["kubetron.io/attempt"] == "1"


def test_the_attempt_reaches_labels_and_environment() -> None:
    job = make_job()
    job.metadata["uid"] = "u-1"
    pj = render(job, plan(job), attempt=3)[1]
    template = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
    assert (env["KUBETRON_ATTEMPT"], env["KUBETRON_JOB_UID"]) == ("3", "u-1")
    assert template["metadata"]["labels"]["kubetron.io/attempt"] == "3"
    single = _pytorchjob(nodes=1)["spec"]["pytorchReplicaSpecs"]
    assert list(single) == ["Worker"] and single["Worker"]["replicas"] == 1


def test_pod_template_runs_torchrun_with_gpus_shm_and_metrics_port() -> None:
    pod = _pytorchjob()["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["name"] == "pytorch"
    assert c["command"] == ["python", "-m", "kubetron_trainer.launch"]  # wraps torchrun
    assert c["args"] == ["-m", "kubetron_trainer", "--config", "/etc/kubetron/config.json"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in c["ports"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert pod["automountServiceAccountToken"] is False


def test_owner_reference_and_labels() -> None:
    cm, pj = render(make_job(), plan(make_job()))
    for obj in (cm, pj):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["kind"] == "MegatronJob" and ref["uid"] == "0000-1111"
        assert ref["controller"] is True and ref["blockOwnerDeletion"] is True
        assert obj["metadata"]["labels"]["kubetron.io/job-name"] == "job"
        assert obj["metadata"]["namespace"] == "ml"


def test_config_map_holds_the_trainer_config() -> None:
    cm = render(make_job(), plan(make_job()))[0]
    config = TrainerConfig.model_validate(json.loads(cm["data"]["config.json"]))
    assert (config.world_size, config.model.num_layers, config.job_name) == (8, 28, "job")


def test_run_policy_scheduling_and_kueue_label() -> None:
    obj = job_dict()
    obj["spec"]["runPolicy"] = {"suspend": True, "backoffLimit": 7, "activeDeadlineSeconds": 60}
    obj["spec"]["scheduling"] = {"queue": "team-a", "minAvailable": 1, "schedulerName": "volcano"}
    job = parse_job(obj)
    pj = render(job, plan(job))[1]
    rp = pj["spec"]["runPolicy"]
    assert (rp["suspend"], rp["activeDeadlineSeconds"]) == (True, 60)
    assert "backoffLimit" not in rp  # the operator counts restarts itself
    assert rp["schedulingPolicy"] == {"minAvailable": 1, "queue": "team-a"}
    # with volcano the queue is Volcano's (the PodGroup's), not a Kueue LocalQueue
    assert "kueue.x-k8s.io/queue-name" not in pj["metadata"]["labels"]
    pod = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["schedulerName"] == "volcano"
    del obj["spec"]["scheduling"]["schedulerName"]
    job = parse_job(obj)
    assert render(job, plan(job))[1]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_cpu_device_requests_no_gpu() -> None:
    pj = _pytorchjob(preset="gpt-tiny", device="cpu", precision="fp32", seqLength=64)
    limits = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in limits["resources"]["limits"]


def _trainer_pod(**fields: Any) -> dict[str, Any]:
    return _pytorchjob(**fields)["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]


def test_default_requests_cover_the_processes_and_shared_memory() -> None:
    gpu = _trainer_pod(gpusPerNode=8, sharedMemory="16Gi")["containers"][0]["resources"]
    assert gpu["requests"] == {"cpu": "32", "memory": f"{8 * 16 * 1024 + 16 * 1024}Mi"}
    assert gpu["limits"] == {"nvidia.com/gpu": 8}  # no CPU/memory limit to throttle loaders
    cpu = _trainer_pod(
        preset="gpt-tiny", device="cpu", precision="fp32", seqLength=64, gpusPerNode=2,
        sharedMemory="1.5G",
    )["containers"][0]["resources"]  # fmt: skip
    assert cpu["requests"] == {"cpu": "2", "memory": f"{2 * 2048 + 1431}Mi"}  # 1.5e9 B, rounded up
    set_ = _trainer_pod(cpu="900m", memory="3Gi")["containers"][0]["resources"]
    assert set_["requests"] == {"cpu": "900m", "memory": "3Gi"}
    assert set_["limits"] == {"nvidia.com/gpu": 8, "cpu": "900m", "memory": "3Gi"}


@pytest.mark.parametrize(
    ("field", "value"), [("memory", "3 GiB"), ("sharedMemory", "lots"), ("cpu", "2 cores")]
)
def test_quantities_are_checked_by_the_schema(field: str, value: str) -> None:
    from kubetron_api.parse import SpecError

    with pytest.raises(SpecError, match=f"spec.resources.{field}: String should match pattern"):
        make_job(**{field: value})


def test_pods_meet_the_restricted_pod_security_standard_by_default() -> None:
    pod = _trainer_pod()
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
    }  # fmt: skip
    custom = _trainer_pod(podSecurityContext={"runAsUser": 0}, securityContext={"privileged": True})
    assert custom["securityContext"] == {"runAsUser": 0}
    assert custom["containers"][0]["securityContext"] == {"privileged": True}


def test_run_policy_timeouts_reach_the_pods_and_the_trainer() -> None:
    job = make_job()
    assert _trainer_pod()["terminationGracePeriodSeconds"] == 600  # room for a large save
    assert plan(job).trainer_config.collective_timeout_seconds == 600
    body = job_dict()
    body["spec"]["runPolicy"] = {"terminationGracePeriodSeconds": 1800,
                                 "collectiveTimeoutSeconds": 120}  # fmt: skip
    custom = parse_job(body)
    pod = render(custom, plan(custom))[1]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 1800
    assert plan(custom).trainer_config.collective_timeout_seconds == 120
    assert (
        "terminationGracePeriodSeconds" not in render(custom, plan(custom))[1]["spec"]["runPolicy"]
    )  # a pod field, not the PyTorchJob's
