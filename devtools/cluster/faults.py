"""Faults a real cluster brings, injected into trainer pods on the real nodes: a killed or stopped
trainer process (through `kubectl exec`, as the container's own user), a deleted pod, a lost
node (a further real node gone like a machine that lost power). Each helper is bounded and
returns; used by tests/e2e/test_lifecycle.py, tests/e2e/test_two_nodes.py and
benchmarks/recovery.py."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from devtools.cluster import deploy, host
from devtools.cluster.control_plane import Cluster
from devtools.cluster.node import RealNode

# Lists the trainer processes (torchrun's workers, `python ... -m kubetron_trainer --config`) of
# the container as JSON [[pid, rank], ...]; the launcher and torchrun are not among them.
_FIND = r"""
import json, os
out = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        continue
    if b"kubetron_trainer" in argv and b"--config" in argv and b"torch.distributed.run" not in argv:
        rank = next((e[5:] for e in env if e.startswith(b"RANK=")), b"-1")
        out.append([int(pid), int(rank)])
print(json.dumps(sorted(out)))
"""


def trainer_processes(
    cluster: Cluster, namespace: str, pod: str, container: str = deploy.CONTAINER
) -> list[tuple[int, int]]:
    """(pid, global rank) of every trainer process in the pod's container."""
    out = cluster.kubectl(
        "exec", "-n", namespace, pod, "-c", container, "--", "python", "-c", _FIND
    ).stdout
    return [(int(pid), int(rank)) for pid, rank in json.loads(out)]


def signal_rank(
    cluster: Cluster, namespace: str, pod: str, signal: str, container: str = deploy.CONTAINER
) -> int:
    """Send `signal` (KILL, STOP) to the pod's highest trainer rank; returns that rank."""
    procs = trainer_processes(cluster, namespace, pod, container)
    assert procs, f"no trainer process in {pod}"
    pid, rank = max(procs, key=lambda p: p[1])
    code = f"import os, signal; os.kill({pid}, signal.SIG{signal})"  # the image has no kill(1)
    cluster.kubectl("exec", "-n", namespace, pod, "-c", container, "--", "python", "-c", code)
    return rank


def wait_for_log(
    cluster: Cluster,
    namespace: str,
    pod: str,
    pattern: str,
    timeout: float = 300,
    container: str = deploy.CONTAINER,
) -> re.Match[str]:
    """Wait until the pod's trainer log matches `pattern`; returns the match."""
    regex = re.compile(pattern)

    def found() -> re.Match[str] | None:
        proc = cluster.kubectl("logs", "-n", namespace, pod, "-c", container, check=False)
        return regex.search(proc.stdout) if proc.returncode == 0 else None

    return cluster.wait_for(found, timeout=timeout, what=f"{pattern!r} in {pod}", interval=0.5)


def drop_pod_traffic(cluster: Cluster, namespace: str, pod: str) -> None:
    """Drop every packet into and out of the pod's network namespace but its loopback (the
    processes of one pod still talk to each other), as a broken network path to the pod would:
    its peers' collectives with it hang until their timeout. The rules go with the pod."""
    status = (cluster.get("pod", pod, namespace) or {}).get("status", {})
    container = status["containerStatuses"][0]["containerID"].split("://", 1)[1]
    real = deploy.real_node(cluster)
    spec = json.loads(real.ctr("-n", "k8s.io", "containers", "info", container).stdout)["Spec"]
    netns = next(n["path"] for n in spec["linux"]["namespaces"] if n["type"] == "network")
    for chain, loopback in (("INPUT", "-i"), ("OUTPUT", "-o")):
        host.run("nsenter", f"--net={netns}", "iptables", "-I", chain, "!", loopback, "lo",
                 "-j", "DROP")  # fmt: skip


def set_suspend(cluster: Cluster, namespace: str, name: str, on: bool, timeout: float) -> None:
    """Suspend the MegatronJob (as a user does: runPolicy.suspend) and wait until it is Suspended
    with its pods gone; or resume it (on=False), returning at once."""
    patch = json.dumps({"spec": {"runPolicy": {"suspend": on}}})
    cluster.kubectl("patch", "mj", name, "-n", namespace, "--type", "merge", "-p", patch)
    if not on:
        return
    cluster.wait_for(
        lambda: (
            (cluster.get("megatronjob", name, namespace) or {}).get("status", {}).get("phase")
            == "Suspended"
            and not deploy.pods(cluster, namespace, name)
        ),
        timeout=timeout,
        what=f"{name} Suspended with its pods gone",
    )


def timestamped_steps(cluster: Cluster, namespace: str, pod: str) -> list[tuple[datetime, int]]:
    """(when, step) of every step line rank 0 logged, from the kubelet's log timestamps."""
    out = cluster.kubectl("logs", "-n", namespace, pod, "-c", "pytorch", "--timestamps").stdout
    found = []
    for line in out.splitlines():
        stamp, _, text = line.partition(" ")
        if m := re.search(r"step (\d+)/\d+ \| loss", text):
            found.append((datetime.fromisoformat(stamp.replace("Z", "+00:00")), int(m[1])))
    return found


def apply_long_job(
    cluster: Cluster, namespace: str, name: str, iters: int, save_interval: int, **changes: Any
) -> Path:
    """The CPU example as `name`, `iters` steps logged every step, checkpoints every
    `save_interval` on a claim of its own; returns the claim's directory on the node."""
    claim = f"{name}-ckpt"
    volume = deploy.checkpoint_claim(cluster, namespace, claim)
    job = deploy.example_job(
        recipe={"trainIters": iters, "logInterval": 1, **changes.pop("recipe", {})},
        checkpoint={"saveInterval": save_interval, "volume": {"claimName": claim}},
        **changes,
    )
    job["metadata"] = {"name": name, "namespace": namespace}
    cluster.apply(job)
    return volume


def lose_node(cluster: Cluster, real: RealNode) -> None:
    """Node `real` (a further one) is gone like a machine that lost power: its link goes down
    first (its peers hear nothing more), then its kubelet, kube-proxy, containerd, shims and
    containers die by SIGKILL, without a word to the API server. The cluster stops watching
    those processes; `Cluster.remove_node` still removes what the node left."""
    if real.net.first:
        raise ValueError("the first node carries the API server's address and CoreDNS")
    host.run("ip", "link", "set", real.net.host_veth, "down")
    for name in ("kubelet", "kube-proxy", "containerd"):
        component = cluster.components.pop(real.net.component(name), None)
        if component is not None:
            component.kill()
    host.kill_processes_mentioning(str(real.socket))  # the shims
    host.kill_cgroup_processes(real.net.cgroup_root)  # the containers
    cluster.save_state()


def node_ready(cluster: Cluster, name: str) -> bool:
    node = cluster.api_get(f"/api/v1/nodes/{name}") or {}
    conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
    return conditions.get("Ready") == "True"


def declare_out_of_service(cluster: Cluster, name: str, timeout: float = 300) -> None:
    """What an administrator (or a cloud's node controller) does for a node that is gone, once
    the node controller has marked it not Ready (after kube-controller-manager's
    --node-monitor-grace-period): taint it out-of-service (Kubernetes' non-graceful node
    shutdown), so its pods, which no kubelet will ever confirm stopped, are deleted for good
    (the taint evicts them, the pod garbage collector force-deletes them)."""
    cluster.wait_for(lambda: not node_ready(cluster, name), timeout=timeout,
                     what=f"node {name} not Ready", interval=1.0)  # fmt: skip
    taint = "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute"
    cluster.kubectl("taint", "node", name, taint, "--overwrite")
