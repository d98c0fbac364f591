"""The TrainJob backend's render: golden files, the same pods as the PyTorchJob backend, the
choice of backend, what it refuses, and the runtime, settings and RBAC that go with it.

Regenerate the golden files after an intended change with `UPDATE_GOLDEN=1 make test-unit`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kubetron_api.parse import load_documents, parse_job
from kubetron_api.v1alpha1 import Backend, MegatronJob
from kubetron_api.wire import MASTER_ADDR_ENV, MASTER_PORT_ENV, REPLICA_INDEX_ENV
from kubetron_operator.cli.main import main as kubetron_main
from kubetron_operator.cli.rbac import manifests
from kubetron_operator.plan import plan
from kubetron_operator.render import WORKER, PyTorchJobBuilder, render, to_yaml
from kubetron_operator.render_trainjob import (
    COMPLETION_INDEX_ANNOTATION,
    NODE,
    RUNTIME_NAME,
    BackendError,
    TrainJobBuilder,
)
from kubetron_operator.settings import parse_settings
from tests.builders import job_dict

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"
GOLDEN = Path(__file__).parent / "golden" / "trainjob"
# one and several nodes, CPU, several models, suspended
GOLDEN_EXAMPLES = ("gpt-tiny-cpu", "qwen3-8b-2x8", "qwen3-distill", "suspended")
RUNTIME_FILE = ROOT / "charts" / "kubetron" / "files" / "trainjob-runtime.yaml"

Obj = dict[str, Any]


def _example(stem: str) -> MegatronJob:
    (_, obj), *_ = load_documents(EXAMPLES / f"{stem}.yaml")
    obj["metadata"] |= {"namespace": "research", "uid": "5f0c-golden-uid"}
    obj["spec"]["backend"] = "TrainJob"
    return parse_job(obj)


@pytest.mark.parametrize("stem", GOLDEN_EXAMPLES)
def test_trainjob_render_matches_golden(stem: str) -> None:
    job = _example(stem)
    _, train_job = render(job, plan(job))
    text = to_yaml([train_job])
    golden = GOLDEN / f"{stem}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}; run with UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"TrainJob render changed for {stem}"


def _pod_patch(train_job: Obj) -> Obj:
    (patch,) = train_job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == NODE
    template: Obj = node["template"]["spec"]["template"]
    return template


@pytest.mark.parametrize(
    "stem", sorted(p.stem for p in EXAMPLES.glob("*.yaml") if "kueue" not in p.stem)
)
def test_the_pods_are_the_pytorchjob_backends_workers(stem: str) -> None:
    job = _example(stem)
    job_plan = plan(job)
    train_job = TrainJobBuilder().build(job, job_plan, 2)
    worker = PyTorchJobBuilder().build(job, job_plan, 2)["spec"]["pytorchReplicaSpecs"][WORKER]
    want, want_spec = worker["template"], worker["template"]["spec"]
    (want_container,) = want_spec["containers"]
    patch, trainer = _pod_patch(train_job), train_job["spec"]["trainer"]
    assert patch["metadata"] == want["metadata"]
    for key in ("securityContext", "terminationGracePeriodSeconds", "volumes", "nodeSelector"):
        assert patch["spec"].get(key) == want_spec.get(key), key
    assert (patch["spec"].get("tolerations"), patch["spec"].get("affinity")) == (
        want_spec.get("tolerations"),
        want_spec.get("affinity"),
    )
    (container,) = patch["spec"]["containers"]
    assert container["volumeMounts"] == want_container["volumeMounts"]
    assert container["securityContext"] == want_container["securityContext"]
    assert trainer["resourcesPerNode"] == want_container["resources"]
    for key in ("image", "command", "args"):
        assert trainer[key] == want_container[key], key
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (
        job_plan.nodes,
        job_plan.procs_per_node,
    )
    # the env: kubetron's, less the rendezvous (Trainer v2 sets PET_MASTER_*), and the pod index
    # from the Job's completion index instead of the training-operator's label
    env = {var["name"]: var for var in trainer["env"]}
    want_env = {var["name"]: var for var in want_container["env"]}
    assert env.keys() == want_env.keys() - {MASTER_ADDR_ENV, MASTER_PORT_ENV}
    index = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
    assert env.pop(REPLICA_INDEX_ENV)["valueFrom"] == {"fieldRef": {"fieldPath": index}}
    assert all(var == want_env[name] for name, var in env.items())
    assert not any(name.startswith("PET_") for name in env)  # Trainer v2 refuses its own
    assert train_job["metadata"]["labels"]["kubetron.io/attempt"] == "2"
    assert train_job["spec"]["runtimeRef"]["name"] == RUNTIME_NAME


def test_the_backend_is_the_specs_else_the_operators_default() -> None:
    unset = parse_job(job_dict())
    assert render(unset, plan(unset))[1]["kind"] == "PyTorchJob"
    assert render(unset, plan(unset), default_backend=Backend.TRAINJOB)[1]["kind"] == "TrainJob"
    obj = job_dict()
    obj["spec"]["backend"] = "PyTorchJob"
    pinned = parse_job(obj)
    assert render(pinned, plan(pinned), default_backend=Backend.TRAINJOB)[1]["kind"] == "PyTorchJob"


def test_what_a_trainjob_cannot_carry_is_refused_naming_each() -> None:
    obj = job_dict()
    obj["spec"]["resources"] |= {"priorityClassName": "high", "imagePullPolicy": "Always"}
    obj["spec"] |= {"backend": "TrainJob", "metrics": {"port": 9500}}
    obj["spec"]["scheduling"] = {"schedulerName": "volcano"}
    job = parse_job(obj)
    with pytest.raises(BackendError) as err:
        render(job, plan(job))
    for field in ("priorityClassName", "schedulerName", "imagePullPolicy", "metrics.port"):
        assert field in str(err.value)


def test_queued_and_suspended_jobs_start_suspended_with_their_deadline() -> None:
    obj = job_dict()
    obj["spec"] |= {"backend": "TrainJob", "scheduling": {"queue": "team-a"}}
    obj["spec"]["runPolicy"] = {"activeDeadlineSeconds": 60}
    queued = parse_job(obj)
    spec = render(queued, plan(queued))[1]["spec"]
    assert (spec["suspend"], spec["activeDeadlineSeconds"]) == (True, 60)


def test_the_charts_runtime_is_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert kubetron_main(["runtime"]) == 0
    assert capsys.readouterr().out == RUNTIME_FILE.read_text(), "run `make generate`"


def test_backend_setting_from_flag_and_env() -> None:
    assert parse_settings([], env={}).backend is Backend.PYTORCHJOB
    assert parse_settings([], env={"KUBETRON_BACKEND": "TrainJob"}).backend is Backend.TRAINJOB
    assert parse_settings(["--backend", "TrainJob"], env={}).backend is Backend.TRAINJOB
    with pytest.raises(SystemExit):
        parse_settings(["--backend", "MPIJob"], env={})


def test_trainjob_rbac_only_where_the_backend_is_on() -> None:
    def resources(trainjob: bool) -> set[str]:
        role = next(m for m in manifests(trainjob=trainjob) if m["kind"] == "ClusterRole")
        return {r for rule in role["rules"] for r in rule["resources"]}

    assert not {"trainjobs", "jobsets"} & resources(False)
    assert {"trainjobs", "pytorchjobs", "jobsets"} <= resources(True)
    role = next(m for m in manifests(trainjob=True) if m["kind"] == "ClusterRole")
    (jobsets,) = [rule for rule in role["rules"] if rule["resources"] == ["jobsets"]]
    assert jobsets["verbs"] == ["get"]  # a replaced attempt's, seen gone; nothing else


def test_a_queued_job_has_the_runtimes_grace_period() -> None:
    """Kueue drops a TrainJob's own grace period: a queued job carries none (the runtime's
    holds), and one that asks for another is refused."""
    obj = job_dict()
    obj["spec"] |= {"backend": "TrainJob", "scheduling": {"queue": "team-a"}}
    queued = parse_job(obj)
    (patch,) = render(queued, plan(queued))[1]["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert "terminationGracePeriodSeconds" not in node["template"]["spec"]["template"]["spec"]
    obj["spec"]["runPolicy"] = {"terminationGracePeriodSeconds": 900}
    longer = parse_job(obj)
    with pytest.raises(BackendError, match="terminationGracePeriodSeconds other than 600"):
        render(longer, plan(longer))
