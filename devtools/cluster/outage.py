"""Control-plane outages for the operator's resilience tests.

A real cluster's etcd and kube-apiserver get restarted (upgrades, certificate rotation, a node
reboot) while jobs run; the operator must ride that out. These helpers stop one of the two and
start it again with the same flags and data, and compact etcd so that every resourceVersion a
client watched from before has expired: its next watch is answered 410 Gone.
"""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

from devtools.cluster.base import ClusterBase
from devtools.cluster.waiting import http_get

RESTARTABLE = ("etcd", "kube-apiserver")
# a key outside /registry: the API server never reads it; writing it only advances the revision
SCRATCH_KEY = b"/kubetron-outage/scratch"


@contextlib.contextmanager
def down(cluster: ClusterBase, name: str) -> Iterator[None]:
    """`name` (etcd or kube-apiserver) stopped for the body, then started again with the same
    argv and data directory; returns once the API server is ready again, also when the body
    raised, so that the session's cluster stays usable."""
    if name not in RESTARTABLE:
        raise ValueError(f"{name!r} is none of {RESTARTABLE}")
    # out of `components` while down: `wait_for` fails fast on a dead component
    component = cluster.components.pop(name)
    component.stop()
    try:
        yield
    finally:
        component.start(cluster._env(), cluster.detached)
        cluster.components[name] = component
        cluster.save_state()
        wait_ready(cluster)


def restart(cluster: ClusterBase, name: str) -> None:
    with down(cluster, name):
        pass


def wait_ready(cluster: ClusterBase, timeout: float = 120) -> None:
    """Until kube-apiserver's /readyz (which includes etcd) answers ok."""
    tls = cluster.admin_tls()

    def ready() -> bool:
        try:
            return http_get(f"{cluster.server}/readyz", tls) == "ok"
        except OSError:
            return False

    cluster.wait_for(ready, timeout=timeout, what="kube-apiserver /readyz after a restart")


def _etcd(cluster: ClusterBase, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """One call of etcd's JSON gateway (no etcdctl needed)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{cluster.ports.etcd}/v3/{method}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return dict(json.loads(resp.read()))


def compact_etcd(cluster: ClusterBase) -> int:
    """Advance etcd's revision past every one a client has seen (a scratch key written and
    deleted), then compact at it; returns the compacted revision. A watch from any earlier
    resourceVersion that reaches etcd is refused; one that the API server's watch cache no
    longer covers (after a restart of the API server) is answered 410 Gone as well."""
    key = base64.b64encode(SCRATCH_KEY).decode()
    _etcd(cluster, "kv/put", {"key": key, "value": base64.b64encode(b"x").decode()})
    revision = int(_etcd(cluster, "kv/deleterange", {"key": key})["header"]["revision"])
    _etcd(cluster, "kv/compaction", {"revision": str(revision), "physical": True})
    return revision
