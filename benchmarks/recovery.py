"""Recovery from a failure, measured on the local cluster's real nodes: the time from the fault
to every rank training again, and the goodput (useful steps over wall time) of a job with one
injected failure against the same job uninterrupted.

    .venv/bin/python -m benchmarks.recovery [--iters 400] [--fault process|node] [--output FILE]

Starts (or reuses) the local cluster with its real node (`make cluster-up`), installs the
operator with Helm (progress and resync every 2 s), and runs the CPU example (2 pods x 2
processes, TP2 x DP2, checkpoints every 20 steps) twice: once uninterrupted, once with a fault
right after the checkpoint of step 40:

- `process` (default): the highest trainer rank of worker 1 is SIGKILLed; writes
  benchmarks/results/recovery.json;
- `node`: on a cluster of two real nodes (`python -m devtools.cluster up --nodes 2`; the
  operator pinned to the first), the job's pods spread one per node, the second node is lost
  (link down, every process of it killed: devtools.cluster.faults.lose_node) and, once the node
  controller has marked it not Ready, tainted out-of-service; the job restarts on the first
  node alone. Records also how long the node took to be marked not Ready. Writes
  benchmarks/results/recovery-node.json; the second node is removed at the end.

Times come from the kubelet's log timestamps (the trainer's step lines) and this machine's
clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from devtools.cluster import Cluster, deploy, detached, faults, host

NAMESPACE, RELEASE = "bench-recovery", "kubetron-bench"
SAVE = 20
RESULTS = Path(__file__).parent / "results"
OUTPUTS = {"process": RESULTS / "recovery.json", "node": RESULTS / "recovery-node.json"}
TITLES = {
    "process": "recovery: one SIGKILLed trainer process, whole-group restart, resume",
    "node": "recovery: one of two real nodes lost mid-run, restart on the other, resume",
}
RANK0 = "worker-0"  # the pod of global rank 0, whose step lines are timed


def inject(cluster: Cluster, name: str, fault: str) -> dict[str, Any]:
    """The fault, right after the checkpoint of step 40; what was seen of it."""
    rank0 = f"{name}-{RANK0}"
    faults.wait_for_log(cluster, NAMESPACE, rank0, rf"saved checkpoint of step {2 * SAVE}\b")
    before = faults.timestamped_steps(cluster, NAMESPACE, rank0)
    failed_at = datetime.now(UTC)
    out: dict[str, Any] = {"failed_at": failed_at.isoformat()}
    if fault == "process":
        out["killed_rank"] = faults.signal_rank(cluster, NAMESPACE, f"{name}-worker-1", "KILL")
    else:
        lost = cluster.real_nodes[1]
        out["placement_before"] = deploy.placement(cluster, NAMESPACE, name)
        faults.lose_node(cluster, lost)
        faults.declare_out_of_service(cluster, lost.name)
        out["lost_node"] = lost.name
        out["not_ready_after_s"] = round((datetime.now(UTC) - failed_at).total_seconds(), 2)
    out["last_step_before"] = before[-1][1] if before else None
    return out


def run_job(cluster: Cluster, name: str, iters: int, fault: str | None) -> dict[str, Any]:
    started = time.monotonic()
    changes: dict[str, Any] = {}
    if len(cluster.real_nodes) > 1:  # a lost peer hangs the survivors' collectives
        changes = {"resources": {"affinity": deploy.one_pod_per_node(name, required=False)},
                   "runPolicy": {"progressDeadlineSeconds": 40}}  # fmt: skip
    volume = faults.apply_long_job(cluster, NAMESPACE, name, iters, SAVE, **changes)
    out: dict[str, Any] = {"job": name, "iters": iters, "volume": str(volume)}
    if fault:
        out |= inject(cluster, name, fault)
    final = deploy.wait_final(cluster, NAMESPACE, name, 900)
    out["wall_s"] = round(time.monotonic() - started, 2)
    status = final["status"]
    out |= {k: status.get(k) for k in ("phase", "attempt", "restarts", "runningSince")}
    out["placement"] = deploy.placement(cluster, NAMESPACE, name)
    steps = faults.timestamped_steps(cluster, NAMESPACE, f"{name}-{RANK0}")
    out["steps_in_last_attempt"] = len(steps)
    out["goodput_steps_per_s"] = round(iters / out["wall_s"], 3)
    if fault and steps:
        first_time, first_step = steps[0]
        failed_at = datetime.fromisoformat(out["failed_at"])
        out["resumed_at_step"] = first_step - 1
        out["steps_redone"] = out["last_step_before"] - (first_step - 1)
        out["recovery_s"] = round((first_time - failed_at).total_seconds(), 2)
        restarting = next(c for c in status["conditions"] if c["type"] == "Restarting")
        out["restarting_condition"] = restarting
    if len(steps) > 10:
        span = (steps[-1][0] - steps[10][0]).total_seconds()
        out["steady_steps_per_s"] = round((steps[-1][1] - steps[10][1]) / span, 2) if span else None
    return out


def machine() -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "?",
    )  # fmt: skip
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--fault", choices=sorted(OUTPUTS), default="process")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    output: Path = args.output or OUTPUTS[args.fault]
    cluster = detached.up(real_node=True, nodes=2 if args.fault == "node" else 1)
    restricted = {"pod-security.kubernetes.io/enforce": "restricted"}
    for ns in (NAMESPACE, RELEASE):
        meta = {"name": ns, "labels": restricted}
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
    first = {"kubernetes.io/hostname": host.NODE_NAME}  # never on a node the benchmark loses
    deploy.install_operator(cluster, RELEASE, RELEASE, watch=[NAMESPACE], crds=True,
                            progress_seconds=2, node_selector=first)  # fmt: skip
    stamp = datetime.now(UTC).strftime("%H%M%S")
    try:
        clean = run_job(cluster, f"clean-{stamp}", args.iters, None)
        fault = run_job(cluster, f"fault-{stamp}", args.iters, args.fault)
    finally:
        deploy.uninstall_operator(cluster, RELEASE, RELEASE)
        cluster.kubectl("delete", "namespace", NAMESPACE, RELEASE, "--wait=false")
        if args.fault == "node":  # the lost node is of no use any more
            cluster.remove_node(cluster.real_nodes[1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()  # fmt: skip
    result = {
        "benchmark": TITLES[args.fault],
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "code": commit,
        "command": f"python -m benchmarks.recovery --iters {args.iters} --fault {args.fault}",
        "uninterrupted": clean,
        "one_failure": fault,
        "goodput_ratio": round(fault["goodput_steps_per_s"] / clean["goodput_steps_per_s"], 3),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("goodput_ratio",)} | {
        "recovery_s": fault.get("recovery_s"), "steps_redone": fault.get("steps_redone"),
        "wall_clean_s": clean["wall_s"], "wall_fault_s": fault["wall_s"]}))  # fmt: skip
    return 0 if fault.get("phase") == "Succeeded" and clean.get("phase") == "Succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())
