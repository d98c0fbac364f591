"""The detached dev cluster of `make cluster-up` and `make demo`: started, found again, stopped.

`up` starts a cluster whose processes outlive this Python process and records them in a state
file ($KUBETRON_CACHE/cluster/state.json); `down` (any later process) stops what it recorded,
also after a crash; `running_cluster()` re-attaches to it. A file lock serialises concurrent
`up`/`down` callers sharing one $KUBETRON_CACHE.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from devtools.cluster.config import ClusterConfig
from devtools.cluster.control_plane import Cluster
from devtools.cluster.node import missing_prerequisites
from devtools.cluster.paths import cache_dir, default_bin_dir, state_file


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


def cmd_up(real_node: bool | None = None, nodes: int = 1) -> int:
    up(real_node, nodes)
    return 0


def up(real_node: bool | None = None, nodes: int = 1) -> Cluster:
    """Start the detached cluster (or return the one already up). `real_node`: None means "when
    this machine can run one"; True fails with what is missing; False never starts one.
    `nodes`: how many real nodes (when there are any)."""
    with _state_lock():
        return _up(real_node, nodes)


def _same_setup(running: Cluster, real_node: bool | None, nodes: int) -> bool:
    if real_node is None or real_node == running.config.real_node:
        return not running.config.real_node or running.config.real_nodes == nodes
    return False


def _up(real_node: bool | None, nodes: int) -> Cluster:
    running = running_cluster()
    if running is not None and _same_setup(running, real_node, nodes):
        print(f"already up; state: {state_file()}", file=sys.stderr)
        for real in running.real_nodes:  # images rebuilt since it started
            imported = real.import_images()
            if imported:
                print(f"{real.name}: imported rebuilt images: {', '.join(imported)}",
                      file=sys.stderr)  # fmt: skip
        print(running.kubeconfig)
        return running
    if running is not None:
        print("the running cluster has a different node setup; restarting it", file=sys.stderr)
        _down()
    if real_node is None:
        real_node = not missing_prerequisites(default_bin_dir(), cache_dir())
    if _read_state() is not None:
        _down()  # a half-dead earlier cluster: clean it up first
    # `timeout make cluster-up` sends SIGTERM: clean up instead of leaving processes behind.
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    started = time.monotonic()
    try:
        # No kubetron CRD: `make demo` installs it with the chart, as a user does.
        config = ClusterConfig(real_node=real_node, real_nodes=nodes)
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


def cmd_down_before_tests() -> int:
    """Stop the cluster `make demo` or `make cluster-up` left running, saying so; silent when
    there is none. The tests start their own cluster: one real node fits a machine, and the
    detached cluster's files outside its temp dir (the training-operator's certificate) would
    be removed under the tests' cluster when it stopped later."""
    with _state_lock():
        if _read_state() is None:
            return 0
        print(
            "run-tests: stopping the cluster that `make demo` or `make cluster-up` left running "
            f"({state_file()}) before the tests start their own; `make demo` starts it again",
            flush=True,
        )
        return _down()


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
