"""Asynchronous checkpoint saves in the trainer on 2 GPUs, resumed against an uninterrupted run.

qwen3-0.6b widths, 4 layers, a 4096-token vocabulary, DP2: `checkpoint.asyncSave` saving every
2 steps to step 6 (steps 2 and 4 in the background, 6 at the end synchronously), resumed to
step 8; beside it the same 8 steps uninterrupted without checkpoints. A rank that does not exit
after its work gets SIGABRT, so faulthandler prints where each thread hangs (kept in the
result). tests/gpu/test_checkpoint_8b.py and test_async_sigterm_gpu.py check it;
benchmarks/checkpoint_8b.py records it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from devtools.training.gpu import WORLD, hung_stacks, launch_trainer, trainer_config
from devtools.training.launch import Launch
from kubetron_api.config import PRESETS

ASYNC_ARCH = {"num_layers": 4, "vocab_size": 4096}
ASYNC_STEPS, ASYNC_TO, ASYNC_EVERY = 6, 8, 2


def launch_dumpable(cfg: dict[str, Any], workdir: Path) -> Launch:
    """The trainer (decentralized groups) with faulthandler on: a SIGABRT prints every
    thread's Python stack into the rank's log."""
    return launch_trainer(cfg, workdir, "decentralized", extra_env={"PYTHONFAULTHANDLER": "1"})


def wait_or_dump(started: Launch, timeout: float = 240, exit_grace: float = 30) -> dict[str, Any]:
    """Exit codes of a trainer launch; a rank still running `exit_grace` seconds after rank 0
    logged 'done' (or at `timeout`) gets SIGABRT, and its stacks are kept, then is killed."""
    began, done_at = time.monotonic(), None
    while any(p.poll() is None for p in started.procs):
        time.sleep(0.5)
        if done_at is None and "kubetron_trainer: done:" in started.logs[0].read_text():
            done_at = time.monotonic()
        late = done_at is not None and time.monotonic() - done_at > exit_grace
        if late or time.monotonic() - began > timeout:
            alive = [i for i, p in enumerate(started.procs) if p.poll() is None]
            for i in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(started.procs[i].pid, signal.SIGABRT)
            time.sleep(5)
            for p in started.procs:
                if p.poll() is None:
                    p.kill()
            codes = [p.wait() for p in started.procs]
            stacks = {i: hung_stacks(started.logs[i].read_text()) for i in alive}
            return {"codes": codes, "hung_ranks": alive, "after_done": late, "stacks": stacks}
    exit_s = None if done_at is None else time.monotonic() - done_at
    return {"codes": [p.returncode for p in started.procs], "exit_s_after_done": exit_s}


def async_ckpt_runs(workdir: Path) -> dict[str, Any]:
    """The asyncSave run to ASYNC_STEPS beside an uninterrupted one, then its resume."""
    arch = PRESETS["qwen3-0.6b"].model_copy(update=ASYNC_ARCH)
    base = workdir / "async-ckpt"
    if base.exists():
        shutil.rmtree(base)
    ckpt = base / "ckpt"

    def cfg(steps: int, path: Path | None) -> dict[str, Any]:
        raw = trainer_config(
            "async", arch, "qwen3-0.6b", {}, steps=steps, seq=512, micro_batch=2,
            global_batch=8, lr=3e-3, checkpoint=path, save_interval=ASYNC_EVERY,
            decay_iters=ASYNC_TO,
        )  # fmt: skip
        if path is not None:
            raw["checkpoint"]["asyncSave"] = True
        return raw

    first = launch_dumpable(cfg(ASYNC_STEPS, ckpt), base / "async")
    plain = launch_dumpable(cfg(ASYNC_TO, None), base / "plain")
    exits = {"async": wait_or_dump(first), "plain": wait_or_dump(plain)}
    if exits["async"]["codes"] != [0] * WORLD or exits["plain"]["codes"] != [0] * WORLD:
        raise RuntimeError(f"async save runs: {json.dumps(exits)[-6000:]}")
    a, p = first.result(), plain.result()
    log0 = first.logs[0].read_text()
    latest_after_first = (ckpt / "latest").read_text().strip()
    resumed = launch_dumpable(cfg(ASYNC_TO, ckpt), base / "resume")
    exits["resume"] = wait_or_dump(resumed)
    if exits["resume"]["codes"] != [0] * WORLD:
        raise RuntimeError(f"resume of the async checkpoint: {json.dumps(exits)[-6000:]}")
    r = resumed.result()
    background = re.findall(r"checkpoint of step (\d+): writing in the background", log0)
    finalized = re.findall(r"saved checkpoint of step (\d+) to \S+ in ([0-9.]+)s in the "
                           r"background \(training waited ([0-9.]+)s", log0)  # fmt: skip
    synced = re.findall(r"saved checkpoint of step (\d+) to \S+ in ([0-9.]+)s \(", log0)
    metas = sorted(int(m.parent.name.split("_")[1]) for m in ckpt.glob("iter_*/kubetron.json"))
    after = p["steps"][ASYNC_STEPS:]
    return {
        "arch": "qwen3-0.6b widths, " + ", ".join(f"{k}={v}" for k, v in ASYNC_ARCH.items()),
        "parallelism": "DP2", "save_interval": ASYNC_EVERY,
        "first_run_steps": ASYNC_STEPS, "resumed_to": ASYNC_TO,
        "background_saves": [int(x) for x in background],
        "finalized_background": [
            {"step": int(st), "total_s": float(t), "training_waited_s": float(w)}
            for st, t, w in finalized
        ],
        "synchronous_saves": [{"step": int(st), "s": float(t)} for st, t in synced],
        "latest_after_first_run": latest_after_first,
        "steps_with_kubetron_json": metas,
        "resumed_from": r["resumed_from"],
        "losses_first": [x["loss"] for x in a["steps"]],
        "losses_resumed": [x["loss"] for x in r["steps"]],
        "losses_uninterrupted": [x["loss"] for x in p["steps"]],
        "max_abs_loss_diff_resumed_vs_uninterrupted": max(
            abs(x["loss"] - y["loss"]) for x, y in zip(r["steps"], after, strict=True)
        ),
        "first_run_step_s": [x["duration_s"] for x in a["steps"]],
        "exits": exits,
    }  # fmt: skip
