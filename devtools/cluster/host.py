"""What the real nodes change on this machine, and how it is all found and removed again.

The first node's network (bridge kubetron0, its address, the Service route, iptables rules
tagged with a comment, kube-proxy's chains), its cgroups under /kubetron, the mounts below its
directories, the pods' network namespaces and the owner file are machine-wide: one cluster with
real nodes per machine. Further nodes (NodeNet index 2, 3, ...) each live in a network namespace
of their own, joined to the host by a veth on a /30 link network, with a bridge for their pods
inside; the host routes between the nodes' pod ranges and lets nothing else through.

Everything started is recorded so that `teardown()` removes it, and teardown also finds by name
what an interrupted start may have left (the bridge, rules tagged with a comment, cgroups under
/kubetron, mounts under our directories, shims started for our socket), so it is safe to run
after a crash, twice, or with nothing to do.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devtools.cluster.paths import node_containerd_root

BRIDGE = "kubetron0"
NODE_IP = "10.213.0.1"
NODE_CIDR = "10.213.0.0/24"
POD_RANGE = ("10.213.0.16", "10.213.0.250")
SERVICE_CIDR = "10.213.1.0/24"
KUBERNETES_SERVICE_IP = "10.213.1.1"
DNS_SERVICE_IP = "10.213.1.10"
CLUSTER_DOMAIN = "cluster.local"
NODE_NAME = "kubetron-node"
NODE_LABEL = "kubetron.io/real-node"
CGROUP_ROOT = "kubetron"  # kubelet's cgroupRoot: /kubetron in every v1 hierarchy
RULE_COMMENT = "kubetron-test-node"  # tags our own iptables rules so teardown finds them
# Every node's pods get one route, to this range: the Services and every node's pods (a node's
# pod range is 10.213.<index>.0/24 from index 2; 10.213.1.0/24 is the Services').
CLUSTER_CIDR = "10.213.0.0/16"
LINK_BASE = 100  # node <index>'s link network to the host: 10.213.<LINK_BASE + index>.0/30
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
SAVED_FORWARD = Path("/run/kubetron-ip-forward")  # the host's value while the bridge is up
NETNS_PREFIX = f"{NODE_NAME}-"  # a further node's network namespace: kubetron-node-<index>


class NodeError(RuntimeError):
    """The real node could not be set up (missing tools, root, images) or failed to start."""


# --------------------------------------------------------------------------- small helpers


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def ctr(
    socket_path: Path, *args: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`ctr` against the node's containerd, in the CRI's namespace."""
    return run("ctr", "--address", str(socket_path), "-n", "k8s.io", *args, check=check,
               timeout=timeout)  # fmt: skip


# --------------------------------------------------------------------------- network


