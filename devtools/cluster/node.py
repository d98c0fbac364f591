"""Real worker nodes beside the test control plane: containerd, kubelet, kube-proxy, CoreDNS.

kwok nodes run no containers; these do. They run pods from images built locally from the
project's Dockerfile (hack/build-images.sh). The first node sits on a Linux bridge that exists
only for it:

    bridge kubetron0    10.213.0.1/24: the node's InternalIP and the pods' gateway
    pods                10.213.0.16 - 10.213.0.250 (CNI bridge + host-local, no masquerade)
    Services            10.213.1.0/24 (kubernetes = .1, kube-dns = .10), routed onto the bridge

A further node N (2, 3, ...; opt-in: `Cluster.add_node()`, `python -m devtools.cluster up
--nodes 2`) runs its containerd, kubelet and kube-proxy in a network namespace of its own, its
pods on a bridge inside it (10.213.N.0/24), its InternalIP the namespace's end of a veth to the
host (10.213.(100+N).2/30); its containerd root, kubelet root, node name and cgroup root are its
own (host.NodeNet names them all). Every pod's one route goes to 10.213.0.0/16 (Services and
every node's pods); the cluster's single CoreDNS runs on the first node's address.

The API server binds the bridge address (reachable from pods through the `kubernetes` Service)
and reaches each kubelet by its InternalIP. Nothing leaves the machine: FORWARD rules drop
whatever would be routed from the nodes' interfaces elsewhere than to each other's pods,
CoreDNS has no forwarder, pods get no default route. Needs root (the cluster starts nodes only
where it can); what the nodes change on the machine, and their teardown, are in host.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from devtools.cluster.host import (
    CLUSTER_CIDR,
    CLUSTER_DOMAIN,
    DNS_SERVICE_IP,
    KUBERNETES_SERVICE_IP,
    NODE_IP,
    NODE_LABEL,
    NodeError,
    NodeNet,
    create_cgroups,
    ctr,
)
from devtools.cluster.pki import Pki, b64, new_leaf
from devtools.cluster.waiting import http_get
from devtools.ports import free_port

CNI_NETWORK = "kubetron"
STORAGE_CLASS = "kubetron-local"
COREDNS_USER = "kubetron:coredns"  # CoreDNS's client certificate name and its ClusterRole
# Debian's containernetworking-plugins package.
CNI_BIN_DIR = Path("/usr/lib/cni")
NODE_PACKAGES = {"containerd": "containerd", "runc": "runc", "ctr": "containerd",
                 "iptables": "iptables", "conntrack": "conntrack", "ip": "iproute2"}  # fmt: skip
NODE_BINARIES = ("kubelet", "kube-proxy", "coredns")
PAUSE_IMAGE_PREFIX = "localhost/kubetron/pause:"


# --------------------------------------------------------------------------- prerequisites


def images_manifest(cache: Path) -> list[dict[str, Any]]:
    """The images hack/build-images.sh built ($KUBETRON_CACHE/images/images.json), or []."""
    path = cache / "images" / "images.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    return list(data)


def built_image(cache: Path, prefix: str, suffix: str = "") -> str:
    """The name of the image `make images` built that starts with `prefix` and ends with
    `suffix` (images.json), or a NodeError naming it."""
    for image in images_manifest(cache):
        name = str(image["name"])
        if name.startswith(prefix) and name.endswith(suffix):
            return name
    raise NodeError(f"image {prefix}*{suffix} is not built: run `make images`")


def missing_prerequisites(bin_dir: Path, cache: Path) -> list[str]:
    """What a real node needs and this machine lacks, each with the command that provides it."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the node creates a bridge, iptables rules, mounts and cgroups)")
    for tool, package in NODE_PACKAGES.items():
        if shutil.which(tool) is None:
            missing.append(f"{tool} (Debian package {package}: make tools)")
    if not (CNI_BIN_DIR / "bridge").is_file():
        missing.append(f"CNI plugins in {CNI_BIN_DIR} (containernetworking-plugins: make tools)")
    missing += [f"{b} (make tools)" for b in NODE_BINARIES if not (bin_dir / b).is_file()]
    if not any(i["name"].startswith(PAUSE_IMAGE_PREFIX) for i in images_manifest(cache)):
        missing.append("the pause image (make images)")
    return missing


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def dns_query(server: str, name: str, timeout: float = 1.0) -> list[str]:
    """IPv4 addresses for `name` from `server`:53 (one UDP A query, no search domains)."""
    qid = random.randrange(1 << 16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, 53))
        reply = sock.recv(4096)
    rid, flags, _qd, ancount = struct.unpack(">HHHH", reply[:8])
    if rid != qid or flags & 0xF:
        return []
    offset = 12 + len(question) + 4
    addresses = []
    for _ in range(ancount):
        if reply[offset] & 0xC0 == 0xC0:  # compressed name pointer
            offset += 2
        else:
            while reply[offset]:
                offset += reply[offset] + 1
            offset += 1
        rtype, _cls, _ttl, length = struct.unpack(">HHIH", reply[offset : offset + 10])
        offset += 10
        if rtype == 1 and length == 4:
            addresses.append(socket.inet_ntoa(reply[offset : offset + 4]))
        offset += length
    return addresses


