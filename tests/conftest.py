"""pytest fixtures for tests that need a real Kubernetes control plane.

Why: kubetron's operator must be tested against a real API server (validation, RBAC, owner
references, garbage collection) and a real Kubeflow training-operator, not against mocks. The
control plane comes from devtools/cluster/ (control_plane.py), built from binaries `make tools`
puts in $KUBETRON_CACHE/bin/<kubernetes version>/.

Fixtures
--------
``cluster`` (session scope) -> ``devtools.cluster.Cluster``, started once per test session:

- ``cluster.kubeconfig: Path`` -- admin kubeconfig (client cert in ``system:masters``).
- ``cluster.server: str`` -- ``https://127.0.0.1:<port>``.
- ``cluster.bin_dir: Path`` -- kubectl, helm, kwok, ... and ``crds/kubeflow.org_pytorchjobs.yaml``.
- ``cluster.kubectl(*args, check=True, input=None, timeout=120) -> CompletedProcess[str]``;
  ``check=True`` raises ``devtools.cluster.ClusterError`` on a non-zero exit.
- ``cluster.apply(manifest)`` -- server-side apply of YAML text, a ``Path``, a dict or a list.
- ``cluster.get(kind, name, namespace=None) -> dict | None`` (None when NotFound).
- ``cluster.api_client() -> kubernetes.client.ApiClient`` for the admin kubeconfig; close it
  (``with cluster.api_client() as api: ...``).
- ``cluster.wait_for(predicate, timeout=..., what=..., interval=0.2)`` -- polls until the
  predicate returns something truthy (returned); raises ``ClusterError`` on timeout or as soon
  as a control-plane process dies. ``devtools.cluster.wait_until`` is the same without that check.
- ``cluster.start_training_operator()`` / ``cluster.stop_training_operator()`` -- it runs by
  default (PyTorchJob controller only, no webhook); the PyTorchJob CRD is installed.
- ``cluster.install_crds(paths)`` -- server-side apply CRD files, wait until Established.
  kubetron's own CRDs (manifests/crds/*.yaml) are already installed by the fixture, before the
  controller-manager starts: its garbage collector only notices CRDs installed later at its next
  30 s resync, so owner-reference cleanup of their objects could lag by up to 30 s.
- ``cluster.node_names()`` -- the fake GPU nodes (``kwok-gpu-<i>``, 2 by default).
- ``cluster.logs(name)`` / ``cluster.tails()`` -- component logs (etcd, kube-apiserver,
  kube-controller-manager, kube-scheduler, kwok, training-operator).

``namespace`` (function scope) -> ``str``: a fresh namespace for one test, deleted afterwards.

Real node: when this machine can run one (root, `make tools`, `make images`; see
``devtools/cluster/node.py``), the session's cluster also has a real worker node
``kubetron-node`` (label ``kubetron.io/real-node=true``) whose pods run for real, from the images
``make images`` built; ``cluster.node`` is then a ``devtools.cluster.node.RealNode`` (else None,
and the e2e tests skip, or fail when $CI is set). ``KUBETRON_REAL_NODE=0`` turns it off.

Fake GPU nodes: capacity ``nvidia.com/gpu: 8``, labels ``kubetron.io/fake-gpu=true`` and
``nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3``, taint ``kwok.x-k8s.io/node=fake:NoSchedule``.
Pods reach them with ``devtools.cluster.FAKE_NODE_SELECTOR`` and ``FAKE_NODE_TOLERATIONS``. kwok
marks a bound pod Running; with the pod annotation ``kwok.kubetron.io/complete-after: "3s"`` it
then ends after that delay with exit code ``kwok.kubetron.io/exit-code`` (default "0";
non-zero makes the pod Failed). See devtools/cluster/kwok_stages.yaml.

This conftest sits at the top of tests/, so every test directory shares one control plane per
session. Mark such tests ``@pytest.mark.cluster``.

Missing binaries: the tests skip with the reason on a dev box, but fail when $CI is set
(``make test`` runs ``make tools`` first, so CI never lacks them).
Set ``KUBETRON_REUSE_CLUSTER=1`` to run against a cluster started by
``python -m devtools.cluster up`` instead of starting a new one (it is left running).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Iterator

import pytest

from devtools.cluster import (
    KUBETRON_CRDS,
    Cluster,
    ClusterConfig,
    ClusterError,
    cache_dir,
    default_bin_dir,
    host,
    missing_tools,
    node,
    running_cluster,
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def real_node_missing() -> list[str]:
    """Why the session's cluster has no real node ([] when it has one)."""
    if os.environ.get("KUBETRON_REAL_NODE", "1") == "0":
        return ["KUBETRON_REAL_NODE=0"]
    return node.missing_prerequisites(default_bin_dir(), cache_dir())


def _require_tools() -> None:
    """Skip (dev box) or fail (CI) when `make tools` has not built the binaries."""
    bin_dir = default_bin_dir()
    missing = missing_tools(bin_dir)
    if not missing:
        return
    reason = f"control-plane tools missing in {bin_dir}: {', '.join(missing)}; run `make tools`"
    if _in_ci():
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A running control plane shared by the session; see the module docstring for its API."""
    if os.environ.get("KUBETRON_REUSE_CLUSTER"):
        existing = running_cluster()
        if existing is None:
            pytest.fail("KUBETRON_REUSE_CLUSTER is set but no cluster is up (devtools.cluster up)")
        yield existing
        return
    _require_tools()
    config = ClusterConfig(crds=[str(p) for p in KUBETRON_CRDS], real_node=not real_node_missing())
    started = Cluster.start(config)
    try:
        yield started
    finally:
        started.stop()
    if config.real_node:  # teardown is tested on every run that had a real node
        left = host.leftovers(started.workdir)
        assert not left, f"the real node's teardown left: {left}"


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test; deleted (without waiting) afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    cluster.wait_for(
        lambda: cluster.get("serviceaccount", "default", name),
        timeout=30,
        what=f"ServiceAccount default in {name}",
    )
    yield name
    try:
        cluster.kubectl("delete", "namespace", name, "--wait=false")
    except ClusterError as err:  # a dead cluster already failed the test
        print(f"namespace cleanup failed: {err}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failed cluster test, attach the tail of each component's log to the report."""
    report = yield
    running = getattr(item, "funcargs", {}).get("cluster")
    if report.failed and isinstance(running, Cluster):
        report.sections.append(("control-plane logs (tails)", running.tails()))
    return report


# kubetron's own fixtures (CRD + RBAC installed, operator processes), shared by cluster tests.
from tests.cluster.kubetron_fixtures import (  # noqa: E402
    kubetron,
    operator_kubeconfig,
    start_operator,
)

__all__ = ["cluster", "kubetron", "namespace", "operator_kubeconfig", "start_operator"]
