"""What the real node changes on this machine, and how it is all found and removed again.

The node's network (bridge kubetron0, its address, the Service route, iptables rules tagged with
a comment, kube-proxy's chains), its cgroups under /kubetron, the mounts below its directories,
the pods' network namespaces and the owner file are machine-wide: one real node per machine.

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
from pathlib import Path

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


def network_up() -> None:
    """The bridge, its address, the Service route, forwarding and the rules that fence it."""
    network_down()  # whatever an interrupted earlier run left
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    # Traffic to Service IPs that kube-proxy does not (yet) translate stays on the bridge.
    run("ip", "route", "add", SERVICE_CIDR, "dev", BRIDGE)
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
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


def _delete_tagged_rules(binary: str) -> None:
    for table in ("filter", "nat", "mangle"):
        listing = run(binary, "-t", table, "-S", check=False).stdout.splitlines()
        for line in listing:
            if RULE_COMMENT in line and line.startswith("-A "):
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
    """Remove the bridge (and with it its address and route), our rules and kube-proxy's."""
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        run("ip", "link", "del", BRIDGE, check=False)
    for binary in ("iptables", "ip6tables"):
        if shutil.which(binary):
            _delete_tagged_rules(binary)
            _delete_kube_chains(binary)


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


def create_cgroups() -> None:
    """kubelet's cgroupRoot must exist in every cgroup v1 hierarchy before it starts."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, target, fstype, *_ = line.split()
        if fstype != "cgroup":
            continue
        root = Path(target) / CGROUP_ROOT
        root.mkdir(exist_ok=True)
        if (root / "cpuset.cpus").exists():  # a v1 cpuset starts empty: inherit the parent's
            for name in ("cpuset.cpus", "cpuset.mems"):
                (root / name).write_text((Path(target) / name).read_text())


def kill_cgroup_processes() -> None:
    """SIGKILL every process left in the node's cgroups: container processes whose shim died
    first (a crashed run) mention nothing of the node on their command line."""
    base = Path("/sys/fs/cgroup")
    pids: set[int] = set()
    for hierarchy in base.iterdir() if base.exists() else []:
        for procs in (hierarchy / CGROUP_ROOT).rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(line) for line in procs.read_text().split()}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def remove_cgroups() -> None:
    """Remove /sys/fs/cgroup/<controller>/kubetron trees, deepest first (procs killed before)."""
    kill_cgroup_processes()
    base = Path("/sys/fs/cgroup")
    for hierarchy in base.iterdir() if base.exists() else []:
        root = hierarchy / CGROUP_ROOT
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


def remove_netns(prefix: str = "cni-") -> None:
    """Network namespaces the CRI made for pods (their veths go with them)."""
    netns_dir = Path("/run/netns")
    if not netns_dir.is_dir():
        return
    for ns in netns_dir.iterdir():
        if ns.name.startswith(prefix):
            run("ip", "netns", "del", ns.name, check=False)
            with contextlib.suppress(OSError):
                run("umount", "-l", str(ns), check=False)
                ns.unlink()


# --------------------------------------------------------------------------- one per machine

OWNER_FILE = Path("/run/kubetron-node")


def _alive(workdir: Path) -> bool:
    needle = f"{workdir}/node/".encode()
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
    """What a node (of `workdir`, or any) left on this machine; [] after a clean teardown."""
    found = []
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        found.append(f"interface {BRIDGE}")
    for binary in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            rules = run(binary, "-t", table, "-S", check=False).stdout
            found += [f"{binary} -t {table} {ln}" for ln in rules.splitlines()
                      if RULE_COMMENT in ln or "KUBE-" in ln]  # fmt: skip
    base = Path("/sys/fs/cgroup")
    found += [f"cgroup {h / CGROUP_ROOT}" for h in base.iterdir() if (h / CGROUP_ROOT).exists()]
    netns = Path("/run/netns")
    found += [f"netns {n.name}" for n in netns.iterdir()] if netns.is_dir() else []
    if workdir is not None:
        found += [f"mount {m}" for m in _mounts_under([workdir / "node"])]
        if _alive(workdir):
            found.append(f"processes of {workdir}/node")
    return found


def teardown(workdir: Path, containerd_root: Path | None, stop: Callable[[str], None]) -> None:
    """Remove everything a real node of `workdir` made; safe after a crash or a partial start.

    `stop(name)` stops one recorded process (the control plane's Component.stop); what survives that
    is found by its command line.
    """
    node_dir = workdir / "node"
    socket_path = node_dir / "containerd" / "containerd.sock"
    for name in ("coredns", "kube-proxy", "kubelet"):
        stop(name)
    stop_containers(socket_path)
    stop("containerd")
    kill_processes_mentioning(str(socket_path))  # shims, if containerd died first
    kill_processes_mentioning(str(node_dir))
    time.sleep(0.3)
    remove_netns()
    unmount_under([node_dir] + ([containerd_root] if containerd_root else []))
    remove_cgroups()
    network_down()
