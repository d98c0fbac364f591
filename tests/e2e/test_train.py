"""`kubectl apply` of a MegatronJob trains, for real, through every part a user's cluster has: the
operator in a pod (installed by `helm install` from the locally built image), the real
training-operator, pods on the real node from the CPU trainer image, torchrun rendezvous through
worker 0's Service DNS name, checkpoints on a PersistentVolume every pod mounts, resume of a
second job from the first one's checkpoint, and a permanent failure named in the status. Both
namespaces enforce the restricted Pod Security Standard, so every pod here passes it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.cluster import Cluster, deploy, host

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

CLAIM = "gpt-tiny-cpu-checkpoints"  # what manifests/examples/gpt-tiny-cpu.yaml mounts
TRAIN_TIMEOUT = 900.0


@pytest.fixture(scope="module")
def trained(cluster: Cluster) -> Iterator[tuple[str, Path]]:
    """A namespace watched by an operator that `helm install` put in a pod, with the example's
    checkpoint claim; yields (namespace, the claim's directory on the host)."""
    namespace = "e2e-train"
    release, operator_ns = "kubetron-e2e", "kubetron-e2e"
    restricted = {"pod-security.kubernetes.io/enforce": "restricted"}
    for ns in (namespace, operator_ns):  # trainer and operator pods pass the restricted level
        metadata = {"name": ns, "labels": restricted}
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})
    deploy.install_operator(
        cluster, release, operator_ns, watch=[namespace], crds=False, progress_seconds=2
    )
    volume = deploy.checkpoint_claim(cluster, namespace, CLAIM)
    yield namespace, volume
    deploy.uninstall_operator(cluster, release, operator_ns)
    cluster.kubectl("delete", "namespace", namespace, operator_ns, "--wait=false")


def report(cluster: Cluster, namespace: str, name: str) -> str:
    """Pods and the tail of each trainer log, for assertion messages."""
    parts = []
    for p in deploy.pods(cluster, namespace, name):
        pod = p["metadata"]["name"]
        proc = cluster.kubectl("logs", "-n", namespace, pod, "-c", "pytorch", check=False)
        parts.append(f"--- {pod} {p['status'].get('phase')}\n{proc.stdout[-3000:]}{proc.stderr}")
    return "\n".join(parts)


def assert_final_progress(status: dict[str, Any], log: str, last: int) -> None:
    """status.progress of an ended job is the trainer's own end: the last step, the loss global
    rank 0 logged for it, its throughput and the last checkpoint's step."""
    progress = status["progress"]
    steps = deploy.steps(log)
    assert (progress["step"], progress["totalSteps"], steps[-1][0]) == (last, last, last), progress
    assert progress["loss"] == f"{steps[-1][1]:.4f}", (progress, steps[-1])
    assert progress["tokensPerSecond"] > 0 and progress["lastCheckpointStep"] == last, progress


