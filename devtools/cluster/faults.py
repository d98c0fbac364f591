"""Faults a real cluster brings, injected into trainer pods on the real node: a killed or stopped
trainer process (through `kubectl exec`, as the container's own user), a deleted pod. Each helper
is bounded and returns; used by tests/e2e/test_lifecycle.py and benchmarks/recovery.py."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from devtools.cluster import deploy
from devtools.cluster.control_plane import Cluster

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


def trainer_processes(cluster: Cluster, namespace: str, pod: str) -> list[tuple[int, int]]:
    """(pid, global rank) of every trainer process in the pod's container."""
    out = cluster.kubectl(
        "exec", "-n", namespace, pod, "-c", "pytorch", "--", "python", "-c", _FIND
    ).stdout
    return [(int(pid), int(rank)) for pid, rank in json.loads(out)]


def signal_rank(cluster: Cluster, namespace: str, pod: str, signal: str) -> int:
    """Send `signal` (KILL, STOP) to the pod's highest trainer rank; returns that rank."""
    procs = trainer_processes(cluster, namespace, pod)
    assert procs, f"no trainer process in {pod}"
    pid, rank = max(procs, key=lambda p: p[1])
    code = f"import os, signal; os.kill({pid}, signal.SIG{signal})"  # the image has no kill(1)
    cluster.kubectl("exec", "-n", namespace, pod, "-c", "pytorch", "--", "python", "-c", code)
    return rank


def wait_for_log(
    cluster: Cluster, namespace: str, pod: str, pattern: str, timeout: float = 300
) -> re.Match[str]:
    """Wait until the pod's trainer log matches `pattern`; returns the match."""
    regex = re.compile(pattern)

    def found() -> re.Match[str] | None:
        proc = cluster.kubectl("logs", "-n", namespace, pod, "-c", "pytorch", check=False)
        return regex.search(proc.stdout) if proc.returncode == 0 else None

    return cluster.wait_for(found, timeout=timeout, what=f"{pattern!r} in {pod}", interval=0.5)


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
        recipe={"trainIters": iters, "logInterval": 1},
        checkpoint={"saveInterval": save_interval, "volume": {"claimName": claim}},
        **changes,
    )
    job["metadata"] = {"name": name, "namespace": namespace}
    cluster.apply(job)
    return volume
