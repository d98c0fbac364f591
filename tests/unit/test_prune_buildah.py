"""hack/prune-buildah.py: which layer-cache images `make images` removes after a build."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "hack" / "prune-buildah.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prune_buildah", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_old_generations_go_and_the_current_chain_stays() -> None:
    garbage = load().garbage
    # base <- deps(old) <- code(old) <- final(old)    base <- deps <- code2 <- final2 (current)
    parents = {
        "L0": None,
        "Ldeps": "L0",
        "Lcode": "Ldeps",
        "Ldeps-old": "L0",
        "Lcode-old": "Ldeps-old",
    }
    images = [
        {"id": "base", "layer": "L0", "names": ["localhost/kubetron/python-base:x"]},
        {"id": "deps", "layer": "Ldeps"},  # reused by the current build: kept
        {"id": "final", "layer": "Lcode"},
        {"id": "deps-old", "layer": "Ldeps-old"},
        {"id": "final-old", "layer": "Lcode-old"},
        {"id": "label-step", "layer": "Lcode"},  # a metadata step on the current top layer
    ]
    labels = {"final": "h-new", "final-old": "h-old", "label-step": ""}
    assert garbage(images, parents, labels, {"h-new"}) == ["deps-old", "final-old"]
    # nothing current in storage (archives built elsewhere): keep everything
    assert garbage(images, parents, labels, {"h-unknown"}) == []