@dataclass(frozen=True)
class NodeNet:
    """Names and addresses of real node `index`: 1 is the first (on the host's bridge), 2... each
    run in a network namespace of their own."""

    index: int = 1

    @property
    def first(self) -> bool:
        return self.index == 1

    def _suffixed(self, base: str, sep: str = "") -> str:
        return base if self.first else f"{base}{sep}{self.index}"

    @property
    def name(self) -> str:  # the Node's name
        return self._suffixed(NODE_NAME)

    def component(self, name: str) -> str:  # a process of this node, as the cluster records it
        return self._suffixed(name, "-node")

    def dir(self, workdir: Path) -> Path:
        return workdir / self._suffixed("node")

    @property
    def netns(self) -> str | None:
        return None if self.first else f"{NETNS_PREFIX}{self.index}"

    @property
    def bridge(self) -> str:  # inside the node's namespace for index >= 2
        return BRIDGE if self.first else f"kubetron{self.index}"

    @property
    def host_veth(self) -> str:
        return f"kubetron{self.index}h"

    @property
    def ip(self) -> str:  # the InternalIP: the bridge's for node 1, the link's for the others
        return NODE_IP if self.first else f"10.213.{LINK_BASE + self.index}.2"

    @property
    def link_host_ip(self) -> str:
        return f"10.213.{LINK_BASE + self.index}.1"

    @property
    def pod_cidr(self) -> str:
        return NODE_CIDR if self.first else f"10.213.{self.index}.0/24"

    @property
    def gateway(self) -> str:  # the pods' gateway: the bridge's address
        return NODE_IP if self.first else f"10.213.{self.index}.1"

    @property
    def pod_range(self) -> tuple[str, str]:
        return POD_RANGE if self.first else (f"10.213.{self.index}.16", f"10.213.{self.index}.250")

    @property
    def probe_address(self) -> str:  # where the node's health endpoints listen, seen from here
        return "127.0.0.1" if self.first else self.ip

    @property
    def cgroup_root(self) -> str:
        return self._suffixed(CGROUP_ROOT, "-node")

    @property
    def comment(self) -> str:  # node 1's comment is a prefix of the others': teardown finds all
        return self._suffixed(RULE_COMMENT, "-")

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run in the node's network namespace (only that: the mounts stay the host's, so
        containerd sees what kubelet mounts, and teardown finds both's mounts)."""
        return argv if self.netns is None else ["nsenter", f"--net=/run/netns/{self.netns}", *argv]

    @classmethod
    def found(cls, workdir: Path | None) -> list[NodeNet]:
        """The further nodes (index >= 2) whose namespace or directory exists."""
        indices = set()
        netns = Path("/run/netns")
        for entry in netns.iterdir() if netns.is_dir() else []:
            rest = entry.name.removeprefix(NETNS_PREFIX)
            if rest != entry.name and rest.isdigit():
                indices.add(int(rest))
        for entry in workdir.glob("node[0-9]*") if workdir and workdir.is_dir() else []:
            indices.add(int(entry.name.removeprefix("node")))
        return [cls(i) for i in sorted(indices) if i >= 2]


def _in_netns(net: NodeNet, *argv: str, check: bool = True) -> None:
    run("ip", "netns", "exec", str(net.netns), *argv, check=check)


