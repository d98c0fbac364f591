"""A real, throw-away Kubernetes control plane for kubetron's cluster tests.

kubetron's operator turns MegatronJobs into Kubeflow PyTorchJobs, so its tests need a real API
server, garbage collection, a scheduler and a training-operator -- but no GPUs, kubelets or Docker.
This module starts, from the binaries that `make tools` (hack/build-tools.sh) builds into
$KUBETRON_CACHE/bin/<kubernetes version>/:

- etcd and kube-apiserver (RBAC, client-certificate auth, certificates made with `openssl`),
- kube-controller-manager and kube-scheduler,
- kwok, which fakes N GPU nodes (`nvidia.com/gpu: 8`) and the lifecycle of the pods bound to
  them (see kwok_stages.yaml: annotations pick when a pod ends and with which exit code),
- the Kubeflow training-operator (PyTorchJob only), outside the cluster,
- on demand (Cluster.start_kueue), Kueue with its PyTorchJob integration and topology-aware
  scheduling, its webhooks registered against the API server by URL on loopback,
- optionally (ClusterConfig.real_node) a real worker node that runs pods: containerd, kubelet,
  kube-proxy and CoreDNS on a bridge of its own (tests/cluster/node.py); the API server then
  binds the bridge address so that pods reach it through the `kubernetes` Service.

Every process listens on free loopback ports and writes only under one temp dir (plus, for the
training-operator, a `tls.crt` it insists on in /tmp/k8s-webhook-server/serving-certs, and for
Kueue a `tls.crt`/`tls.key` pair in /etc/kueue/metrics/certs, created only when missing and
removed again on stop). Startup polls readiness; it never sleeps blindly.

Command line (the Makefile's `cluster-up` / `cluster-down`):
    python -m tests.cluster.harness up     # start detached, print the kubeconfig path
    python -m tests.cluster.harness down   # stop what `up` started
    python -m tests.cluster.harness status
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import fcntl
import functools
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetron_operator.kueue import QUEUE_LABEL
from tests.cluster import node as realnode
from tests.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "hack" / "versions.env"
# kubetron's own CRDs, installed before the controller-manager starts (see ClusterConfig.crds).
KUBETRON_CRDS = sorted((REPO_ROOT / "manifests" / "crds").glob("*.yaml"))
KWOK_STAGES = Path(__file__).with_name("kwok_stages.yaml")

REQUIRED_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "training-operator.v1",
)
PYTORCHJOB_CRD = "crds/kubeflow.org_pytorchjobs.yaml"
# Kueue (built by `make tools` too, started only by the tests that need it).
KUEUE_BINARY = "kueue"
KUEUE_CRDS = "crds/kueue"
KUEUE_WEBHOOKS = "crds/kueue-webhooks.yaml"
KUEUE_NAMESPACE = "kueue-system"
# Of Kueue's webhooks only these are registered: its own API group and PyTorchJobs carrying the
# queue label (other tests' PyTorchJobs never reach Kueue, and nothing calls a stopped Kueue).
KUEUE_API_GROUP = "kueue.x-k8s.io"
KUEUE_JOB_RESOURCE = "pytorchjobs"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"

# What the fake GPU nodes look like; tests put these on pods to land there.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
FAKE_GPU_LABEL = "kubetron.io/fake-gpu"
FAKE_NODE_SELECTOR = {FAKE_GPU_LABEL: "true"}
FAKE_NODE_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
FAKE_NODE_TOLERATIONS = [{**FAKE_NODE_TAINT, "operator": "Equal"}]
# Pod annotations read by kwok_stages.yaml.
COMPLETE_AFTER_ANNOTATION = "kwok.kubetron.io/complete-after"
EXIT_CODE_ANNOTATION = "kwok.kubetron.io/exit-code"

TRAINING_OPERATOR_NAMESPACE = "kubeflow"
TRAINING_OPERATOR_SECRET = "training-operator-webhook-cert"
# Hard-coded in the training-operator (pkg/cert); it only checks that tls.crt exists there.
TRAINING_OPERATOR_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
# Hard-coded in Kueue's main.go: without internal cert management it insists on a metrics
# certificate there (even with metrics off).
KUEUE_METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")

STOP_ORDER = (
    "kueue",
    "training-operator",
    "kwok",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
)


class ClusterError(RuntimeError):
    """The control plane failed to start, stopped unexpectedly, or a wait timed out."""


# --------------------------------------------------------------------------- locations


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse hack/versions.env (KEY=VALUE lines, `#` comments) -- the single pin file."""
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip().strip("'\"")
    return versions


def cache_dir() -> Path:
    """$KUBETRON_CACHE, default ~/.cache/kubetron (same rule as hack/tools-env.sh)."""
    return Path(os.environ.get("KUBETRON_CACHE") or Path.home() / ".cache" / "kubetron")


