"""The e2e tier: tests whose pods run for real, on the session cluster's real node.

Every test here needs the session's ``cluster`` to have a real node (``cluster.node``). When it
has none, they skip with the reason on a dev box and fail when $CI is set (CI runs as root
after ``make tools images``, so it always has one).
"""

from __future__ import annotations

import os

import pytest

from devtools.cluster import Cluster
from tests.conftest import real_node_missing


@pytest.fixture(scope="session", autouse=True)
def _require_real_node(cluster: Cluster) -> None:
    if cluster.node is not None:
        return
    reason = "no real node: " + "; ".join(real_node_missing() or ["the cluster started without"])
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)")
    pytest.skip(reason)