def node_network_up(net: NodeNet) -> None:
    """A further node's namespace: a veth to the host (the node's InternalIP at its end), a
    bridge for its pods, routes both ways between the nodes' pod ranges, and rules on the
    host that let exactly that through (tagged with the node's comment)."""
    node_network_down(net)
    ns, veth, inner = str(net.netns), net.host_veth, f"kubetron{net.index}n"
    # Not `ip netns add`: that turns /run/netns into a bind mount of itself, over the pod
    # namespaces the first node's containerd has mounted there (which then cannot be removed).
    handle = Path(f"/run/netns/{ns}")
    handle.parent.mkdir(parents=True, exist_ok=True)
    handle.touch()
    run("unshare", f"--net={handle}", "true")
    _in_netns(net, "ip", "link", "set", "lo", "up")
    run("ip", "link", "add", veth, "type", "veth", "peer", "name", inner, "netns", ns)
    run("ip", "addr", "add", f"{net.link_host_ip}/30", "dev", veth)
    run("ip", "link", "set", veth, "up")
    _in_netns(net, "ip", "addr", "add", f"{net.ip}/30", "dev", inner)
    _in_netns(net, "ip", "link", "set", inner, "up")
    _in_netns(net, "ip", "link", "add", net.bridge, "type", "bridge")
    _in_netns(net, "ip", "addr", "add", f"{net.gateway}/24", "dev", net.bridge)
    _in_netns(net, "ip", "link", "set", net.bridge, "up")
    # No default route in the namespace: what is not ours has nowhere to go.
    _in_netns(net, "ip", "route", "add", CLUSTER_CIDR, "via", net.link_host_ip)
    _in_netns(net, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    run("ip", "route", "add", net.pod_cidr, "via", net.ip, "dev", veth)
    tag = ["-m", "comment", "--comment", net.comment]
    # Inserted in this order, so the two accepts end first: pod to pod between node 1 and this
    # node; everything else forwarded from or to the link dropped; and the node reaches no host
    # address but the first node's (the API server, CoreDNS) by a connection it opens.
    for rule in (
        ["FORWARD", "-i", veth, *tag, "-j", "DROP"],
        ["FORWARD", "-o", veth, *tag, "-j", "DROP"],
        ["INPUT", "-i", veth, "!", "-d", NODE_IP, "-m", "conntrack", "--ctstate", "NEW", *tag,
         "-j", "DROP"],
        ["FORWARD", "-i", BRIDGE, "-o", veth, "-s", NODE_CIDR, "-d", net.pod_cidr, *tag,
         "-j", "ACCEPT"],
        ["FORWARD", "-i", veth, "-o", BRIDGE, "-s", net.pod_cidr, "-d", NODE_CIDR, *tag,
         "-j", "ACCEPT"],
    ):  # fmt: skip
        run("iptables", "-t", "mangle", "-I", *rule)


def node_network_down(net: NodeNet) -> None:
    """Remove a further node's namespace (its bridge, its end of the veth and every rule its
    kube-proxy made in it go with it), the host's end, route and rules."""
    if net.netns and Path(f"/run/netns/{net.netns}").exists():
        run("ip", "netns", "del", net.netns, check=False)
    if Path(f"/sys/class/net/{net.host_veth}").exists():
        run("ip", "link", "del", net.host_veth, check=False)
    for binary in ("iptables", "ip6tables"):
        if shutil.which(binary):
            _delete_tagged_rules(binary, net.comment)


def network_up() -> None:
    """The bridge, its address, the Service route, forwarding and the rules that fence it."""
    network_down()  # whatever an interrupted earlier run left
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    # Traffic to Service IPs that kube-proxy does not (yet) translate stays on the bridge.
    run("ip", "route", "add", SERVICE_CIDR, "dev", BRIDGE)
    forwarding_on()
    # In the mangle table, which runs before kube-proxy's filter rules (they could accept first):
    # nothing is routed off the bridge or onto it, and pods reach no host address but the
    # node's (the API server and CoreDNS; Service IPs are translated to it before INPUT).
    tag = ["-m", "comment", "--comment", RULE_COMMENT]
    for rule in (
        ["FORWARD", "-i", BRIDGE, "!", "-o", BRIDGE, *tag, "-j", "DROP"],
        ["FORWARD", "-o", BRIDGE, "!", "-i", BRIDGE, *tag, "-j", "DROP"],
        ["INPUT", "-i", BRIDGE, "!", "-d", NODE_IP, *tag, "-j", "DROP"],
    ):
        run("iptables", "-t", "mangle", "-I", *rule)


def forwarding_on(sysctl: Path = IP_FORWARD, saved: Path = SAVED_FORWARD) -> None:
    """IPv4 forwarding on, its earlier value kept in `saved` for `forwarding_restored` (kept
    from the first call: an interrupted run's value is not the host's)."""
    if not saved.exists():
        saved.write_text(sysctl.read_text())
    sysctl.write_text("1\n")


def forwarding_restored(sysctl: Path = IP_FORWARD, saved: Path = SAVED_FORWARD) -> None:
    """IPv4 forwarding as it was before `forwarding_on`, if that ran."""
    if saved.exists():
        sysctl.write_text(saved.read_text())
        saved.unlink()


def _delete_tagged_rules(binary: str, comment: str = RULE_COMMENT) -> None:
    """Rules whose comment contains `comment` (node 1's is in every node's)."""
    for table in ("filter", "nat", "mangle"):
        listing = run(binary, "-t", table, "-S", check=False).stdout.splitlines()
        for line in listing:
            if comment in line and line.startswith("-A "):
                run(binary, "-t", table, "-D", *shlex.split(line)[1:], check=False)


def _delete_kube_chains(binary: str) -> None:
    """kube-proxy's KUBE-* chains (its --cleanup needs ipset, which this machine lacks)."""
    for table in ("filter", "nat", "mangle"):
        listing = run(binary, "-t", table, "-S", check=False).stdout.splitlines()
        for line in listing:  # first the jumps from the built-in chains into kube-proxy's
            parts = shlex.split(line)  # -S quotes comments with spaces
            if line.startswith("-A ") and not parts[1].startswith("KUBE-") and "KUBE-" in line:
                run(binary, "-t", table, "-D", *parts[1:], check=False)
        chains = [ln.split()[1] for ln in listing if ln.startswith("-N KUBE-")]
        for chain in chains:
            run(binary, "-t", table, "-F", chain, check=False)
        for chain in chains:
            run(binary, "-t", table, "-X", chain, check=False)


def network_down() -> None:
    """Remove the bridge (and with it its address and route), our rules and kube-proxy's, and
    every further node's network."""
    for net in NodeNet.found(None):
        node_network_down(net)
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        run("ip", "link", "del", BRIDGE, check=False)
    for binary in ("iptables", "ip6tables"):
        if shutil.which(binary):
            _delete_tagged_rules(binary)
            _delete_kube_chains(binary)
    forwarding_restored()


# --------------------------------------------------------------------------- cleanup by search


def _mounts_under(roots: list[Path]) -> list[str]:
    """Mount points at or below `roots`, deepest first."""
    prefixes = {str(r) + "/" for r in roots} | {str(r.resolve()) + "/" for r in roots if r.exists()}
    found = set()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if any((target + "/").startswith(p) for p in prefixes):
            found.add(target)
    return sorted(found, key=len, reverse=True)


def unmount_under(roots: list[Path]) -> None:
    """Unmount everything mounted below `roots`, deepest first (lazily, if busy)."""
    for _ in range(3):
        targets = _mounts_under(roots)
        if not targets:
            return
        for target in targets:
            if run("umount", target, check=False).returncode != 0:
                run("umount", "-l", target, check=False)


def kill_processes_mentioning(needle: str) -> None:
    """SIGKILL processes whose command line contains `needle` (our socket or directory)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), 9)


def create_cgroups(root_name: str = CGROUP_ROOT) -> None:
    """kubelet's cgroupRoot must exist in every cgroup v1 hierarchy before it starts."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, target, fstype, *_ = line.split()
        if fstype != "cgroup":
            continue
        root = Path(target) / root_name
        root.mkdir(exist_ok=True)
        if (root / "cpuset.cpus").exists():  # a v1 cpuset starts empty: inherit the parent's
            for name in ("cpuset.cpus", "cpuset.mems"):
                (root / name).write_text((Path(target) / name).read_text())


def kill_cgroup_processes(root_name: str = CGROUP_ROOT) -> None:
    """SIGKILL every process left in the node's cgroups: container processes whose shim died
    first (a crashed run) mention nothing of the node on their command line."""
    base = Path("/sys/fs/cgroup")
    pids: set[int] = set()
    for hierarchy in base.iterdir() if base.exists() else []:
        for procs in (hierarchy / root_name).rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(line) for line in procs.read_text().split()}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def remove_cgroups(root_name: str = CGROUP_ROOT) -> None:
    """Remove /sys/fs/cgroup/<controller>/<root_name> trees, deepest first (procs killed
    before)."""
    kill_cgroup_processes(root_name)
    base = Path("/sys/fs/cgroup")
    for hierarchy in base.iterdir() if base.exists() else []:
        root = hierarchy / root_name
        if not root.is_dir():
            continue
        dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, root]:
            for _ in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # processes still exiting
                    time.sleep(0.1)