def default_bin_dir() -> Path:
    """Where `make tools` puts the binaries pinned in hack/versions.env."""
    return cache_dir() / "bin" / read_versions()["KUBERNETES_VERSION"]


def missing_tools(bin_dir: Path) -> list[str]:
    """Binaries (and the PyTorchJob CRD) that `make tools` should have built but did not."""
    wanted = [*REQUIRED_BINARIES, PYTORCHJOB_CRD]
    return [name for name in wanted if not (bin_dir / name).is_file()]


def containerd_root() -> Path:
    """The real node's containerd root: persistent, so imported images survive clusters."""
    return cache_dir() / "containerd"


def state_file() -> Path:
    """Where `up` records what it started, for `down`."""
    return cache_dir() / "cluster" / "state.json"


# --------------------------------------------------------------------------- waiting


def wait_until[T](
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    check: Callable[[], None] | None = None,
) -> T:
    """Poll `predicate` until it returns a truthy value (returned) or `timeout` seconds pass.

    Exceptions from the predicate count as "not yet"; the last one is reported on timeout.
    `check` runs before each poll and may raise to abort early (e.g. a process died).
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        if check is not None:
            check()
        try:
            result = predicate()
            if result:
                return result
        except Exception as err:  # the thing polled is not up yet
            last_error = err
        if time.monotonic() >= deadline:
            detail = f": last error: {last_error!r}" if last_error else ""
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def http_get(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> str:
    """GET `url`; return the body on HTTP 200, raise otherwise."""
    with urllib.request.urlopen(url, context=context, timeout=timeout) as resp:
        return str(resp.read().decode())


def healthz_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    """True when a health endpoint answers 200 "ok"."""
    return http_get(url, context) == "ok"


def insecure_tls() -> ssl.SSLContext:
    """For health endpoints served with self-signed certificates."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def crd_established(crd: dict[str, Any] | None) -> bool:
    """True when a CustomResourceDefinition (as a dict) has condition Established=True."""
    conditions = (crd or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    """Paths of the certificates and keys made for one cluster."""

    dir: Path

    def __getattr__(self, name: str) -> Path:  # ca_crt -> <dir>/ca.crt
        stem, _, ext = name.rpartition("_")
        return self.dir / f"{stem.replace('_', '-')}.{ext}"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _new_ca(pki: Pki) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "30", "-subj", "/CN=kubetron-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=pki.dir,
    )  # fmt: skip


def _new_leaf(pki: Pki, name: str, subject: str, usage: str, sans: str = "") -> None:
    """A CA-signed EC certificate <name>.crt / <name>.key."""
    ext = [f"extendedKeyUsage={usage}", "keyUsage=critical,digitalSignature,keyEncipherment"]
    if sans:
        ext.append(f"subjectAltName={sans}")
    (pki.dir / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki.dir,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "30",
        "-extfile", f"{name}.ext", "-out", f"{name}.crt",
        cwd=pki.dir,
    )  # fmt: skip


def make_pki(directory: Path) -> Pki:
    """CA, API server serving cert, service-account key pair, admin (system:masters) client."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    _new_ca(pki)
    apiserver_sans = ",".join(
        ["IP:127.0.0.1", f"IP:{realnode.NODE_IP}", f"IP:{realnode.KUBERNETES_SERVICE_IP}"]
        + ["DNS:localhost", "DNS:kubernetes"]
        + [f"DNS:kubernetes.default{s}" for s in ("", ".svc", ".svc.cluster.local")]
    )
    _new_leaf(pki, "apiserver", "/CN=kube-apiserver", "serverAuth", apiserver_sans)
    _new_leaf(pki, "admin", "/O=system:masters/CN=kubetron-admin", "clientAuth")
    # The API server's identity towards kubelets (logs, exec, port-forward).
    _new_leaf(pki, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet",
              "clientAuth")  # fmt: skip
    webhook_sans = "DNS:training-operator.kubeflow.svc,DNS:localhost,IP:127.0.0.1"
    _new_leaf(pki, "webhook", "/CN=training-operator", "serverAuth", webhook_sans)
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key",
        cwd=directory,
    )  # fmt: skip
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)
    return pki


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, pki: Pki) -> None:
    """A self-contained admin kubeconfig (certificates embedded)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetron-test",
                "cluster": {"server": server, "certificate-authority-data": _b64(pki.ca_crt)},
            }
        ],
        "users": [
            {
                "name": "kubetron-admin",
                "user": {
                    "client-certificate-data": _b64(pki.admin_crt),
                    "client-key-data": _b64(pki.admin_key),
                },
            }
        ],
        "contexts": [
            {
                "name": "kubetron-test",
                "context": {"cluster": "kubetron-test", "user": "kubetron-admin"},
            }
        ],
        "current-context": "kubetron-test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child when the Python process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def proc_start_time(pid: int) -> str | None:
    """Start time of `pid` in clock ticks (field 22 of /proc/<pid>/stat); None if gone/zombie.

    With the pid it identifies a process across `up` and `down`, so `down` never signals a
    process that merely reused a pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in ("Z", "X") else fields[19]


@dataclass
class Component:
    """One started process: argv, log file, and its pid/start time for a later `down`."""

    name: str
    argv: list[str]
    log: Path
    pid: int = 0
    start_time: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def start(self, env: dict[str, str] | None, detached: bool) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=None if detached else _die_with_parent,
            )
        self.pid = self.proc.pid
        self.start_time = proc_start_time(self.pid)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.start_time is not None and proc_start_time(self.pid) == self.start_time

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. Only ever signals our own process."""
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        with contextlib.suppress(ClusterError):
            wait_until(lambda: not self.alive(), timeout=grace, what=f"{self.name} to exit")
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            wait_until(lambda: not self.alive(), timeout=5, what=f"{self.name} to die")
        if self.proc is not None:
            self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def to_state(self) -> dict[str, Any]:
        return {"name": self.name, "argv": self.argv, "log": str(self.log), "pid": self.pid,
                "start_time": self.start_time}  # fmt: skip

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Component:
        return cls(data["name"], data["argv"], Path(data["log"]), data["pid"], data["start_time"])


