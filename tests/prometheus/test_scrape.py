"""A real Prometheus scrapes a running operator and a running CPU trainer, through scrape jobs
written like the chart's ServiceMonitor and PodMonitor, and answers every dashboard query.

Set-up (all on loopback, all processes ended at teardown):
- the test control plane (`cluster` fixture) with the MegatronJob CRD;
- `python -m kubetron_operator` against it, leader election on, resync every few seconds,
  watching two fresh namespaces: one with a valid job (gpt-tiny-cpu) and an invalid one (TP=8
  does not divide gpt-tiny's 4 heads), one whose ResourceQuota forbids ConfigMaps, so the
  operator's apply fails (a real API error and an `error` reconcile);
- `torchrun --nproc-per-node 4 -m kubetron_trainer --config <gpt-tiny config>`: the config JSON the
  operator renders for manifests/examples/gpt-tiny-cpu.yaml, with the metrics port, checkpoint
  path and step count changed for the test;
- Prometheus from Debian's package (hack/install-prometheus.sh), 1 s scrape interval.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.cluster import REPO_ROOT, Cluster, wait_until
from devtools.ports import free_port
from kubetron_api.parse import load_documents, parse_job
from kubetron_operator.plan import plan
from kubetron_operator.render import render
from tests.chart.helm import one, template
from tests.prometheus.scrape import pod_monitor_job, service_monitor_job

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

EXAMPLE = REPO_ROOT / "manifests" / "examples" / "gpt-tiny-cpu.yaml"
CRD = REPO_ROOT / "manifests" / "crds" / "kubetron.io_megatronjobs.yaml"
JOB = "gpt-tiny-cpu"
TRAIN_ITERS = 40
SAVE_INTERVAL = 10
WORLD = 4
# Series a CPU trainer must not export: there is no GPU memory, and no peak to take MFU against.
GPU_ONLY = ("kubetron_train_mfu_ratio", "kubetron_gpu_memory_")
RATE_WINDOW = "5m"  # stands in for Grafana's $__rate_interval


# --------------------------------------------------------------------------- helpers


def example_job(namespace: str, name: str = JOB) -> dict[str, Any]:
    ((_, obj),) = list(load_documents(EXAMPLE))
    obj = copy.deepcopy(obj)
    obj["metadata"].update(name=name, namespace=namespace)
    return dict(obj)


def rendered(namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer config, trainer pod template) as the operator renders the example."""
    obj = example_job(namespace)
    obj["metadata"]["uid"] = "prometheus-test"
    job = parse_job(obj, str(EXAMPLE))
    config_map, pytorchjob = render(job, plan(job))
    config = json.loads(config_map["data"]["config.json"])
    pod = pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    return config, pod


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises on an error status (bad PromQL)."""
        params = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def series(self, match: str) -> list[dict[str, str]]:
        params = urllib.parse.urlencode({"match[]": match})
        with urllib.request.urlopen(f"{self.url}/api/v1/series?{params}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return list(body["data"])

    def value(self, expr: str) -> float | None:
        """The single sample of `expr`, or None when it has no result yet."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])


