"""Run the pinned `helm` (built by `make tools`) on charts/kubetron and parse what it renders.

The chart tests need the real helm binary: its template engine, `lint --strict` and the JSON
schema check of values.schema.json are what users run. Without the binary the tests skip on a
dev box and fail in CI, like the cluster tests.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.cluster import REPO_ROOT, default_bin_dir, read_versions

CHART = REPO_ROOT / "charts" / "kubetron"
CI_VALUES = CHART / "ci" / "ci-values.yaml"
# Offline renders assume the Kubernetes version the test cluster runs (hack/versions.env), not
# whatever default the helm binary was linked with.
KUBE_VERSION = read_versions()["KUBERNETES_VERSION"]

Obj = dict[str, Any]


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `3e-05` (no dot) is a string; helm and the API server read it
    as the number it is (YAML 1.2). Parse helm's output the way the API server does."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def load_all(text: str) -> list[Obj]:
    """The documents of a multi-document YAML stream, empty ones dropped."""
    return [doc for doc in yaml.load_all(text, Loader=Yaml12Loader) if doc]


def helm_binary() -> Path:
    """$KUBETRON_HELM, else the helm that `make tools` builds next to kubectl."""
    override = os.environ.get("KUBETRON_HELM")
    return Path(override) if override else default_bin_dir() / "helm"


def require_helm() -> Path:
    path = helm_binary()
    if path.is_file():
        return path
    reason = f"helm missing at {path}; run `make tools`"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)")
    pytest.skip(reason)


def run_helm(*args: str, check: bool = True, env: Mapping[str, str] | None = None) -> Any:
    """`helm ARGS`; returns the CompletedProcess. check=True fails with helm's stderr."""
    proc = subprocess.run(
        [str(require_helm()), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def value_args(values: Iterable[Path] = (), sets: Mapping[str, str] | None = None) -> list[str]:
    args: list[str] = []
    for path in values:
        args += ["--values", str(path)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def template_text(
    values: Iterable[Path] = (),
    sets: Mapping[str, str] | None = None,
    release: str = "kubetron",
    namespace: str = "kubetron-system",
) -> str:
    args = ["template", release, str(CHART), "--namespace", namespace]
    args += ["--kube-version", KUBE_VERSION]
    return str(run_helm(*args, *value_args(values, sets)).stdout)


def template(
    values: Iterable[Path] = (),
    sets: Mapping[str, str] | None = None,
    release: str = "kubetron",
    namespace: str = "kubetron-system",
) -> list[Obj]:
    """The rendered objects (empty documents dropped)."""
    return load_all(template_text(values, sets, release, namespace))


def template_error(
    values: Iterable[Path] = (), sets: Mapping[str, str] | None = None, release: str = "kubetron"
) -> str:
    """helm template that must fail; returns its stderr."""
    args = ["template", release, str(CHART), "--kube-version", KUBE_VERSION]
    args += value_args(values, sets)
    proc = run_helm(*args, check=False)
    assert proc.returncode != 0, f"helm template unexpectedly succeeded:\n{proc.stdout[:2000]}"
    return str(proc.stderr)


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]