# --------------------------------------------------------------------------- the cluster


@dataclass
class ClusterConfig:
    """Knobs of a test cluster; the defaults are what the `cluster` fixture uses."""

    nodes: int = 2
    gpus_per_node: int = 8
    gpu_product: str = GPU_PRODUCT
    training_operator: bool = True
    startup_timeout: float = 90.0
    # A real worker node (tests/cluster/node.py): needs root, `make tools` and `make images`.
    real_node: bool = False
    # CRD files installed before kube-controller-manager starts, so that its garbage collector
    # watches them from the start (it rediscovers API resources only every 30 s).
    crds: list[str] = field(default_factory=list)


@dataclass
class Ports:
    """Loopback ports of one cluster, picked free at start."""

    etcd: int = field(default_factory=free_port)
    etcd_peer: int = field(default_factory=free_port)
    apiserver: int = field(default_factory=free_port)
    controller_manager: int = field(default_factory=free_port)
    scheduler: int = field(default_factory=free_port)
    kwok: int = field(default_factory=free_port)
    operator_probe: int = field(default_factory=free_port)
    operator_webhook: int = field(default_factory=free_port)
    kueue_probe: int = field(default_factory=free_port)
    kueue_webhook: int = field(default_factory=free_port)
    node: realnode.NodePorts = field(default_factory=realnode.NodePorts.pick)