def test_example_trains_to_succeeded_through_the_operator(
    cluster: Cluster, trained: tuple[str, Path]
) -> None:
    namespace, volume = trained
    job = deploy.example_job()
    name = job["metadata"]["name"]
    job["metadata"]["namespace"] = namespace
    cluster.apply(job)
    phases: list[str] = []
    final = deploy.wait_final(
        cluster, namespace, name, TRAIN_TIMEOUT, lambda p, _: phases.append(p)
    )
    assert final["status"]["phase"] == "Succeeded", report(cluster, namespace, name)
    assert "Running" in phases

    pods = deploy.pods(cluster, namespace, name)
    assert [p["metadata"]["name"] for p in pods] == [f"{name}-worker-0", f"{name}-worker-1"]
    for p in pods:
        assert p["spec"]["nodeName"] == host.NODE_NAME
        assert p["status"]["phase"] == "Succeeded"
        # Workers only: no init container (the training-operator adds one with a Master)
        assert not p["spec"].get("initContainers"), p["spec"]
    # Worker 1 met worker 0 through worker 0's Service DNS name; the training-operator gave
    # worker 0 the master role; the launcher took the node rank from the replica index.
    assert pods[0]["metadata"]["labels"]["training.kubeflow.org/job-role"] == "master"
    env = {e["name"]: e.get("value") for e in pods[1]["spec"]["containers"][0]["env"]}
    assert env["PET_MASTER_ADDR"] == f"{name}-worker-0"
    log = deploy.logs(cluster, namespace, pods[1]["metadata"]["name"])
    assert "pod 1 of 0,1: node rank 1" in log, log[-3000:]

    # Global rank 0 (in worker 0) logs the job's steps; the world spans both pods.
    log = deploy.logs(cluster, namespace, pods[0]["metadata"]["name"])
    assert f"rank=0/4 local_rank=0/2 node=0/2 master={name}-worker-0:" in log, log[-3000:]
    steps = deploy.steps(log)
    assert [s for s, _, _ in steps] == [1, 5, 10, 15, 20, 25, 30], log[-3000:]
    assert steps[-1][1] < steps[0][1]
    assert all(tokens > 0 for _, _, tokens in steps)

    # The final progress: what global rank 0 handed over in its termination message when it
    # exited (over the operator's last read of its metrics endpoint).
    assert_final_progress(final["status"], log, 30)
    header = cluster.kubectl("get", "mj", name, "-n", namespace).stdout.splitlines()[0].split()
    assert header[:9] == ["NAME", "PHASE", "WORLD", "TP", "PP", "DP", "STEP", "LOSS", "TOKENS/S"]

    # The checkpoints are on the shared volume: saves at 10, 20 and 30, `latest` at 30.
    assert (volume / "latest").read_text().strip() == "30"
    assert {p.name for p in volume.iterdir()} >= {"iter_0000010", "iter_0000020", "iter_0000030"}


def test_second_job_resumes_from_the_first_ones_checkpoint(
    cluster: Cluster, trained: tuple[str, Path]
) -> None:
    namespace, volume = trained
    if not (volume / "latest").exists():
        pytest.skip("needs the checkpoint of test_example_trains_to_succeeded_through_the_operator")
    job = deploy.example_job(recipe={"trainIters": 40})
    job["metadata"] = {"name": "gpt-tiny-cpu-more", "namespace": namespace}
    cluster.apply(job)
    final = deploy.wait_final(cluster, namespace, "gpt-tiny-cpu-more", TRAIN_TIMEOUT)
    assert final["status"]["phase"] == "Succeeded", report(cluster, namespace, "gpt-tiny-cpu-more")
    log = deploy.logs(cluster, namespace, "gpt-tiny-cpu-more-worker-0")
    assert "(step 30)" in log and "resumed from" in log, log[-3000:]
    assert [s for s, _, _ in deploy.steps(log)] == [35, 40], log[-3000:]
    assert (volume / "latest").read_text().strip() == "40"


def test_permanent_exit_code_fails_the_job_naming_pod_and_code(
    cluster: Cluster, trained: tuple[str, Path]
) -> None:
    """A dataset that is not on the volume passes every check an API server can make; the
    trainer exits 2 (permanent) and the MegatronJob says which pod, which code and why."""
    namespace, _ = trained
    job = deploy.example_job(
        data={"type": "indexed", "paths": [{"prefix": "/checkpoints/no/such/dataset"}]}
    )
    job["metadata"] = {"name": "gpt-tiny-cpu-bad-data", "namespace": namespace}
    job["spec"]["checkpoint"]["path"] = "/checkpoints/bad-data"
    cluster.apply(job)
    final = deploy.wait_final(cluster, namespace, "gpt-tiny-cpu-bad-data", TRAIN_TIMEOUT)
    assert final["status"]["phase"] == "Failed"
    messages = " ".join(c.get("message", "") for c in final["status"]["conditions"])
    # The pod, the code and the trainer's own error (its termination message), naming the field.
    # Both pods exit 2 at once; the job fails at the first exit the operator sees, which names
    # that pod and one of its own ranks (2 a pod: worker-0 holds ranks 0-1, worker-1 ranks 2-3).
    named = re.search(
        r"pod gpt-tiny-cpu-bad-data-worker-(\d) container pytorch exited with code 2 \(Error\): "
        r"rank-(\d): config field data\.paths\[0\]\.prefix: "
        r"/checkpoints/no/such/dataset\.bin does not exist",
        messages,
    )
    assert named is not None, messages
    assert int(named.group(2)) // 2 == int(named.group(1)), messages
