"""`make demo`: the CPU example trained through Kubernetes, as a user would run it.

Stages: the local cluster with its real node (started, or reused when `make cluster-up` left
one running), `helm install` of the chart (the operator in a pod from the locally built image),
a checkpoint volume, `kubectl apply -f manifests/examples/gpt-tiny-cpu.yaml`, then what a user
watches: `kubectl get mj` until it finishes, the pods, loss and tokens/s from the trainer logs,
and the checkpoints. The cluster stays up afterwards (`--down` stops it). A failing stage is
named, with its reason and where to look.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from devtools.cluster import deploy, detached
from devtools.cluster.control_plane import Cluster
from devtools.cluster.host import NodeError
from devtools.cluster.paths import REPO_ROOT, state_file
from devtools.cluster.waiting import ClusterError

NAMESPACE = "default"
CLAIM = "gpt-tiny-cpu-checkpoints"
TIMEOUT = 900.0


class StageFailed(Exception):
    pass


def stage[T](number: int, total: int, title: str, body: Callable[[], T]) -> T:
    print(f"==> [{number}/{total}] {title}", flush=True)
    started = time.monotonic()
    try:
        result = body()
    except (ClusterError, NodeError, OSError, AssertionError, KeyError) as err:
        raise StageFailed(f"stage {number} ({title}) failed: {err}") from err
    print(f"    done in {time.monotonic() - started:.1f}s", flush=True)
    return result


def fresh_job(cluster: Cluster, name: str, volume: Path) -> None:
    """A demo run starts from scratch: an earlier run's job and checkpoints are removed."""
    if cluster.get("megatronjob", name, NAMESPACE) is not None:
        print(f"    deleting the MegatronJob {name} of an earlier demo run")
        cluster.kubectl("delete", "megatronjob", name, "-n", NAMESPACE, "--wait=true")
        cluster.wait_for(
            lambda: not deploy.pods(cluster, NAMESPACE, name),
            timeout=120,
            what=f"the pods of the earlier {name} to go",
        )
    for child in volume.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def watch(cluster: Cluster, name: str) -> dict:
    kubectl_get = ["get", "megatronjob", name, "-n", NAMESPACE]
    print("    $ kubectl " + " ".join(kubectl_get))
    header_shown = False

    def on_phase(phase: str, elapsed: float) -> None:
        nonlocal header_shown
        lines = cluster.kubectl(*kubectl_get).stdout.splitlines()
        if not header_shown:
            print(f"    {'':>6}  {lines[0]}")
            header_shown = True
        print(f"    {elapsed:5.0f}s  {lines[-1]}", flush=True)

    job = deploy.wait_final(cluster, NAMESPACE, name, TIMEOUT, on_phase)
    if job["status"]["phase"] != "Succeeded":
        messages = "; ".join(c.get("message", "") for c in job["status"].get("conditions", []))
        raise AssertionError(f"MegatronJob {name} ended {job['status']['phase']}: {messages}")
    return job


def show_results(cluster: Cluster, name: str, volume: Path) -> None:
    print("    $ kubectl get pods -l training.kubeflow.org/job-name=" + name + " -o wide")
    out = cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide",
                          "-l", f"training.kubeflow.org/job-name={name}").stdout  # fmt: skip
    for line in out.splitlines():
        print("    " + " ".join(line.split()[:7]))
    rank0_pod = f"{name}-worker-0"  # global rank 0 logs the steps of the whole job
    log = deploy.logs(cluster, NAMESPACE, rank0_pod)
    steps = deploy.steps(log)
    if not steps:
        raise AssertionError(f"no step lines in the log of {rank0_pod}")
    print(f"    $ kubectl logs {rank0_pod} | grep step")
    for step, loss, tokens in steps:
        print(f"    step {step:3d}  loss {loss:.4f}  {tokens:8,.0f} tokens/s")
    for line in log.splitlines():
        if "kubetron trainer: rank=" in line or " done: " in line:
            print("    " + line.split(" INFO ", 1)[-1])
    if steps[-1][1] >= steps[0][1]:
        raise AssertionError(f"the loss did not fall: {steps[0][1]} -> {steps[-1][1]}")
    latest = (volume / "latest").read_text().strip()
    saved = sorted(p.name for p in volume.iterdir() if p.is_dir())
    print(f"    checkpoints on the volume ({volume}): {', '.join(saved)}; latest -> {latest}")


def check_images() -> None:
    for prefix in (deploy.OPERATOR_IMAGE, deploy.TRAINER_CPU_IMAGE):
        print(f"    {deploy.built_image(prefix)}")
    image = deploy.example_job()["spec"]["resources"]["image"]
    if image != deploy.built_image(deploy.TRAINER_CPU_IMAGE):
        raise AssertionError(f"the example names {image}, but `make images` built "
                             f"{deploy.built_image(deploy.TRAINER_CPU_IMAGE)}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--down", action="store_true", help="stop the cluster at the end")
    args = parser.parse_args(argv)
    started = time.monotonic()
    total = 6
    try:
        stage(0, total, "images built by `make images`", check_images)
        cluster = stage(1, total, "local cluster: control plane, training-operator, real node",
                        lambda: detached.up(real_node=True))  # fmt: skip
        # Reconciles (and progress reads) every 3 s instead of 30 s: the demo job is short.
        stage(2, total, "helm install kubetron (operator from the locally built image)",
              lambda: deploy.install_operator(cluster, progress_seconds=3))  # fmt: skip
        job = deploy.example_job()
        name = job["metadata"]["name"]
        volume = stage(3, total, f"checkpoint volume: PersistentVolumeClaim {CLAIM}",
                       lambda: deploy.checkpoint_claim(cluster, NAMESPACE, CLAIM))  # fmt: skip
        fresh_job(cluster, name, volume)
        stage(4, total, f"kubectl apply -f {deploy.EXAMPLE.relative_to(REPO_ROOT)}",
              lambda: cluster.apply(job))  # fmt: skip
        stage(5, total, "watching the MegatronJob until it finishes", lambda: watch(cluster, name))
        stage(6, total, "results", lambda: show_results(cluster, name, volume))
    except StageFailed as err:
        print(f"demo: {err}", file=sys.stderr)
        if not state_file().exists():  # a failed start stops what it started
            print("demo: no cluster is left running; `make demo` again starts a fresh one",
                  file=sys.stderr)  # fmt: skip
        else:
            print("demo: component logs are under the cluster's temp dir (logs/); the cluster "
                  "is left up for a look: `make cluster-down` stops it",
                  file=sys.stderr)  # fmt: skip
        return 1
    print(f"demo: the MegatronJob trained to Succeeded through Kubernetes in "
          f"{time.monotonic() - started:.0f}s")  # fmt: skip
    if args.down:
        detached.cmd_down()
        return 0
    print("demo: the cluster is still up; to look around:")
    print(f"    export KUBECONFIG={cluster.kubeconfig}")
    print(f'    export PATH="{cluster.bin_dir}:$PATH"')
    print("    kubectl get mj,pytorchjobs,pods -A")
    print("demo: `make cluster-down` stops it (`make test` does too, before its own cluster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
