"""SIGTERM while an asynchronous checkpoint save is still being written (skipped without 2 GPUs).

The pod's SIGTERM (preemption, deletion) reaches the trainer's processes while the forked
writers of `checkpoint.asyncSave` are still writing step 2: at the next step boundary the
trainer completes that save first (its `kubetron.json`, then `latest`), saves the current step
synchronously and exits 143 (retryable). A restart resumes from that last complete checkpoint
and trains on like a run that was never interrupted.
"""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from devtools.training.async_save import ASYNC_ARCH
from devtools.training.gpu import WORLD, trainer_config
from devtools.training.launch import Launch, launch, wait_for_line
from kubetron_api.config import PRESETS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        torch.cuda.device_count() < WORLD,
        reason=f"needs {WORLD} CUDA GPUs, found {torch.cuda.device_count()}",
    ),
]

STEPS, DECAY, EVERY = 200, 200, 2  # the run is stopped long before its last step


def _config(steps: int, ckpt: Path | None, async_save: bool) -> dict[str, Any]:
    arch = PRESETS["qwen3-0.6b"].model_copy(update=ASYNC_ARCH)
    cfg = trainer_config(
        "async-term", arch, "qwen3-0.6b", {}, steps=steps, seq=512, micro_batch=2,
        global_batch=8, lr=3e-3, checkpoint=ckpt, save_interval=EVERY, decay_iters=DECAY,
    )  # fmt: skip
    cfg["checkpoint"]["asyncSave"] = async_save
    return cfg


def _launch(cfg: dict[str, Any], workdir: Path) -> Launch:
    return launch(cfg, workdir, "--device", "cuda", "--attention", "sdpa")


def test_sigterm_during_async_save_completes_it_and_resumes(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    first = _launch(_config(STEPS, ckpt, async_save=True), tmp_path / "first")
    wait_for_line(first, "checkpoint of step 2: writing in the background", timeout=300)
    for proc in first.procs:  # as the kubelet does: every trainer process gets SIGTERM
        proc.send_signal(signal.SIGTERM)
    codes = first.wait(timeout=300)
    log0 = first.output()
    assert codes == [143] * WORLD, log0[-6000:]
    assert "exiting 143 (retryable)" in log0
    # the boundary after the SIGTERM: step 2's background save still pending, completed
    # first; then that step saved synchronously, unless it was a scheduled save's own step
    fenced = re.search(
        r"SIGTERM: completing the background save of step (\d+)(, then saving step (\d+))?", log0
    )
    assert fenced, f"no background save was pending at the SIGTERM:\n{log0[-4000:]}"
    pending = int(fenced.group(1))
    stopped = int(fenced.group(3)) if fenced.group(3) else pending
    assert pending % EVERY == 0 and stopped - pending < EVERY, fenced.group(0)
    assert re.search(
        rf"saved checkpoint of step {pending} to \S+ in [0-9.]+s in the background", log0
    )
    if stopped != pending:
        assert re.search(rf"saved checkpoint of step {stopped} to \S+ in [0-9.]+s \(", log0)
    assert (ckpt / "latest").read_text().strip() == str(stopped)
    for step in sorted({pending, stopped}):
        meta = json.loads((ckpt / f"iter_{step:07d}" / "kubetron.json").read_text())
        assert (meta["step"], meta["consumedSamples"]) == (step, step * 8)

    # the restart resumes the last complete checkpoint; an uninterrupted run beside it
    upto = stopped + 3
    resumed = _launch(_config(upto, ckpt, async_save=True), tmp_path / "resumed")
    plain = _launch(_config(upto, None, async_save=False), tmp_path / "plain")
    assert resumed.wait(timeout=300) == [0] * WORLD, resumed.output()[-6000:]
    assert plain.wait(timeout=300) == [0] * WORLD, plain.output()[-6000:]
    r, p = resumed.result(), plain.result()
    assert r["resumed_from"] == stopped
    assert [s["step"] for s in r["steps"]] == list(range(stopped + 1, upto + 1))
    after = p["steps"][stopped:]
    assert all(math.isfinite(s["loss"]) for s in r["steps"])
    # bf16, the same shape and order of reductions: as devtools/training/async_save.py's run
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(r["steps"], after, strict=True)]
    assert max(diffs) < 1e-3, diffs