class Cluster:
    """A running control plane. Create with `Cluster.start()`; stop with `.stop()`.

    Public API (what tests use):
      kubeconfig: Path          admin kubeconfig (system:masters), self-contained
      server: str               https://127.0.0.1:<port>
      bin_dir: Path             the binaries (kubectl, helm, ...) and crds/
      workdir: Path             the temp dir holding everything (logs under workdir/logs)
      kubectl(*args, ...)       run kubectl against the cluster -> CompletedProcess[str]
      apply(manifest)           server-side apply of YAML text / dict / list / Path
      get(kind, name, ns)       one object as a dict (kubectl get -o json)
      api_client()              kubernetes.client.ApiClient for the admin kubeconfig
      wait_for(pred, ...)       wait_until() that also fails fast when a component died
      start_training_operator() / stop_training_operator()
      start_kueue() / stop_kueue()  Kueue (PyTorchJob integration, topology-aware scheduling)
      logs(name) / tails()      component logs
    """

    def __init__(self, workdir: Path, bin_dir: Path, config: ClusterConfig, ports: Ports):
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.config = config
        self.ports = ports
        self.pki = Pki(workdir / "pki")
        self.kubeconfig = workdir / "kubeconfig"
        self.cache = cache_dir()
        # With a real node the API server binds the bridge address, so pods can reach it.
        self.address = realnode.NODE_IP if config.real_node else "127.0.0.1"
        self.server = f"https://{self.address}:{ports.apiserver}"
        self.node = (
            realnode.RealNode(self, ports.node, containerd_root()) if config.real_node else None
        )
        self.components: dict[str, Component] = {}
        self.created_outside: list[str] = []  # paths outside workdir we made (removed on stop)
        self.detached = False
        self.timings: dict[str, float] = {}  # startup phase -> seconds, for reports
        self.state_path: Path | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(
        cls,
        config: ClusterConfig | None = None,
        bin_dir: Path | None = None,
        detached: bool = False,
        state_path: Path | None = None,
    ) -> Cluster:
        """Start everything and wait until it is ready; on failure print logs, clean up, raise.

        With `state_path`, the state (pids, temp dir) is rewritten there after every process
        start, so `down` can clean up even if this Python process is killed mid-start.
        """
        config = config or ClusterConfig()
        bin_dir = bin_dir or default_bin_dir()
        missing = missing_tools(bin_dir)
        if missing:
            raise ClusterError(f"missing in {bin_dir}: {', '.join(missing)}; run `make tools`")
        if config.real_node:
            missing = realnode.missing_prerequisites(bin_dir, cache_dir())
            if missing:
                raise ClusterError(f"the real node needs: {'; '.join(missing)}")
            busy = realnode.node_owner()
            if busy is not None:
                raise ClusterError(
                    f"a real node is already running (cluster {busy}); one node per machine: "
                    "`make cluster-down` stops the cluster of `make demo`/`make cluster-up`"
                )
        workdir = Path(tempfile.mkdtemp(prefix="kubetron-cluster-"))
        cluster = cls(workdir, bin_dir, config, Ports())
        cluster.detached = detached
        cluster.state_path = state_path
        try:
            cluster._boot()
        except BaseException:
            sys.stderr.write(cluster.tails())
            cluster.stop()
            raise
        return cluster

    def _boot(self) -> None:
        (self.workdir / "logs").mkdir()
        if self.node is not None:
            with self._phase("network"):
                realnode.claim_node(self.workdir)
                realnode.network_up()
        with self._phase("pki"):
            make_pki(self.pki.dir)
            write_kubeconfig(self.kubeconfig, self.server, self.pki)
        with self._phase("etcd"):
            self._start_etcd()
        with self._phase("kube-apiserver"):
            self._start_apiserver()
        # Launch everything, then wait: the components start up concurrently. Only the
        # controller-manager waits for the CRDs, so its garbage collector sees them at once.
        with self._phase("launch"):
            self._launch("kube-scheduler", self._scheduler_argv())
            self._launch("kwok", self._kwok_argv())
            crds = self._apply_crds([self.bin_dir / PYTORCHJOB_CRD, *map(Path, self.config.crds)])
            self.apply(self._node_manifests())
        if self.node is not None:
            with self._phase("node"):
                self.node.launch()
        with self._phase("crds"):
            self._wait_crds(crds)
        with self._phase("launch-controllers"):
            self._launch("kube-controller-manager", self._controller_manager_argv())
            if self.config.training_operator:
                self._launch_training_operator()
        with self._phase("controllers"):
            self._wait_controllers_ready()
        if self.config.training_operator:
            with self._phase("training-operator"):
                self._wait_training_operator()
        with self._phase("nodes"):
            self._wait_nodes_ready()
        if self.node is not None:
            with self._phase("real-node"):
                self.node.wait_ready(self.config.startup_timeout)

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - started, 2)

    def stop(self) -> None:
        """Stop every process started (reverse order), then remove the temp dir."""
        if self.config.real_node:
            realnode.teardown(self.workdir, containerd_root(), self._stop_component)
        for name in STOP_ORDER:
            self._stop_component(name)
        for path in reversed(self.created_outside):
            with contextlib.suppress(OSError):
                p = Path(path)
                p.rmdir() if p.is_dir() else p.unlink()
        self.created_outside.clear()
        if self.config.real_node:
            realnode.network_down()
            realnode.release_node(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_component(self, name: str) -> None:
        component = self.components.get(name)
        if component is not None:
            component.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ processes

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
        env.update({"KUBECONFIG": str(self.kubeconfig), "HOME": str(self.workdir)})
        env.update(extra or {})
        return env

    def _launch(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        component = Component(name, argv, self.workdir / "logs" / f"{name}.log")
        component.start(env or self._env(), self.detached)
        self.components[name] = component
        self.save_state()

    def save_state(self) -> None:
        """Write to_state() to state_path (if set), atomically."""
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_state(), indent=2))
        tmp.replace(self.state_path)

    def check_alive(self) -> None:
        """Raise ClusterError if any started component has exited."""
        for component in self.components.values():
            if not component.alive():
                raise ClusterError(f"{component.name} exited; log tail:\n{component.tail()}")

    def wait_for[T](
        self, predicate: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.2
    ) -> T:
        """wait_until() that also aborts as soon as a control-plane component dies."""
        return wait_until(
            predicate, timeout=timeout, what=what, interval=interval, check=self.check_alive
        )

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    # ------------------------------------------------------------------ etcd + apiserver

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.ports.etcd}"
        peer = f"http://127.0.0.1:{self.ports.etcd_peer}"
        argv = [
            self._bin("etcd"), "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}", "--unsafe-no-fsync=true", "--log-level=warn",
        ]  # fmt: skip
        self._launch("etcd", argv)
        self.wait_for(
            lambda: json.loads(http_get(f"{client}/health")).get("health") == "true",
            timeout=self.config.startup_timeout,
            what="etcd /health",
        )

    def _apiserver_argv(self) -> list[str]:
        pki = self.pki
        return [
            self._bin("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.ports.etcd}",
            f"--secure-port={self.ports.apiserver}", f"--bind-address={self.address}",
            f"--advertise-address={self.address}",
            # With a real node the `kubernetes` Service points at the bridge address (pods use
            # it); without one there is no address pods could reach, so no endpoints at all.
            f"--endpoint-reconciler-type={'lease' if self.node else 'none'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={pki.apiserver_kubelet_client_crt}",
            f"--kubelet-client-key={pki.apiserver_kubelet_client_key}",
            f"--kubelet-certificate-authority={pki.ca_crt}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.apiserver_crt}", f"--tls-private-key-file={pki.apiserver_key}",
            f"--client-ca-file={pki.ca_crt}", "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={realnode.SERVICE_CIDR}", "--allow-privileged=true",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--profiling=false",
        ]  # fmt: skip

    def admin_tls(self) -> ssl.SSLContext:
        """TLS context that trusts the cluster CA and presents the admin client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        ctx.load_cert_chain(str(self.pki.admin_crt), str(self.pki.admin_key))
        return ctx

    def _start_apiserver(self) -> None:
        self._launch("kube-apiserver", self._apiserver_argv())
        tls = self.admin_tls()
        self.wait_for(
            lambda: http_get(f"{self.server}/readyz", tls) == "ok",
            timeout=self.config.startup_timeout,
            what="kube-apiserver /readyz",
        )

    # ------------------------------------------------------------------ controllers

    def _delegated_auth(self) -> list[str]:
        kc = str(self.kubeconfig)
        return [
            f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}", "--leader-elect=false", "--bind-address=127.0.0.1",
        ]  # fmt: skip

    def _controller_manager_argv(self) -> list[str]:
        pki = self.pki
        return [
            self._bin("kube-controller-manager"), *self._delegated_auth(),
            f"--secure-port={self.ports.controller_manager}",
            f"--cert-dir={self.workdir / 'kcm-certs'}", "--controllers=*",
            f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca_crt}",
            f"--cluster-signing-cert-file={pki.ca_crt}", f"--cluster-signing-key-file={pki.ca_key}",
            "--use-service-account-credentials=false",
            f"--service-cluster-ip-range={realnode.SERVICE_CIDR}",
        ]  # fmt: skip

    def _scheduler_argv(self) -> list[str]:
        return [
            self._bin("kube-scheduler"), *self._delegated_auth(),
            f"--secure-port={self.ports.scheduler}", f"--cert-dir={self.workdir / 'sched-certs'}",
        ]  # fmt: skip

    def _kwok_argv(self) -> list[str]:
        return [
            self._bin("kwok"), f"--kubeconfig={self.kubeconfig}", f"--config={KWOK_STAGES}",
            f"--manage-nodes-with-label-selector={FAKE_GPU_LABEL}=true",
            f"--server-address=127.0.0.1:{self.ports.kwok}", "--node-ip=10.1.0.1",
            "--cidr=10.244.0.1/16",
        ]  # fmt: skip

    def _wait_controllers_ready(self) -> None:
        checks = {
            "kube-controller-manager": f"https://127.0.0.1:{self.ports.controller_manager}/healthz",
            "kube-scheduler": f"https://127.0.0.1:{self.ports.scheduler}/healthz",
            "kwok": f"http://127.0.0.1:{self.ports.kwok}/healthz",
        }
        tls = insecure_tls()
        for name, url in checks.items():
            context = tls if url.startswith("https") else None
            self.wait_for(
                functools.partial(healthz_ok, url, context),
                timeout=self.config.startup_timeout,
                what=f"{name} {url}",
            )
        # Pods need the `default` ServiceAccount (serviceaccount controller + admission plugin).
        self.wait_for(
            lambda: self.api_get("/api/v1/namespaces/default/serviceaccounts/default"),
            timeout=self.config.startup_timeout,
            what="the default ServiceAccount",
        )

    # ------------------------------------------------------------------ fake GPU nodes

    def node_names(self) -> list[str]:
        return [f"kwok-gpu-{i}" for i in range(self.config.nodes)]

    def _node_manifests(self) -> list[dict[str, Any]]:
        resources = {
            "cpu": "128",
            "memory": "2Ti",
            "pods": "110",
            "ephemeral-storage": "10Ti",
            GPU_RESOURCE: str(self.config.gpus_per_node),
        }
        return [
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {
                        "kwok.x-k8s.io/node": "fake",
                        "node.alpha.kubernetes.io/ttl": "0",
                    },
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        FAKE_GPU_LABEL: "true",
                        "nvidia.com/gpu.product": self.config.gpu_product,
                        "nvidia.com/gpu.count": str(self.config.gpus_per_node),
                    },
                },
                "spec": {"taints": [FAKE_NODE_TAINT]},
                "status": {"allocatable": resources, "capacity": resources},
            }
            for name in self.node_names()
        ]

    def _nodes_ready(self) -> bool:
        nodes = (self.api_get("/api/v1/nodes") or {}).get("items", [])
        ready = 0
        for node in nodes:
            conditions = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
            taints = {t["key"] for t in node["spec"].get("taints", [])}
            if conditions.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints:
                ready += 1
        return ready >= self.config.nodes

    def _wait_nodes_ready(self) -> None:
        self.wait_for(
            self._nodes_ready,
            timeout=self.config.startup_timeout,
            what=f"{self.config.nodes} fake GPU nodes Ready without the not-ready taint",
            interval=0.3,
        )

    # ------------------------------------------------------------------ training-operator

    def _prepare_training_operator(self) -> None:
        self.apply(
            [
                {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": TRAINING_OPERATOR_NAMESPACE}},
                {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                 "metadata": {"name": TRAINING_OPERATOR_SECRET,
                              "namespace": TRAINING_OPERATOR_NAMESPACE}},
            ]
        )  # fmt: skip
        if not crd_established(self.api_get(f"{CRD_PATH}/pytorchjobs.kubeflow.org")):
            self.install_crds([self.bin_dir / PYTORCHJOB_CRD])
        # The webhook server reads $TMPDIR/k8s-webhook-server/serving-certs (TMPDIR=workdir).
        certs = self.workdir / "k8s-webhook-server" / "serving-certs"
        certs.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.pki.webhook_crt, certs / "tls.crt")
        shutil.copy(self.pki.webhook_key, certs / "tls.key")
        self._ensure_fixed_cert_dir()

    def _ensure_fixed_cert_dir(
        self, directory: Path = TRAINING_OPERATOR_CERT_DIR, files: tuple[str, ...] = ("tls.crt",)
    ) -> None:
        """Certificates a component reads from a hard-coded path (no flag): create the
        directory and files only where missing, and remember them for removal on stop."""
        for parent in reversed((directory / "x").parents):
            if not parent.exists():
                parent.mkdir()
                self.created_outside.append(str(parent))
        for name in files:
            target = directory / name
            if not target.exists():
                shutil.copy(self.pki.webhook_crt if name.endswith(".crt") else
                            self.pki.webhook_key, target)  # fmt: skip
                self.created_outside.append(str(target))
        self.save_state()

    def install_crds(self, paths: Iterable[Path]) -> None:
        """Server-side apply CRD files and wait until every CRD in them is Established.

        The garbage collector only learns about CRDs installed after kube-controller-manager
        started at its next 30 s resync; prefer ClusterConfig.crds for CRDs whose objects own
        others.
        """
        self._wait_crds(self._apply_crds(paths))

    def _apply_crds(self, paths: Iterable[Path]) -> list[str]:
        """Server-side apply CRD files; return the names of the CRDs in them."""
        files = list(paths)
        names = [
            doc["metadata"]["name"]
            for path in files
            for doc in yaml.safe_load_all(path.read_text())
            if doc and doc.get("kind") == "CustomResourceDefinition"
        ]
        args = [arg for path in files for arg in ("-f", str(path))]
        self.kubectl("apply", "--server-side", "--force-conflicts", *args)
        return names

    def _wait_crds(self, names: list[str]) -> None:
        self.wait_for(
            lambda: all(crd_established(self.api_get(f"{CRD_PATH}/{name}")) for name in names),
            timeout=60,
            what=f"CRDs {', '.join(names)} to be Established",
        )

    def start_training_operator(self) -> None:
        """Start the training-operator (PyTorchJob controller only) and wait for /readyz."""
        self._launch_training_operator()
        self._wait_training_operator()

    def _launch_training_operator(self) -> None:
        if "training-operator" in self.components and self.components["training-operator"].alive():
            return
        self._prepare_training_operator()
        argv = [
            self._bin("training-operator.v1"), "--enable-scheme=pytorchjob",
            "--metrics-bind-address=0",
            f"--health-probe-bind-address=127.0.0.1:{self.ports.operator_probe}",
            f"--webhook-server-port={self.ports.operator_webhook}", "--zap-log-level=info",
        ]  # fmt: skip
        if self.node is not None:
            argv += self.node.init_container_flags()
        self._launch("training-operator", argv, self._env({"TMPDIR": str(self.workdir)}))

    def _wait_training_operator(self) -> None:
        self.wait_for(
            lambda: http_get(f"http://127.0.0.1:{self.ports.operator_probe}/readyz") == "ok",
            timeout=self.config.startup_timeout,
            what="training-operator /readyz",
            interval=0.3,
        )

    def stop_training_operator(self) -> None:
        component = self.components.pop("training-operator", None)
        if component is not None:
            component.stop()

    # ------------------------------------------------------------------ Kueue

    def start_kueue(self) -> None:
        """Install Kueue's CRDs, start its manager (PyTorchJob integration; topology-aware
        scheduling is on by default in v0.17) and register its webhooks; wait until it serves
        them. Idempotent."""
        if "kueue" in self.components and self.components["kueue"].alive():
            return
        binary = self.bin_dir / KUEUE_BINARY
        if not binary.is_file():
            raise ClusterError(f"missing in {self.bin_dir}: {KUEUE_BINARY}; run `make tools`")
        self.install_crds(sorted((self.bin_dir / KUEUE_CRDS).glob("*.yaml")))
        if self.get("namespace", KUEUE_NAMESPACE) is None:
            self.kubectl("create", "namespace", KUEUE_NAMESPACE)
        certs = self.workdir / "kueue-certs"  # not the training-operator's fixed /tmp dir
        certs.mkdir(exist_ok=True)
        shutil.copy(self.pki.webhook_crt, certs / "tls.crt")
        shutil.copy(self.pki.webhook_key, certs / "tls.key")
        self._ensure_fixed_cert_dir(KUEUE_METRICS_CERT_DIR, ("tls.crt", "tls.key"))
        config = self.workdir / "kueue-config.yaml"
        config.write_text(yaml.safe_dump(self._kueue_config(certs)))
        self._launch("kueue", [str(binary), f"--config={config}", "--zap-log-level=2"])
        self.wait_for(
            lambda: http_get(f"http://127.0.0.1:{self.ports.kueue_probe}/readyz") == "ok",
            timeout=self.config.startup_timeout,
            what="kueue /readyz",
            interval=0.3,
        )
        self.apply(self._kueue_webhook_configs())

    def _kueue_config(self, cert_dir: Path) -> dict[str, Any]:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": KUEUE_NAMESPACE,
            "manageJobsWithoutQueueName": False,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports.kueue_probe}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": self.ports.kueue_webhook,
                        "certDir": str(cert_dir)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["kubeflow.org/pytorchjob"]},
            # no aggregated visibility API server (another port, and nothing here uses it)
            "featureGates": {"VisibilityOnDemand": False},
        }  # fmt: skip

    def _kueue_webhook_configs(self) -> list[dict[str, Any]]:
        """Kueue's own webhook configurations, pointed at the manager on loopback by URL."""
        docs = yaml.safe_load_all((self.bin_dir / KUEUE_WEBHOOKS).read_text())
        base = f"https://127.0.0.1:{self.ports.kueue_webhook}"
        configs = []
        for doc in docs:
            if not doc:
                continue
            kept = []
            for hook in doc.get("webhooks", []):
                rules = hook.get("rules", [])
                ours = any(KUEUE_API_GROUP in r.get("apiGroups", []) for r in rules)
                job = any(KUEUE_JOB_RESOURCE in r.get("resources", []) for r in rules)
                if not (ours or job):
                    continue
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": base + path, "caBundle": _b64(self.pki.ca_crt)}
                if job:
                    hook["objectSelector"] = {
                        "matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]
                    }
                kept.append(hook)
            doc["metadata"] = {"name": f"kueue-{doc['metadata']['name']}"}
            doc["webhooks"] = kept
            configs.append(doc)
        return configs

    def stop_kueue(self) -> None:
        """Unregister Kueue's webhooks, then stop it (its CRDs and objects stay)."""
        for doc in self._kueue_webhook_configs():
            kind = doc["kind"].lower()
            self.kubectl("delete", kind, doc["metadata"]["name"], "--ignore-not-found")
        component = self.components.pop("kueue", None)
        if component is not None:
            component.stop()

    # ------------------------------------------------------------------ clients

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster. With check=True a non-zero exit raises ClusterError."""
        cache = f"--cache-dir={self.workdir / 'kubectl-cache'}"  # not ~/.kube/cache
        cmd = [self._bin("kubectl"), f"--kubeconfig={self.kubeconfig}", cache, *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            joined = " ".join(args)
            raise ClusterError(f"kubectl {joined} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def apply(self, manifest: str | Path | dict[str, Any] | Iterable[dict[str, Any]]) -> None:
        """Server-side apply YAML text, a file, one object, or a list of objects."""
        if isinstance(manifest, Path):
            text = manifest.read_text()
        elif isinstance(manifest, str):
            text = manifest
        elif isinstance(manifest, dict):
            text = yaml.safe_dump(manifest)
        else:
            text = yaml.safe_dump_all(list(manifest))
        self.kubectl(
            "apply", "--server-side", "--force-conflicts", "--field-manager=kubetron-tests",
            "-f", "-", input=text,
        )  # fmt: skip

    def api_get(self, path: str) -> dict[str, Any] | None:
        """GET an API path (e.g. /api/v1/nodes) as admin; None on 404. Cheaper than kubectl."""
        try:
            body: dict[str, Any] = json.loads(http_get(self.server + path, self.admin_tls(), 10))
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise
        return body

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """One object as a dict, or None when it does not exist."""
        ns = ["-n", namespace] if namespace else []
        proc = self.kubectl("get", kind, name, *ns, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise ClusterError(f"kubectl get {kind} {name} failed: {proc.stderr}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` for the admin kubeconfig (caller closes it)."""
        from kubernetes import config as k8s_config

        return k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig)
        )

    # ------------------------------------------------------------------ logs + state

    def logs(self, name: str) -> str:
        return (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")

    def tails(self, lines: int = 30) -> str:
        """The last lines of every component's log, for failure reports."""
        parts = []
        for component in self.components.values():
            body = textwrap.indent(component.tail(lines), "    ")
            parts.append(f"--- {component.name} ({component.log}) ---\n{body}\n")
        return "".join(parts)

    def to_state(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "bin_dir": str(self.bin_dir),
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "config": asdict(self.config),
            "ports": asdict(self.ports),
            "created_outside": self.created_outside,
            "components": [c.to_state() for c in self.components.values()],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Cluster:
        """Re-attach to a cluster started by `up` (to stop it or to run tests against it)."""
        cluster = cls(
            Path(state["workdir"]),
            Path(state["bin_dir"]),
            ClusterConfig(**state["config"]),
            Ports(**{**state["ports"], "node": realnode.NodePorts(**state["ports"]["node"])}),
        )
        cluster.detached = True
        cluster.created_outside = list(state["created_outside"])
        for data in state["components"]:
            component = Component.from_state(data)
            cluster.components[component.name] = component
        return cluster


# --------------------------------------------------------------------------- command line


def _read_state() -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(state_file().read_text())
    except FileNotFoundError:
        return None
    return state


def running_cluster() -> Cluster | None:
    """The cluster recorded by `up`, if all of its processes are still alive."""
    state = _read_state()
    if state is None:
        return None
    cluster = Cluster.from_state(state)
    return cluster if all(c.alive() for c in cluster.components.values()) else None


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """Serialise `up`/`down` of concurrent callers sharing one $KUBETRON_CACHE."""
    lock = state_file().with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_up(real_node: bool | None = None) -> int:
    up(real_node)
    return 0


def up(real_node: bool | None = None) -> Cluster:
    """Start the detached cluster (or return the one already up). `real_node`: None means "when
    this machine can run one"; True fails with what is missing; False never starts one."""
    with _state_lock():
        return _up(real_node)


def _up(real_node: bool | None) -> Cluster:
    running = running_cluster()
    if running is not None and (real_node is None or real_node == running.config.real_node):
        print(f"already up; state: {state_file()}", file=sys.stderr)
        if running.node is not None:  # images rebuilt since it started
            imported = running.node.import_images()
            if imported:
                print(f"imported rebuilt images: {', '.join(imported)}", file=sys.stderr)
        print(running.kubeconfig)
        return running
    if running is not None:
        print("the running cluster has a different node setup; restarting it", file=sys.stderr)
        _down()
    if real_node is None:
        real_node = not realnode.missing_prerequisites(default_bin_dir(), cache_dir())
    if _read_state() is not None:
        _down()  # a half-dead earlier cluster: clean it up first
    # `timeout make cluster-up` sends SIGTERM: clean up instead of leaving processes behind.
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    started = time.monotonic()
    try:
        # No kubetron CRD: `make demo` installs it with the chart, as a user does.
        config = ClusterConfig(real_node=real_node)
        cluster = Cluster.start(config, detached=True, state_path=state_file())
    except BaseException:
        state_file().unlink(missing_ok=True)
        raise
    elapsed = time.monotonic() - started
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in cluster.timings.items())
    print(f"cluster ready in {elapsed:.1f}s ({phases}); state: {state_file()}", file=sys.stderr)
    print(f"  export KUBECONFIG={cluster.kubeconfig}", file=sys.stderr)
    print(cluster.kubeconfig)
    return cluster


def cmd_down() -> int:
    with _state_lock():
        return _down()


def _down() -> int:
    state = _read_state()
    if state is None:
        print("no cluster state; nothing to stop", file=sys.stderr)
        return 0
    Cluster.from_state(state).stop()
    state_file().unlink()
    print("cluster stopped", file=sys.stderr)
    return 0


def cmd_status() -> int:
    state = _read_state()
    if state is None:
        print("down")
        return 1
    cluster = Cluster.from_state(state)
    for name, component in cluster.components.items():
        print(f"{name:24} pid {component.pid:<8} {'up' if component.alive() else 'DEAD'}")
    print(f"kubeconfig: {cluster.kubeconfig}")
    return 0 if all(c.alive() for c in cluster.components.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster.harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    node = parser.add_mutually_exclusive_group()
    node.add_argument(
        "--real-node",
        dest="real_node",
        action="store_true",
        default=None,
        help="start the real worker node (fail if this machine cannot)",
    )
    node.add_argument(
        "--no-real-node",
        dest="real_node",
        action="store_false",
        help="only the control plane and the kwok nodes",
    )
    args = parser.parse_args(argv)
    commands = {"up": lambda: cmd_up(args.real_node), "down": cmd_down, "status": cmd_status}
    try:
        return commands[args.command]()
    except ClusterError as err:
        print(f"harness: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("harness: interrupted; stopped what was started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