class Processes:
    """Background processes with logs in one dir; all stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=self.logs,
            start_new_session=True,  # torchrun's workers go with it
        )

    def check(self, name: str) -> None:
        """Fail with the log's tail when `name` exited early."""
        code = self.procs[name].poll()
        if code is not None:
            raise AssertionError(f"{name} exited with {code}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 60) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self) -> None:
        """SIGTERM every process and its descendants, SIGKILL what is left after 20 s.

        torchrun starts its workers in sessions of their own, so killing its process group
        alone would orphan them; the descendants are collected before any signal is sent.
        """
        pids = {pid for proc in self.procs.values() for pid in descendants(proc.pid)}
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        while pids and time.monotonic() < deadline:
            pids = {pid for pid in pids if Path(f"/proc/{pid}").exists()}
            time.sleep(0.2)
        signal_all(pids, signal.SIGKILL)


def descendants(root: int) -> set[int]:
    """Every live process below `root`, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def prometheus_binary() -> str:
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "install-prometheus.sh")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"hack/install-prometheus.sh failed:\n{proc.stderr[-3000:]}"
    return proc.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    prometheus: Prometheus
    processes: Processes
    jobs_ns: str
    quota_ns: str
    operator_ns: str
    dashboard: dict[str, Any]


Ports = dict[str, int]


def _namespaces(cluster: Cluster) -> tuple[str, str, str]:
    """Fresh namespaces for the operator, the jobs and the quota that fails the operator's apply;
    the CRD installed."""
    suffix = uuid.uuid4().hex[:6]
    operator_ns, jobs_ns, quota_ns = (f"{p}-{suffix}" for p in ("kt-ops", "kt-jobs", "kt-quota"))
    for ns in (operator_ns, jobs_ns, quota_ns):
        cluster.kubectl("create", "namespace", ns)
    cluster.apply(CRD)
    cluster.kubectl("wait", "--for=condition=Established", "crd/megatronjobs.kubetron.io")
    # No ConfigMap may be created in quota_ns: the operator's apply of the trainer config fails.
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-configmaps", "namespace": quota_ns},
            "spec": {"hard": {"count/configmaps": "0"}},
        }
    )
    return operator_ns, jobs_ns, quota_ns


def _trainer_config(tmp: Path, jobs_ns: str, port: int) -> tuple[Path, dict[str, Any]]:
    """The config the operator renders, on a loopback port and a temp checkpoint dir; its pod."""
    config, pod = rendered(jobs_ns)
    config["metrics"]["port"] = port
    config["checkpoint"]["path"] = str(tmp / "checkpoints")
    config["checkpoint"]["saveInterval"] = SAVE_INTERVAL
    config["recipe"]["trainIters"] = TRAIN_ITERS
    config_path = tmp / "config.json"
    config_path.write_text(json.dumps(config, indent=2))
    return config_path, pod


def _start_prometheus(
    processes: Processes, binary: str, tmp: Path, objs: list[dict[str, Any]],
    pod: dict[str, Any], jobs_ns: str, ports: Ports,
) -> Prometheus:  # fmt: skip
    """Prometheus scraping the operator and the trainer through the chart's monitors."""
    prom_config = {
        "global": {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "evaluation_interval": "1s",
        },
        "scrape_configs": [
            service_monitor_job(
                one(objs, "ServiceMonitor"),
                f"127.0.0.1:{ports['metrics']}",
                one(objs, "Service"),
                pod_name="kubetron-operator-0",
            ),
            pod_monitor_job(
                one(objs, "PodMonitor"),
                f"127.0.0.1:{ports['trainer']}",
                pod,
                namespace=jobs_ns,
                pod_name=f"{JOB}-worker-0",
            ),
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(prom_config, sort_keys=False))
    processes.start(
        "prometheus",
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{ports['prom']}",
            "--storage.tsdb.retention.time=1h",
        ],
    )
    prom = Prometheus(f"http://127.0.0.1:{ports['prom']}")

    def prometheus_ready() -> bool:
        processes.check("prometheus")
        return http_ok(f"{prom.url}/-/ready")

    wait_until(prometheus_ready, timeout=60, what="Prometheus /-/ready")
    return prom


def _start_operator(
    processes: Processes, cluster: Cluster, namespaces: tuple[str, str, str], ports: Ports
) -> None:
    """The operator watching the jobs' and the quota's namespaces, leader election on."""
    operator_ns, jobs_ns, quota_ns = namespaces
    processes.start(
        "operator",
        [
            sys.executable, "-m", "kubetron_operator",
            f"--kubeconfig={cluster.kubeconfig}",
            f"--namespaces={jobs_ns},{quota_ns}",
            "--leader-elect", "--lease-name=kubetron-operator",
            f"--lease-namespace={operator_ns}", "--identity=kubetron-operator-0",
            f"--metrics-port={ports['metrics']}", f"--health-port={ports['health']}",
            "--bind-address=127.0.0.1", "--log-format=text", "--log-level=info",
            "--resync-period=5",
        ],
    )  # fmt: skip

    def operator_ready() -> bool:
        processes.check("operator")
        return http_ok(f"http://127.0.0.1:{ports['health']}/readyz")

    wait_until(operator_ready, timeout=90, what="operator /readyz")


def _start_trainer(processes: Processes, tmp: Path, config_path: Path, master_port: int) -> None:
    """The CPU trainer under torchrun, its metrics kept up after the last step."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    assert shutil.which(torchrun), f"{torchrun} missing"
    processes.start(
        "trainer",
        [
            torchrun, f"--nproc-per-node={WORLD}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={master_port}",
            "-m", "kubetron_trainer", "--config", str(config_path),
            "--device", "cpu", "--metrics-linger", "600",
        ],
        env={
            "KUBETRON_JOB_NAME": JOB,
            "PROMETHEUS_MULTIPROC_DIR": str(tmp / "trainer-metrics"),
            "OMP_NUM_THREADS": "1",
        },
    )  # fmt: skip


@pytest.fixture(scope="module")
def stack(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prom_bin = prometheus_binary()
    tmp = tmp_path_factory.mktemp("prometheus-stack")
    namespaces = _namespaces(cluster)
    operator_ns, jobs_ns, quota_ns = namespaces
    # The chart's monitors and dashboard, rendered for an operator in operator_ns.
    objs = template(
        namespace=operator_ns,
        sets={
            "metrics.serviceMonitor.enabled": "true",
            "metrics.podMonitor.enabled": "true",
            "dashboard.enabled": "true",
        },
    )
    dashboard = json.loads(one(objs, "ConfigMap")["data"]["kubetron.json"])
    ports = {name: free_port() for name in ("metrics", "health", "trainer", "master", "prom")}
    processes = Processes(tmp)
    try:
        config_path, pod = _trainer_config(tmp, jobs_ns, ports["trainer"])
        prom = _start_prometheus(processes, prom_bin, tmp, objs, pod, jobs_ns, ports)
        _start_operator(processes, cluster, namespaces, ports)
        bad = example_job(jobs_ns, "gpt-tiny-invalid")
        bad["spec"]["parallelism"] = {"tensor": 8}
        bad["spec"]["resources"]["gpusPerNode"] = 8
        cluster.apply([example_job(jobs_ns), bad, example_job(quota_ns)])
        _start_trainer(processes, tmp, config_path, ports["master"])
        yield Stack(prom, processes, jobs_ns, quota_ns, operator_ns, dashboard)
    finally:
        processes.stop_all()
        for ns in namespaces:
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def wait_value(stack: Stack, expr: str, ok: Any, what: str, timeout: float = 300) -> float:
    """Wait until `expr` has one sample whose value satisfies `ok`; fail early if a process died."""

    def probe() -> float | None:
        for name in ("prometheus", "operator", "trainer"):
            stack.processes.check(name)
        value = stack.prometheus.value(expr)
        return value if value is not None and ok(value) else None

    try:
        return float(wait_until(probe, timeout=timeout, what=what, interval=1.0))
    except Exception as err:
        logs = "\n".join(
            f"--- {n} ---\n{stack.processes.tail(n, 25)}" for n in ("operator", "trainer")
        )
        raise AssertionError(f"{err}\n{logs}") from err


@pytest.fixture(scope="module")
def trained(stack: Stack) -> Stack:
    """The trainer finished every step and Prometheus scraped the last one."""
    wait_value(
        stack,
        f'max(kubetron_train_step{{job="{JOB}"}})',
        lambda v: v >= TRAIN_ITERS,
        f"kubetron_train_step to reach {TRAIN_ITERS}",
        timeout=600,
    )
    return stack


# --------------------------------------------------------------------------- tests


def test_both_targets_are_up_with_the_monitors_job_labels(trained: Stack) -> None:
    prom = trained.prometheus
    assert prom.value('up{job="kubetron", endpoint="metrics"}') == 1  # ServiceMonitor jobLabel
    assert prom.value(f'up{{job="{JOB}", namespace="{trained.jobs_ns}"}}') == 1  # PodMonitor


def test_trainer_metrics_have_the_values_of_the_run(trained: Stack) -> None:
    prom = trained.prometheus
    sel = f'{{job="{JOB}", namespace="{trained.jobs_ns}", pod="{JOB}-worker-0"}}'
    config, _ = rendered(trained.jobs_ns)
    tokens_per_step = config["recipe"]["globalBatchSize"] * config["recipe"]["seqLength"]
    assert prom.value(f"kubetron_train_step{sel}") == TRAIN_ITERS
    # Ranks write their values independently of the step gauge (and the last checkpoint is
    # saved after the last step), so wait for the totals instead of racing the scrape.
    for expr, want in (
        (f"kubetron_train_tokens_total{sel}", TRAIN_ITERS * tokens_per_step),
        (f"kubetron_train_step_duration_seconds_count{sel}", TRAIN_ITERS),
        (f"kubetron_checkpoint_save_duration_seconds_count{sel}", TRAIN_ITERS // SAVE_INTERVAL),
    ):
        got = wait_value(trained, expr, lambda v, w=want: v >= w, f"{expr} >= {want}", 60)
        assert got == want, f"{expr} = {got}, expected {want}"
    loss = prom.value(f"kubetron_train_loss{sel}")
    assert loss is not None and 0 < loss < math.log(config["model"]["vocabSize"]) + 1
    for name in (
        "kubetron_train_tokens_per_second",
        "kubetron_train_model_tflops_per_gpu",
        "kubetron_train_grad_norm",
        "kubetron_train_learning_rate",
        "kubetron_train_step_duration_seconds_sum",
        "kubetron_data_wait_seconds_count",
    ):
        value = prom.value(f"{name}{sel}")
        assert value is not None and math.isfinite(value) and value > 0, f"{name} = {value}"
    # honorLabels: the trainer's own `job` label stays `job`, not `exported_job`.
    assert not prom.query(f'{{__name__=~"kubetron_.*", exported_job="{JOB}"}}')
    for prefix in GPU_ONLY:  # a CPU run has neither; exporting them would be made up
        assert not prom.query(f'{{__name__=~"{prefix}.*", job="{JOB}"}}'), prefix


def test_operator_metrics_have_values(trained: Stack) -> None:
    prom, jobs_ns, quota_ns = trained.prometheus, trained.jobs_ns, trained.quota_ns
    op = '{job="kubetron"}'
    assert prom.value(f"kubetron_operator_leader{op}") == 1
    reconciled = wait_value(
        trained,
        'kubetron_operator_reconciles_total{job="kubetron", result="success"}',
        lambda v: v >= 1,
        "a successful reconcile",
    )
    assert reconciled >= 1
    wait_value(
        trained,
        'kubetron_operator_reconciles_total{job="kubetron", result="invalid"}',
        lambda v: v >= 1,
        "the invalid job's reconcile",
    )
    wait_value(
        trained,
        'kubetron_operator_reconciles_total{job="kubetron", result="error"}',
        lambda v: v >= 1,
        f"a failed reconcile in {quota_ns} (ResourceQuota forbids ConfigMaps)",
    )
    wait_value(
        trained,
        'sum(kubetron_operator_api_errors_total{job="kubetron"})',
        lambda v: v >= 1,
        "a failed API call",
    )
    count = prom.value(f"kubetron_operator_reconcile_duration_seconds_count{op}")
    assert count is not None and count >= 3
    # honorLabels keeps the MegatronJob's namespace (not the operator pod's).
    jobs = wait_value(
        trained,
        f'sum(kubetron_megatronjobs{{job="kubetron", namespace="{jobs_ns}"}})',
        lambda v: v >= 2,
        f"both MegatronJobs of {jobs_ns} counted by phase",
    )
    assert jobs == 2
    assert not prom.query('{__name__=~"kubetron_.*", exported_namespace!=""}')
    assert not prom.query('{__name__=~"kubetron_.*", exported_job!=""}')


def expand(expr: str) -> str:
    """Grafana's variables, as the dashboard's defaults (All) expand them."""
    return (
        expr.replace("$__rate_interval", RATE_WINDOW)
        .replace("$namespace", ".*")
        .replace("$job", ".*")
    )


def test_every_dashboard_query_returns_data(trained: Stack) -> None:
    # Wait for the operator-side series the dashboard shows, so the check below is not a race.
    wait_value(
        trained,
        'sum(kubetron_operator_api_errors_total{job="kubetron"})',
        lambda v: v >= 1,
        "a failed API call",
    )
    prom = trained.prometheus
    failures = []
    exprs = [
        (p["title"], t["expr"]) for p in trained.dashboard["panels"] for t in p.get("targets", [])
    ]
    assert len(exprs) >= 12
    for title, expr in exprs:
        result = prom.query(expand(expr))  # raises on invalid PromQL
        if any(prefix in expr for prefix in GPU_ONLY):
            if result:
                failures.append(f"{title}: GPU-only query has data on a CPU run: {expr}")
            continue
        finite = [r for r in result if math.isfinite(float(r["value"][1]))]
        if not finite:
            failures.append(f"{title}: no finite sample for {expand(expr)} -> {result}")
    assert not failures, "\n".join(failures)


def test_dashboard_variables_find_the_job(trained: Stack) -> None:
    for var in trained.dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = expand(var["query"]["query"])
        assert query.startswith("label_values(") and query.endswith(")"), query
        match, label = query[len("label_values(") : -1].rsplit(",", 1)
        values = {s.get(label.strip()) for s in trained.prometheus.series(match.strip())}
        wanted = JOB if label.strip() == "job" else trained.jobs_ns
        assert wanted in values, f"{var['name']}: {values}"
