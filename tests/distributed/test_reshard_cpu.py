"""Checkpoints resumed into another parallel shape on CPU (gloo, gpt-tiny).

Four uninterrupted runs, DP2, DP4, TP2 x DP2 and TP2, train N steps from the same initial
weights (on CPU Megatron initialises each full weight from the seed and then splits it, so the
start does not depend on the shape) and save at step K and N. Each resume copies one run's
checkpoint with `latest` at K and trains K+1..N in another shape. Its losses must equal, within
float-reduction tolerance, both the uninterrupted run of the new shape (same weights at step 0,
same samples every step: the global batch is fixed) and the old shape's own continuation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devtools.training.launch import Launch, example_config, launch, run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
K, N = 2, 4  # save (and resume) at step K, train to step N
GBS = 8  # the CPU example's global batch
SHAPES = {"DP2": (1, 2), "DP4": (1, 4), "TP2xDP2": (2, 4), "TP2": (2, 2)}  # tensor, world
REL = 1e-4  # losses of different shapes differ by the order of float reductions only


def shape_config(name: str, ckpt: Path) -> dict[str, Any]:
    tensor, world = SHAPES[name]
    cfg = example_config(
        recipe={
            "trainIters": N,
            "logInterval": 1,
            "lrSchedule": {"warmupIters": 1, "decayIters": 20},
        },
        parallelism={"tensor": tensor},
        checkpoint={"path": str(ckpt), "saveInterval": K},
        metrics={"enabled": False},
        worldSize=world,
        gpusPerNode=world,
    )
    cfg["recipe"]["optimizer"]["lr"] = 0.01  # the loss moves well beyond the tolerance
    return cfg


def losses(started: Launch) -> list[float]:
    return [s["loss"] for s in started.result()["steps"]]


def tree_hash(root: Path) -> str:
    """Names, sizes and contents of every file under `root`."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Launch]:
    """The run of one shape (started on first use): N steps, checkpoints at K and N."""
    runs: dict[str, Launch] = {}

    def get(name: str) -> Launch:
        if name not in runs:
            tmp = tmp_path_factory.mktemp(name)
            runs[name] = run(shape_config(name, tmp / "ckpt"), tmp / "run")
            runs[name].ckpt = tmp / "ckpt"  # type: ignore[attr-defined]
        return runs[name]

    return get


def checkpoint_at_k(source: Launch, dest: Path) -> Path:
    """A copy of `source`'s checkpoints as if it had stopped after saving step K."""
    shutil.copytree(source.ckpt, dest)  # type: ignore[attr-defined]
    shutil.rmtree(dest / f"iter_{N:07d}")
    (dest / "latest").write_text(f"{K}\n")
    return dest


@pytest.mark.parametrize(
    ("old", "new"), [("DP2", "DP4"), ("DP4", "DP2"), ("TP2xDP2", "DP4"), ("TP2", "DP2")]
)
def test_resume_in_another_shape_continues_like_an_uninterrupted_run(
    uninterrupted: Callable[[str], Launch], tmp_path: Path, old: str, new: str
) -> None:
    source, reference = uninterrupted(old), uninterrupted(new)
    ckpt = checkpoint_at_k(source, tmp_path / "ckpt")
    resumed = run(shape_config(new, ckpt), tmp_path / "run")
    result = resumed.result()
    assert result["resumed_from"] == K
    assert [s["step"] for s in result["steps"]] == list(range(K + 1, N + 1))
    assert result["first_sample"] == K * GBS  # the data position: consumed samples
    assert result["rng"] == "re-seeded"
    assert "RNG states not loaded (saved by another shape): re-seeded" in resumed.output()
    got = losses(resumed)
    for ref in (reference, source):  # the new shape uninterrupted; the old one continued
        assert got == pytest.approx(losses(ref)[K:], rel=REL), (old, new, losses(ref))
        assert [s["lr"] for s in result["steps"]] == pytest.approx(
            [s["lr"] for s in ref.result()["steps"][K:]], rel=1e-9
        )  # the LR schedule continues
    # Step K's weights were loaded: an untrained model's loss is about ln(512) = 6.24 (step 1's),
    # the resumed run ends far below it (about 0.07, 100 times the tolerance).
    assert losses(reference)[0] - got[-1] > 0.03
    # The resumed run saves step N in its own shape.
    assert (ckpt / "latest").read_text().strip() == str(N)
    meta = json.loads((ckpt / f"iter_{N:07d}" / "kubetron.json").read_text())
    tensor, world = SHAPES[new]
    assert (meta["shape"]["tensor"], meta["shape"]["worldSize"]) == (tensor, world)
    assert meta["consumedSamples"] == N * GBS


def test_resume_of_another_architecture_exits_2_and_changes_nothing(
    uninterrupted: Callable[[str], Launch], tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(uninterrupted("DP2").ckpt, ckpt)  # type: ignore[attr-defined]
    before = tree_hash(ckpt)
    cfg = shape_config("DP2", ckpt)
    cfg["model"]["numLayers"] = 3
    started = launch(cfg, tmp_path / "run")
    codes = started.wait()
    out = started.output()
    assert codes == [2, 2], out[-4000:]
    assert "config field model" in out and "numLayers: checkpoint 2, this job 3" in out
    assert tree_hash(ckpt) == before
