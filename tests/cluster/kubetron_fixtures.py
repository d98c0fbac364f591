"""pytest fixtures that put kubetron itself on the session's control plane: its CRD and RBAC, a
kubeconfig of the operator's ServiceAccount, and operator processes (devtools.cluster.kubetron)
stopped after each test.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.cluster import Cluster
from devtools.cluster.kubetron import OPERATOR_NS, OperatorProcess, install_kubetron


@pytest.fixture(scope="session")
def kubetron(cluster: Cluster) -> Cluster:
    install_kubetron(cluster)
    return cluster


@pytest.fixture(scope="session")
def operator_kubeconfig(kubetron: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig that authenticates as the operator's ServiceAccount (bearer token)."""
    token = kubetron.kubectl(
        "create", "token", "kubetron-operator", "-n", OPERATOR_NS, "--duration=4h"
    ).stdout.strip()
    admin = yaml.safe_load(kubetron.kubeconfig.read_text())
    cfg = copy.deepcopy(admin)
    cfg["users"] = [{"name": "operator", "user": {"token": token}}]
    for ctx in cfg["contexts"]:
        ctx["context"]["user"] = "operator"
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def start_operator(operator_kubeconfig: Path, tmp_path: Path) -> Iterator[Any]:
    """Factory: start_operator(name, *flags) -> OperatorProcess; all stopped after the test."""
    started: list[OperatorProcess] = []

    def start(name: str = "op-0", *extra: str) -> OperatorProcess:
        op = OperatorProcess(operator_kubeconfig, tmp_path, name, *extra)
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
        if os.environ.get("KUBETRON_SHOW_OPERATOR_LOGS"):
            print(op.log())