def _pod_netns_in(name: str, cidr: str) -> bool:
    """Whether the pod namespace `name` holds an address of `cidr` (a /24: compared by prefix)."""
    out = run("ip", "-n", name, "-4", "-o", "addr", "show", check=False).stdout
    prefix = cidr.rsplit(".", 1)[0] + "."
    return any(part.startswith(prefix) for part in out.split())


def remove_netns(prefix: str = "cni-", cidr: str | None = None) -> None:
    """Network namespaces the CRI made for pods (their veths go with them); with `cidr`, only
    those of the pods of that range (one further node's)."""
    netns_dir = Path("/run/netns")
    if not netns_dir.is_dir():
        return
    for ns in netns_dir.iterdir():
        if ns.name.startswith(prefix) and (cidr is None or _pod_netns_in(ns.name, cidr)):
            run("ip", "netns", "del", ns.name, check=False)
            with contextlib.suppress(OSError):
                run("umount", "-l", str(ns), check=False)
                ns.unlink()


# --------------------------------------------------------------------------- one per machine

OWNER_FILE = Path("/run/kubetron-node")


def _alive(workdir: Path, node: str = "node/") -> bool:
    """Whether a process of the first node (or with `node` "", of any) of `workdir` runs."""
    needle = f"{workdir}/{node}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    return True
    return False