def _cluster_role_binding(name: str, role: str, kind: str, subject: str) -> dict[str, Any]:
    rbac = "rbac.authorization.k8s.io"
    return {
        "apiVersion": f"{rbac}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": rbac, "kind": kind, "name": subject}],
    }


# --------------------------------------------------------------------------- the node


@dataclass
class NodePorts:
    kubelet: int
    kubelet_healthz: int
    proxy_healthz: int
    proxy_metrics: int
    dns_health: int
    dns_ready: int

    @classmethod
    def pick(cls) -> NodePorts:
        return cls(*(free_port() for _ in range(6)))

    @classmethod
    def standard(cls) -> NodePorts:
        """Kubernetes' own defaults: free in a node's own network namespace (no CoreDNS there)."""
        return cls(10250, 10248, 10256, 10249, 0, 0)


class NodeCluster(Protocol):
    """What the node needs of the control plane it joins (`base.ClusterBase` is the one)."""

    workdir: Path
    bin_dir: Path
    cache: Path
    pki: Pki
    server: str
    timings: dict[str, float]

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]: ...

    def _launch(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None: ...

    def wait_for[T](
        self, predicate: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.2
    ) -> T: ...

    def apply(self, manifest: str | Path | dict[str, Any] | Iterable[dict[str, Any]]) -> None: ...

    def api_get(self, path: str) -> dict[str, Any] | None: ...


class RealNode:
    """Configuration and processes of one real node of a cluster (`net`: which one; the first
    also runs the cluster's CoreDNS)."""

    def __init__(
        self, cluster: NodeCluster, ports: NodePorts, containerd_root: Path, net: NodeNet
    ) -> None:
        self.cluster = cluster
        self.ports = ports
        self.net = net
        self.name = net.name
        self.dir = net.dir(cluster.workdir)
        self.containerd_root = containerd_root  # persistent: imported images survive clusters
        self.socket = self.dir / "containerd" / "containerd.sock"

    def _launch(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.cluster._launch(self.net.component(name), self.net.wrap(argv), env)

    # ------------------------------------------------------------------ certificates

    def _leaf(self, name: str) -> str:  # the node's own certificates are named after it
        return name if self.net.first else f"{name}-{self.name}"

    def make_certs(self) -> None:
        pki = self.cluster.pki
        node = f"/O=system:nodes/CN=system:node:{self.name}"
        new_leaf(pki, self._leaf("kubelet-client"), node, "clientAuth")
        new_leaf(pki, self._leaf("kubelet-serving"), f"/CN={self.name}", "serverAuth",
                  f"IP:{self.net.ip},DNS:{self.name}")  # fmt: skip
        if self.net.first:  # one identity for every node's kube-proxy
            new_leaf(pki, "kube-proxy", "/CN=system:kube-proxy", "clientAuth")
            new_leaf(pki, "coredns", f"/CN={COREDNS_USER}", "clientAuth")

    def _kubeconfig(self, name: str) -> Path:
        pki = self.cluster.pki
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {
                "server": self.cluster.server, "certificate-authority-data": b64(pki.ca_crt)}}],
            "users": [{"name": "u", "user": {
                "client-certificate-data": b64(pki.dir / f"{name}.crt"),
                "client-key-data": b64(pki.dir / f"{name}.key")}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }  # fmt: skip
        path = _write(self.dir / f"{name}.kubeconfig", yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    # ------------------------------------------------------------------ containerd

    def _containerd_config(self) -> Path:
        state = self.dir / "containerd" / "state"
        pause = self.pause_image()
        cni_conf = self.dir / "cni" / "net.d"
        net = self.net
        cni = {
            "cniVersion": "0.4.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.net.bridge,
                    "isGateway": False,  # host.py owns the bridge and its address
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(self.dir / "cni" / "ipam"),
                        "ranges": [[{"subnet": net.pod_cidr, "rangeStart": net.pod_range[0],
                                     "rangeEnd": net.pod_range[1], "gateway": net.gateway}]],
                        # No default route: pods reach only the Services and the nodes' pods.
                        "routes": [{"dst": CLUSTER_CIDR, "gw": net.gateway}],
                    },
                },
            ],  # the CRI sets up each pod's loopback itself
        }  # fmt: skip
        _write(cni_conf / "10-kubetron.conflist", json.dumps(cni, indent=2))
        text = f"""
version = 2
root = "{self.containerd_root}"
state = "{state}"
oom_score = 0
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.dir / "containerd" / "opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{state / "runc"}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"""
        return _write(self.dir / "containerd.toml", text)

    def pause_image(self) -> str:
        return self.image(PAUSE_IMAGE_PREFIX)

    def ctr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return ctr(self.socket, *args, timeout=timeout)

    def start_containerd(self) -> None:
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        config = self._containerd_config()
        # Pulls go to a proxy that is not there: nothing leaves the machine, and an image that
        # was not built and imported fails at once with ErrImagePull instead of hanging.
        dead_proxy = "http://127.0.0.1:9"
        env = self.cluster._env({"HTTP_PROXY": dead_proxy, "HTTPS_PROXY": dead_proxy,
                                 "NO_PROXY": "", "http_proxy": dead_proxy,
                                 "https_proxy": dead_proxy, "no_proxy": ""})  # fmt: skip
        self._launch("containerd", ["containerd", "--config", str(config)], env)
        self.cluster.wait_for(
            lambda: self.socket.exists() and self.ctr("version", timeout=5),
            timeout=60,
            what="containerd",
        )

    def import_images(self) -> list[str]:
        """Import every built image whose archive containerd does not hold yet; return names.

        An image is current when containerd has its name with the label of the archive's
        inputs hash, so a rebuilt image (new hash) is imported again under the same name.
        """
        have = {}
        for line in self.ctr("images", "ls").stdout.splitlines()[1:]:
            parts = line.split()
            labels = parts[-1] if parts else ""
            have[parts[0]] = labels
        imported = []
        for image in images_manifest(self.cluster.cache):
            name, digest = image["name"], image["inputs"]
            if f"io.kubetron.inputs={digest}" in have.get(name, ""):
                continue
            archive = image["archive"]
            if not Path(archive).is_file():
                raise NodeError(f"image archive {archive} for {name} is missing; run `make images`")
            self.ctr("images", "import", archive)
            self.ctr("images", "label", name, f"io.kubetron.inputs={digest}")
            imported.append(name)
        self.prune_images({str(image["name"]) for image in images_manifest(self.cluster.cache)})
        return imported

    def prune_images(self, current: set[str]) -> list[str]:
        """Remove every image record whose target is not a current image's: earlier builds, by
        tag and by the digest references the CRI adds. containerd then collects their content
        and unpacked snapshots (gigabytes per trainer build, in the persistent containerd root).
        Everything on this node comes from `make images`, so nothing else is touched."""
        records = [line.split() for line in self.ctr("images", "ls").stdout.splitlines()[1:]]
        targets = {r[2] for r in records if len(r) > 2 and r[0] in current}
        stale = [r[0] for r in records if len(r) > 2 and r[2] not in targets]
        if stale:
            self.ctr("images", "rm", "--sync", *stale)
        return stale

    # ------------------------------------------------------------------ kubelet

    def _kubelet_config(self) -> Path:
        pki = self.cluster.pki
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.net.ip,
            "port": self.ports.kubelet,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.ports.kubelet_healthz,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki.ca_crt)},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(pki.dir / f"{self._leaf('kubelet-serving')}.crt"),
            "tlsPrivateKeyFile": str(pki.dir / f"{self._leaf('kubelet-serving')}.key"),
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.net.cgroup_root}",
            "failCgroupV1": False,
            "failSwapOn": False,
            "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE here: negative scores make runc fail
            "resolvConf": "",  # the host's resolver is never copied into pods
            "clusterDNS": [DNS_SERVICE_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "podLogsDir": str(self.dir / "pod-logs"),
            # No disk-pressure eviction ("0%" switches a signal off) and no image garbage
            # collection: there is no registry to pull a removed image from again, and on a
            # full disk the kubelet would delete the imported images (the pause image too),
            # after which no pod can start (seen when the disk fell under 1% free).
            "evictionHard": {"memory.available": "1%", "nodefs.available": "0%",
                             "imagefs.available": "0%", "nodefs.inodesFree": "0%",
                             "imagefs.inodesFree": "0%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "imageMinimumGCAge": "87600h",
            "serializeImagePulls": False,
            "maxPods": 40,
            "syncFrequency": "10s",
            "nodeStatusReportFrequency": "10s",
            "fileCheckFrequency": "20s",
        }  # fmt: skip
        return _write(self.dir / "kubelet.yaml", yaml.safe_dump(config))

    def start_kubelet(self) -> None:
        create_cgroups(self.net.cgroup_root)
        argv = [
            str(self.cluster.bin_dir / "kubelet"), f"--config={self._kubelet_config()}",
            f"--kubeconfig={self._kubeconfig(self._leaf('kubelet-client'))}",
            f"--root-dir={self.dir / 'kubelet'}", f"--cert-dir={self.dir / 'kubelet-certs'}",
            f"--hostname-override={self.name}", f"--node-ip={self.net.ip}",
            f"--node-labels={NODE_LABEL}=true", "--v=1",
        ]  # fmt: skip
        self._launch("kubelet", argv)

    # ------------------------------------------------------------------ kube-proxy

    def start_kube_proxy(self) -> None:
        net, probe = self.net, self.net.probe_address
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self._kubeconfig("kube-proxy"))},
            "mode": "iptables",
            "clusterCIDR": net.pod_cidr,
            "hostnameOverride": net.name,
            "bindAddress": net.ip,
            "healthzBindAddress": f"{probe}:{self.ports.proxy_healthz}",
            "metricsBindAddress": f"{probe}:{self.ports.proxy_metrics}",
            "nodePortAddresses": [f"{net.ip}/32"],
            "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
            # Zero: kube-proxy leaves the host's conntrack settings alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
        }  # fmt: skip
        path = _write(self.dir / "kube-proxy.yaml", yaml.safe_dump(config))
        self._launch("kube-proxy", [str(self.cluster.bin_dir / "kube-proxy"), f"--config={path}",
                                    "--v=1"])  # fmt: skip

    # ------------------------------------------------------------------ CoreDNS

    def start_coredns(self) -> None:
        kubeconfig = self._kubeconfig("coredns")
        corefile = f"""
.:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{self.ports.dns_health}
    ready 127.0.0.1:{self.ports.dns_ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5 {{
        denial 0
    }}
    loadbalance
}}
"""
        path = _write(self.dir / "Corefile", corefile)
        self._launch("coredns", [str(self.cluster.bin_dir / "coredns"), "-conf", str(path)])

    def _cluster_objects(self) -> list[dict[str, Any]]:
        """RBAC for the node and CoreDNS, the kube-dns Service and its endpoints, storage."""
        dns_ports = [{"name": "dns", "port": 53, "protocol": "UDP"},
                     {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]  # fmt: skip
        return [
            # The API server authorizes with RBAC only (no Node authorizer).
            _cluster_role_binding("kubetron:nodes", "system:node", "Group", "system:nodes"),
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": COREDNS_USER},
             "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods",
                                                        "namespaces"],
                        "verbs": ["list", "watch"]},
                       {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                        "verbs": ["list", "watch"]}]},
            _cluster_role_binding(COREDNS_USER, COREDNS_USER, "User", COREDNS_USER),
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "kube-dns", "namespace": "kube-system",
                          "labels": {"k8s-app": "kube-dns"}},
             "spec": {"clusterIP": DNS_SERVICE_IP, "ports": dns_ports}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "kube-dns-host", "namespace": "kube-system",
                          "labels": {"kubernetes.io/service-name": "kube-dns",
                                     "endpointslice.kubernetes.io/managed-by": "kubetron-tests"}},
             "addressType": "IPv4",
             "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
             "ports": [{"name": p["name"], "port": 53, "protocol": p["protocol"]}
                       for p in dns_ports]},
            {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
             "metadata": {"name": STORAGE_CLASS},
             "provisioner": "kubernetes.io/no-provisioner",
             "volumeBindingMode": "Immediate", "reclaimPolicy": "Retain"},
        ]  # fmt: skip

    # ------------------------------------------------------------------ lifecycle

    def launch(self) -> None:
        """containerd (and image import), then the node's processes; does not wait for Ready."""
        self.make_certs()
        self.start_containerd()
        self.cluster.timings["images-imported"] = len(self.import_images())
        self.cluster.apply(self._cluster_objects())
        self.start_kubelet()
        self.start_kube_proxy()
        if self.net.first:  # the cluster's DNS server, which every node's pods reach
            self.start_coredns()

    def image(self, prefix: str) -> str:
        return built_image(self.cluster.cache, prefix)

    def wait_ready(self, timeout: float) -> None:
        self.cluster.wait_for(self._ready, timeout=timeout, what=f"node {self.name} Ready",
                              interval=0.3)  # fmt: skip
        self.cluster.wait_for(
            lambda: self._http_ok(self.net.probe_address, self.ports.proxy_healthz),
            timeout=timeout,
            what=f"kube-proxy of {self.name} /healthz (rules synced)",
        )
        if not self.net.first:
            return
        # CoreDNS's ready endpoint answers before its listener does: ask a real question.
        self.cluster.wait_for(
            lambda: (
                dns_query(NODE_IP, f"kubernetes.default.svc.{CLUSTER_DOMAIN}")
                == [KUBERNETES_SERVICE_IP]
            ),
            timeout=timeout,
            what=f"CoreDNS on {NODE_IP}:53 to resolve kubernetes.default",
        )

    @staticmethod
    def _http_ok(address: str, port: int) -> bool:
        http_get(f"http://{address}:{port}/healthz")
        return True

    def _ready(self) -> bool:
        node = self.cluster.api_get(f"/api/v1/nodes/{self.name}") or {}
        conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        taints = {t["key"] for t in node.get("spec", {}).get("taints", []) or []}
        return conditions.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints

    def host_path_volume(self, name: str, size: str = "1Gi") -> dict[str, Any]:
        """A ReadWriteMany PersistentVolume backed by a directory on this node (world-writable:
        the trainer image runs as a non-root user). Bind a claim to it with `volumeName`."""
        path = self.dir / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        return {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "labels": {"kubetron.io/test-volume": name}},
            "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteMany"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": STORAGE_CLASS,
                     "hostPath": {"path": str(path), "type": "Directory"}},
        }  # fmt: skip
