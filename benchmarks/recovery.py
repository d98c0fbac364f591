"""Recovery from a pod failure, measured on the local cluster's real node: the time from killing
one trainer process to every rank training again, and the goodput (useful steps over wall time)
of a job with one injected failure against the same job uninterrupted.

    .venv/bin/python -m benchmarks.recovery [--iters 400] [--output FILE]

Starts (or reuses) the local cluster with its real node (`make cluster-up`), installs the
operator with Helm (progress and resync every 2 s), and runs the CPU example (2 pods x 2
processes, TP2 x DP2, checkpoints every 20 steps) twice: once uninterrupted, once with the
highest trainer rank of the worker pod SIGKILLed right after the checkpoint of step 40. Times
come from the kubelet's log timestamps (the trainer's step lines) and this machine's clock.
Writes benchmarks/results/recovery.json.
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

from devtools.cluster import Cluster, deploy, detached, faults

NAMESPACE, RELEASE = "bench-recovery", "kubetron-bench"
SAVE = 20
OUTPUT = Path(__file__).parent / "results" / "recovery.json"


def run_job(cluster: Cluster, name: str, iters: int, inject: bool) -> dict[str, Any]:
    started = time.monotonic()
    volume = faults.apply_long_job(cluster, NAMESPACE, name, iters, SAVE)
    out: dict[str, Any] = {"job": name, "iters": iters, "volume": str(volume)}
    if inject:
        master = f"{name}-master-0"
        faults.wait_for_log(cluster, NAMESPACE, master, rf"saved checkpoint of step {2 * SAVE}\b")
        before = faults.timestamped_steps(cluster, NAMESPACE, master)
        failed_at = datetime.now(UTC)
        out["killed_rank"] = faults.signal_rank(cluster, NAMESPACE, f"{name}-worker-0", "KILL")
        out["failed_at"] = failed_at.isoformat()
        out["last_step_before"] = before[-1][1] if before else None
    final = deploy.wait_final(cluster, NAMESPACE, name, 900)
    out["wall_s"] = round(time.monotonic() - started, 2)
    status = final["status"]
    out |= {k: status.get(k) for k in ("phase", "attempt", "restarts", "runningSince")}
    steps = faults.timestamped_steps(cluster, NAMESPACE, f"{name}-master-0")
    out["steps_in_last_attempt"] = len(steps)
    out["goodput_steps_per_s"] = round(iters / out["wall_s"], 3)
    if inject and steps:
        first_time, first_step = steps[0]
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
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    cluster = detached.up(real_node=True)
    restricted = {"pod-security.kubernetes.io/enforce": "restricted"}
    for ns in (NAMESPACE, RELEASE):
        meta = {"name": ns, "labels": restricted}
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
    deploy.install_operator(cluster, RELEASE, RELEASE, watch=[NAMESPACE], crds=True,
                            progress_seconds=2)  # fmt: skip
    stamp = datetime.now(UTC).strftime("%H%M%S")
    try:
        clean = run_job(cluster, f"clean-{stamp}", args.iters, inject=False)
        fault = run_job(cluster, f"fault-{stamp}", args.iters, inject=True)
    finally:
        deploy.uninstall_operator(cluster, RELEASE, RELEASE)
        cluster.kubectl("delete", "namespace", NAMESPACE, RELEASE, "--wait=false")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()  # fmt: skip
    result = {
        "benchmark": "recovery: one SIGKILLed trainer process, whole-group restart, resume",
        "issue": "14",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "code": commit,
        "command": f"python -m benchmarks.recovery --iters {args.iters}",
        "uninterrupted": clean,
        "one_failure": fault,
        "goodput_ratio": round(fault["goodput_steps_per_s"] / clean["goodput_steps_per_s"], 3),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("goodput_ratio",)} | {
        "recovery_s": fault.get("recovery_s"), "steps_redone": fault.get("steps_redone"),
        "wall_clean_s": clean["wall_s"], "wall_fault_s": fault["wall_s"]}))  # fmt: skip
    return 0 if fault.get("phase") == "Succeeded" and clean.get("phase") == "Succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())
