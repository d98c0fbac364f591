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
  kube-proxy and CoreDNS on a bridge of its own (node.py, host.py); the API server then
  binds the bridge address so that pods reach it through the `kubernetes` Service.

Every process listens on free loopback ports and writes only under one temp dir (plus, for the
training-operator, a `tls.crt` it insists on in /tmp/k8s-webhook-server/serving-certs, and for
Kueue a `tls.crt`/`tls.key` pair in /etc/kueue/metrics/certs, created only when missing and
removed again on stop). Startup polls readiness; it never sleeps blindly.

Every process listens on free loopback ports and writes only under one temp dir (plus, for the
training-operator, a `tls.crt` it insists on in /tmp/k8s-webhook-server/serving-certs, and for
Kueue a `tls.crt`/`tls.key` pair in /etc/kueue/metrics/certs, created only when missing and
removed again on stop). Startup polls readiness; it never sleeps blindly.

Command line (the Makefile's `cluster-up` / `cluster-down`): `python -m devtools.cluster
up|down|status` (detached.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from devtools.cluster import host, trainer_v2
from devtools.cluster.base import ClusterBase
from devtools.cluster.config import FAKE_GPU_LABEL, ClusterConfig, Ports, kwok_gpu_node
from devtools.cluster.host import SERVICE_CIDR
from devtools.cluster.node import RealNode, missing_prerequisites
from devtools.cluster.paths import (
    KUEUE_BINARY,
    KUEUE_CRDS,
    KUEUE_WEBHOOKS,
    KWOK_STAGES,
    PYTORCHJOB_CRD,
    VOLCANO_CRDS,
    cache_dir,
    containerd_root,
    default_bin_dir,
    missing_tools,
)
from devtools.cluster.pki import b64, make_pki, write_kubeconfig
from devtools.cluster.waiting import (
    ClusterError,
    crd_established,
    healthz_ok,
    http_get,
    insecure_tls,
)
from kubetron_operator.scheduling.kueue import QUEUE_LABEL

KUEUE_NAMESPACE = "kueue-system"
# Of Kueue's webhooks only these are registered: its own API group and PyTorchJobs and TrainJobs
# carrying the queue label (other tests' jobs never reach Kueue, and nothing calls a stopped
# Kueue).
KUEUE_API_GROUP = "kueue.x-k8s.io"
KUEUE_JOB_RESOURCES = ("pytorchjobs", "trainjobs")  # the integrations the harness enables
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"

TRAINING_OPERATOR_NAMESPACE = "kubeflow"
TRAINING_OPERATOR_SECRET = "training-operator-webhook-cert"
# Hard-coded in the training-operator (pkg/cert); it only checks that tls.crt exists there.
TRAINING_OPERATOR_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
# Hard-coded in Kueue's main.go: without internal cert management it insists on a metrics
# certificate there (even with metrics off).
KUEUE_METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")

STOP_ORDER = (
    trainer_v2.TRAINER,
    trainer_v2.JOBSET,
    "kueue",
    "training-operator",
    "kwok",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
)


class Cluster(ClusterBase):
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
      start_trainer_v2() / stop_trainer_v2()  Kubeflow Trainer v2 and JobSet (trainer_v2.py)
      logs(name) / tails()      component logs
    outage.py restarts etcd and kube-apiserver under a running cluster and compacts etcd.
    """

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
            missing = missing_prerequisites(bin_dir, cache_dir())
            if missing:
                raise ClusterError(f"the real node needs: {'; '.join(missing)}")
            busy = host.node_owner()
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
                host.claim_node(self.workdir)
                host.network_up()
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
                for further in self.extra_nodes:
                    host.node_network_up(further.net)
                    further.launch()
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
                for real in self.real_nodes:
                    real.wait_ready(self.config.startup_timeout)

    def add_node(self) -> RealNode:
        """Start one more real node (in a network namespace of its own) and wait until it is
        Ready; `remove_node` takes it away again (`stop` does in any case)."""
        if self.node is None:
            raise ClusterError("a further real node needs the first (ClusterConfig.real_node)")
        real = self._further_node(len(self.real_nodes) + 1)
        self.extra_nodes.append(real)
        self.config.real_nodes += 1
        self.save_state()
        started = time.monotonic()
        host.node_network_up(real.net)
        real.launch()
        real.wait_ready(self.config.startup_timeout)
        self.timings[f"add-{real.name}"] = round(time.monotonic() - started, 2)
        return real

    def remove_node(self, real: RealNode) -> None:
        """Stop a further real node, remove everything it made, and delete its Node object."""
        host.teardown_node(self.workdir, real.net, True, self._forget_component)
        self.extra_nodes.remove(real)
        self.config.real_nodes -= 1
        self.kubectl("delete", "node", real.name, "--ignore-not-found", "--wait=false")
        self.save_state()

    def _forget_component(self, name: str) -> None:
        self._stop_component(name)
        self.components.pop(name, None)

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
            host.teardown(self.workdir, containerd_root(), self._stop_component)
        for name in STOP_ORDER:
            self._stop_component(name)
        for path in reversed(self.created_outside):
            with contextlib.suppress(OSError):
                p = Path(path)
                p.rmdir() if p.is_dir() else p.unlink()
        self.created_outside.clear()
        if self.config.real_node:
            host.network_down()
            host.release_node(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_component(self, name: str) -> None:
        component = self.components.get(name)
        if component is not None:
            component.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--profiling=false",
        ]  # fmt: skip

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
            f"--service-cluster-ip-range={SERVICE_CIDR}",
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
        return [
            kwok_gpu_node(name, self.config.gpus_per_node, self.config.gpu_product)
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

    def start_training_operator(self, gang_scheduler: str | None = None) -> None:
        """Start the training-operator (PyTorchJob controller only) and wait for /readyz.
        `gang_scheduler="volcano"`: it creates a Volcano PodGroup per job (CRDs installed)."""
        self._launch_training_operator(gang_scheduler)
        self._wait_training_operator()

    def _launch_training_operator(self, gang_scheduler: str | None = None) -> None:
        if "training-operator" in self.components and self.components["training-operator"].alive():
            return
        self._prepare_training_operator()
        argv = [
            self._bin("training-operator.v1"), "--enable-scheme=pytorchjob",
            "--metrics-bind-address=0",
            f"--health-probe-bind-address=127.0.0.1:{self.ports.operator_probe}",
            f"--webhook-server-port={self.ports.operator_webhook}", "--zap-log-level=info",
        ]  # fmt: skip
        if gang_scheduler == "volcano":
            self.install_crds(sorted((self.bin_dir / VOLCANO_CRDS).glob("*.yaml")))
        if gang_scheduler:
            argv.append(f"--gang-scheduler-name={gang_scheduler}")
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

    # ------------------------------------------------------------------ Trainer v2

    def start_trainer_v2(self) -> None:
        """Beside the training-operator: Kubeflow Trainer v2 and JobSet (the TrainJob backend)."""
        trainer_v2.start(self)

    def stop_trainer_v2(self) -> None:
        trainer_v2.stop(self)

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
            # TrainJob: the TrainJob backend (Kueue waits for Trainer v2's CRDs if they are not
            # there yet)
            "integrations": {"frameworks": ["kubeflow.org/pytorchjob",
                                            "trainer.kubeflow.org/trainjob"]},
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
                job = any(set(KUEUE_JOB_RESOURCES) & set(r.get("resources", [])) for r in rules)
                if not (ours or job):
                    continue
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": base + path, "caBundle": b64(self.pki.ca_crt)}
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
