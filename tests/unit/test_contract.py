"""The operator and the trainer are two programs over one contract (`kubetron_api`).

Neither imports the other (read from the source, so an import inside a function counts too), and
the contract and the operator import with torch, Megatron and the trainer made unimportable, as
in the operator image.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "kubetron_api": ROOT / "api" / "kubetron_api",
    "kubetron_operator": ROOT / "operator" / "kubetron_operator",
    "kubetron_trainer": ROOT / "trainer" / "kubetron_trainer",
}
# Which project packages each package may import.
ALLOWED = {
    "kubetron_api": {"kubetron_api"},
    "kubetron_operator": {"kubetron_api", "kubetron_operator"},
    "kubetron_trainer": {"kubetron_api", "kubetron_trainer"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every import in one file, wherever in the file it is."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_packages_import_only_the_contract(package: str) -> None:
    wrong = []
    for path in sorted(PACKAGES[package].rglob("*.py")):
        for name in imported_packages(path) & set(PACKAGES):
            if name not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_import_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from kubetron_trainer.loop import train\n    import torch\n")
    assert imported_packages(source) == {"kubetron_trainer", "torch"}


BLOCKER = """
import importlib.abc, pkgutil, sys

BLOCKED = ("torch", "megatron", "kubetron_trainer", "transformer_engine", "liger_kernel")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the operator image has no {name}")
        return None

sys.meta_path.insert(0, Block())
import kubetron_api, kubetron_operator
for pkg in (kubetron_api, kubetron_operator):
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        __import__(mod.name)
        print(mod.name)
try:
    import torch  # noqa: F401
except ImportError:
    print("torch blocked")
"""


def test_contract_and_operator_import_without_torch_or_trainer() -> None:
    out = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    imported = set(out.stdout.split())
    assert "torch" in imported  # the blocker's own "torch blocked" line: the block works
    assert {"kubetron_api.v1alpha1", "kubetron_api.rules", "kubetron_api.ckpt_inspect"} <= imported
    assert {"kubetron_operator.__main__", "kubetron_operator.cli"} <= imported
