"""The client side of a dev cluster: its processes, kubectl and API access, logs and saved state.

ClusterBase holds what every user of a cluster needs whether this process started it or
re-attached to it (`python -m devtools.cluster up` in another process): running kubectl,
server-side apply, GETs against the API, waiting with a check that every component still
runs, and the state that `down` reads. control_plane.Cluster adds starting and stopping.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import textwrap
import urllib.error
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Self

import yaml

from devtools.cluster.config import ClusterConfig, Ports
from devtools.cluster.host import NODE_IP, NodeNet
from devtools.cluster.node import NodePorts, RealNode
from devtools.cluster.paths import cache_dir, containerd_root, node_containerd_root
from devtools.cluster.pki import Pki
from devtools.cluster.process import Component
from devtools.cluster.waiting import ClusterError, http_get, wait_until


class ClusterBase:
    """A dev cluster's files, processes and clients (see control_plane.Cluster for its API)."""

    def __init__(self, workdir: Path, bin_dir: Path, config: ClusterConfig, ports: Ports):
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.config = config
        self.ports = ports
        self.pki = Pki(workdir / "pki")
        self.kubeconfig = workdir / "kubeconfig"
        self.cache = cache_dir()
        # With a real node the API server binds the bridge address, so pods can reach it.
        self.address = NODE_IP if config.real_node else "127.0.0.1"
        self.server = f"https://{self.address}:{ports.apiserver}"
        self.node = (
            RealNode(self, ports.node, containerd_root(), NodeNet()) if config.real_node else None
        )
        self.extra_nodes = [self._further_node(i) for i in range(2, config.real_nodes + 1)
                            if config.real_node]  # fmt: skip
        self.components: dict[str, Component] = {}
        self.created_outside: list[str] = []  # paths outside workdir we made (removed on stop)
        self.detached = False
        self.timings: dict[str, float] = {}  # startup phase -> seconds, for reports
        self.state_path: Path | None = None

    def _further_node(self, index: int) -> RealNode:
        """Real node `index` (>= 2): its own network namespace, so the standard ports are free."""
        return RealNode(self, NodePorts.standard(), node_containerd_root(index), NodeNet(index))

    @property
    def real_nodes(self) -> list[RealNode]:
        """Every real node, the first first."""
        return ([self.node] if self.node else []) + self.extra_nodes

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

    def admin_tls(self) -> ssl.SSLContext:
        """TLS context that trusts the cluster CA and presents the admin client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        ctx.load_cert_chain(str(self.pki.admin_crt), str(self.pki.admin_key))
        return ctx

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
    def from_state(cls, state: dict[str, Any]) -> Self:
        """Re-attach to a cluster started by `up` (to stop it or to run tests against it)."""
        cluster = cls(
            Path(state["workdir"]),
            Path(state["bin_dir"]),
            ClusterConfig(**state["config"]),
            Ports(**{**state["ports"], "node": NodePorts(**state["ports"]["node"])}),
        )
        cluster.detached = True
        cluster.created_outside = list(state["created_outside"])
        for data in state["components"]:
            component = Component.from_state(data)
            cluster.components[component.name] = component
        return cluster


# --------------------------------------------------------------------------- command line
