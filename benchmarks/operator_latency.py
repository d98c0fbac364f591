"""Operator latency: MegatronJob apply -> PyTorchJob created, against the training-operator's own
PyTorchJob -> all pods created, in one run on one control plane. Also the operator's peak RSS
and CPU seconds.

    .venv/bin/python -m benchmarks.operator_latency --n 1 --n 200

Starts the test control plane (devtools/cluster/), the kubetron operator as a process
(no leader election), creates N objects at once from a thread pool, and timestamps watch events
on this machine's monotonic clock (creationTimestamp has 1 s resolution, too coarse). Writes
benchmarks/results/operator_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from devtools.cluster import (
    FAKE_NODE_SELECTOR,
    FAKE_NODE_TOLERATIONS,
    Cluster,
    http_get,
    wait_until,
)
from devtools.cluster.kubetron import fake_gpu_job, install_kubetron
from devtools.ports import free_port
from kubetron_operator.kube import Kube, path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "operator_latency.json"


class Watcher:
    """Record the local arrival time of the first ADDED event per object name."""

    def __init__(self, kube: Kube, kind: str, ns: str, key: str = "name") -> None:
        self.seen: dict[str, list[float]] = {}
        self._kube, self._kind, self._ns, self._key = kube, kind, ns, key
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        api = self._kube.api
        url = api.configuration.host + path(self._kind, self._ns) + "?watch=1"
        headers: dict[str, str] = {}
        api.update_params_for_auth(headers, None, ["BearerToken"], url, "GET", None)
        resp = api.rest_client.pool_manager.request(
            "GET", url, headers=headers, preload_content=False, timeout=None
        )
        buf = b""
        while not self._stop.is_set():
            chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self._record(json.loads(line))

    def _record(self, event: dict[str, Any]) -> None:
        if event.get("type") != "ADDED":
            return
        meta = event["object"]["metadata"]
        key = meta["name"] if self._key == "name" else meta.get("labels", {}).get(self._key, "")
        self.seen.setdefault(key, []).append(time.monotonic())

    def stop(self) -> None:
        self._stop.set()


def _create_all(kube: Kube, ns: str, kind: str, bodies: list[dict[str, Any]]) -> dict[str, float]:
    """Create every object concurrently; return the monotonic time each POST was sent."""
    sent: dict[str, float] = {}

    def create(body: dict[str, Any]) -> None:
        sent[body["metadata"]["name"]] = time.monotonic()
        kube.request("POST", path(kind, ns), body=body)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(create, bodies))
    return sent


def _wait(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark objects did not appear in time")
        time.sleep(0.1)


def _stats(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_s": round(statistics.median(ordered), 4),
        "p99_s": round(p99, 4),
        "max_s": round(ordered[-1], 4),
        "count": len(ordered),
    }


def _proc_usage(pid: int) -> tuple[float, float]:
    """(peak RSS in MB from VmHWM, CPU seconds) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm_kb / 1024, (int(fields[11]) + int(fields[12])) / ticks


def _pytorchjob(name: str) -> dict[str, Any]:
    container = {"name": "pytorch", "image": "bench", "command": ["true"]}
    template = {
        "metadata": {"labels": {"bench": name}},
        "spec": {
            "containers": [container],
            "nodeSelector": FAKE_NODE_SELECTOR,
            "tolerations": FAKE_NODE_TOLERATIONS,
        },
    }
    replica = {"replicas": 1, "restartPolicy": "Never", "template": template}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {"pytorchReplicaSpecs": {"Master": replica, "Worker": replica}},
    }


def measure(cluster: Cluster, kube: Kube, n: int, op_pid: int) -> dict[str, Any]:
    ns_k, ns_t = f"bench-k-{n}", f"bench-t-{n}"
    for ns in (ns_k, ns_t):
        cluster.kubectl("create", "namespace", ns)
    # kubetron: MegatronJob create -> PyTorchJob ADDED
    watch_k = Watcher(kube, "PyTorchJob", ns_k)
    jobs = [fake_gpu_job(f"j{i}", nodes=2, suspend=True) for i in range(n)]
    rss0, cpu0 = _proc_usage(op_pid)
    sent_k = _create_all(kube, ns_k, "MegatronJob", jobs)
    _wait(lambda: len(watch_k.seen) >= n, timeout=300)
    rss1, cpu1 = _proc_usage(op_pid)
    watch_k.stop()
    kubetron = [watch_k.seen[name][0] - sent_k[name] for name in sent_k]
    # training-operator: PyTorchJob create -> both pods ADDED
    watch_t = Watcher(kube, "Pod", ns_t, key="bench")
    sent_t = _create_all(kube, ns_t, "PyTorchJob", [_pytorchjob(f"p{i}") for i in range(n)])
    _wait(lambda: sum(len(v) >= 2 for v in watch_t.seen.values()) >= n, timeout=300)
    watch_t.stop()
    anchor = [sorted(watch_t.seen[name])[1] - sent_t[name] for name in sent_t]
    k, t = _stats(kubetron), _stats(anchor)
    for ns in (ns_k, ns_t):
        cluster.kubectl("delete", "namespace", ns, "--wait=false")
    return {
        "n": n,
        "kubetron_apply_to_pytorchjob": k,
        "training_operator_pytorchjob_to_all_pods": t,
        "p99_ratio_kubetron_over_training_operator": round(k["p99_s"] / t["p99_s"], 3),
        "operator_peak_rss_mb": round(max(rss0, rss1), 1),
        "operator_cpu_seconds": round(cpu1 - cpu0, 2),
    }


def _get(url: str) -> str:
    try:
        return http_get(url)
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")]
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": models[0] if models else platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, action="append", help="jobs applied at once (repeat)")
    args = parser.parse_args()
    sizes = args.n or [1, 200]
    with Cluster.start() as cluster:
        install_kubetron(cluster)
        api = cluster.api_client()
        kube = Kube(api)
        metrics_port, health_port = free_port(), free_port()
        op = subprocess.Popen(
            [sys.executable, "-m", "kubetron_operator", "--kubeconfig", str(cluster.kubeconfig),
             "--no-leader-elect", "--metrics-port", str(metrics_port),
             "--health-port", str(health_port), "--bind-address", "127.0.0.1",
             "--log-level", "WARNING"],
            cwd=ROOT,
        )  # fmt: skip
        try:
            wait_until(
                lambda: "ready" in _get(f"http://127.0.0.1:{health_port}/readyz"),
                timeout=60,
                what="operator ready",
            )
            runs = [measure(cluster, kube, n, op.pid) for n in sizes]
        finally:
            op.terminate()
            op.wait(timeout=30)
            api.close()
    result = {"benchmark": "operator_latency", "machine": machine(), "runs": runs}
    text = json.dumps(result, indent=2)
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