def node_owner() -> str | None:
    """The workdir of the cluster whose real node runs on this machine, or None.

    A node left by a crashed run (its processes gone) is cleaned up here instead.
    """
    try:
        workdir = Path(OWNER_FILE.read_text().strip())
    except FileNotFoundError:
        workdir = None
    if workdir is not None and _alive(workdir):
        return str(workdir)
    if workdir is not None:
        teardown(workdir, containerd_root=None, stop=lambda name: None)
    network_down()
    OWNER_FILE.unlink(missing_ok=True)
    return None


def claim_node(workdir: Path) -> None:
    OWNER_FILE.write_text(f"{workdir}\n")


def release_node(workdir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if OWNER_FILE.read_text().strip() == str(workdir):
            OWNER_FILE.unlink()


def stop_containers(socket_path: Path) -> None:
    """With containerd still up: kill and remove every pod container and sandbox."""

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return ctr(socket_path, *args, check=False, timeout=20)

    if not socket_path.exists():
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        tasks = call("tasks", "ls", "-q").stdout.split()
        for task in tasks:
            call("tasks", "kill", "-a", "-s", "SIGKILL", task)
        deadline = time.monotonic() + 10
        for task in tasks:
            while time.monotonic() < deadline:
                rm = call("tasks", "rm", "-f", task)
                if rm.returncode == 0 or "not found" in rm.stderr:
                    break
                time.sleep(0.2)
        for container in call("containers", "ls", "-q").stdout.split():
            call("containers", "rm", container)


def leftovers(workdir: Path | None = None) -> list[str]:
    """What the nodes (of `workdir`, or any) left on this machine; [] after a clean teardown."""
    found = [f"interface {n.name}" for n in Path("/sys/class/net").iterdir()
             if n.name.startswith("kubetron")]  # fmt: skip
    for binary in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            rules = run(binary, "-t", table, "-S", check=False).stdout
            found += [f"{binary} -t {table} {ln}" for ln in rules.splitlines()
                      if RULE_COMMENT in ln or "KUBE-" in ln]  # fmt: skip
    base = Path("/sys/fs/cgroup")
    found += [f"cgroup {c}" for h in base.iterdir() for c in h.glob(f"{CGROUP_ROOT}*")]
    netns = Path("/run/netns")
    found += [f"netns {n.name}" for n in netns.iterdir()] if netns.is_dir() else []
    if workdir is not None:
        found += [f"mount {m}" for m in _mounts_under([workdir])]
        found += [f"processes of {workdir}" for _ in [0] if _alive(workdir, "")]
    return found


def teardown(workdir: Path, containerd_root: Path | None, stop: Callable[[str], None]) -> None:
    """Remove everything the real nodes of `workdir` made; safe after a crash or a partial start.

    `stop(name)` stops one recorded process (the control plane's Component.stop); what survives that
    is found by its command line. `containerd_root` None: the containerd roots are left alone.
    """
    for net in NodeNet.found(workdir):
        teardown_node(workdir, net, containerd_root is not None, stop)
    teardown_node(workdir, NodeNet(), containerd_root is not None, stop)


def teardown_node(
    workdir: Path, net: NodeNet, unmount_root: bool, stop: Callable[[str], None]
) -> None:
    """Remove what one node made: its processes, containers, pods' namespaces, mounts, cgroups
    and network (node 1's removal removes every node's rules and kube-proxy's host chains)."""
    node_dir = net.dir(workdir)
    socket_path = node_dir / "containerd" / "containerd.sock"
    for name in ("coredns", "kube-proxy", "kubelet"):
        stop(net.component(name))
    stop_containers(socket_path)
    stop(net.component("containerd"))
    kill_processes_mentioning(str(socket_path))  # shims, if containerd died first
    kill_processes_mentioning(str(node_dir) + "/")
    time.sleep(0.3)
    remove_netns(cidr=None if net.first else net.pod_cidr)
    unmount_under([node_dir] + ([node_containerd_root(net.index)] if unmount_root else []))
    remove_cgroups(net.cgroup_root)
    if net.first:
        network_down()
    else:
        node_network_down(net)
