"""Checkpoints at 8B on 2 GPUs: Qwen3-8B DP2, saved and loaded back, timed, every tensor checked.

Qwen3-8B as published, DP2, bf16, distributed optimizer: one training step (so Adam's moments
exist), then in one torchrun process a GPU: a synchronous save, the state wiped and loaded
back (every tensor's checksum compared), the step removed, an asynchronous save while two
more steps train, loaded back and compared again. Each phase's seconds, the bytes written
and each rank's peak host memory (resident set, sampled every 50 ms, its forked writers
counted apart). The checkpoint is 14 bytes a parameter (bf16 weights, fp32 main weights and
two Adam moments): 115 GB for Qwen3-8B, so one at a time, where the most space is free; with
too little space the model keeps fewer layers (recorded). Last, Megatron's own
fully_reshardable state (what the trainer saved before) is built, not written, to record
the host memory it takes.

tests/gpu/test_checkpoint_8b.py checks the run; benchmarks/checkpoint_8b.py records it.

    python -m torch.distributed.run --standalone --nproc-per-node=2 \
        -m devtools.training.checkpoint_8b OUT_DIR [--no-probe]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from devtools.cluster.paths import REPO_ROOT
from devtools.training.gpu import (
    WORLD,
    fresh_dir,
    hung_stacks,
    torchrun_command,
    torchrun_env,
    trainer_config,
)
from kubetron_api.config import PRESETS, TrainerConfig

CKPT8B_PRESET, CKPT8B_SEQ = "qwen3-8b", 1024
CKPT8B_BYTES_PER_PARAM = 14
CKPT8B_DIRS = ("/tmp", "/dev/shm", str(Path.home()), str(REPO_ROOT))


def _rss_kib(pid: int) -> tuple[int, int]:
    """(resident, peak resident) KiB of one process from /proc (0, 0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields.get("VmRSS", "0 kB").split()[0]), int(fields.get("VmHWM", "0 kB").split()[0])


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


class RssSampler:
    """Peak resident memory of this process and of its descendants (the async writer's forked
    processes) while inside, sampled by a thread every `period` seconds."""

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self.peak_self = self.peak_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = os.getpid()
        self.peak_self = max(self.peak_self, _rss_kib(me)[0])
        kids = sum(_rss_kib(k)[0] for k in descendants(me))
        self.peak_children = max(self.peak_children, kids)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict[str, float]:
        return {"peak_rss_gib": self.peak_self / 2**20,
                "peak_children_rss_gib": self.peak_children / 2**20}  # fmt: skip


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mount_of(path: str) -> dict[str, str]:
    """The /proc/mounts entry (longest mount point) that holds `path`."""
    best = {"mount": "/", "fstype": "?"}
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        point = parts[1]
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(
            best["mount"]
        ):
            best = {"mount": point, "fstype": parts[2]}
    return best


def _pick_ckpt_dir(need: int) -> tuple[Path, dict[str, Any]]:
    """The candidate directory on a disk (not memory-backed: a checkpoint written into RAM
    competes with the trainers' own host memory) with the most free space; every candidate's
    numbers and file system recorded."""
    seen: dict[str, dict[str, Any]] = {}
    for d in CKPT8B_DIRS:
        if os.path.isdir(d):
            usage = shutil.disk_usage(d)
            seen[d] = {"free_gib": usage.free / 2**30, "total_gib": usage.total / 2**30,
                       **_mount_of(os.path.realpath(d))}  # fmt: skip
    disks = [d for d in seen if seen[d]["fstype"] not in ("tmpfs", "ramfs")] or list(seen)
    best = max(disks, key=lambda d: seen[d]["free_gib"])
    return Path(best) / "kubetron-ckpt8b", {"candidates": seen, "need_gib": need / 2**30}


def _state_checksums(engine: Any) -> list[float]:
    """Float64 sums of every model weight, fp32 main weight and optimizer moment of this rank."""
    from kubetron_trainer.runtime.optimizer import megatron_optimizers

    sums = [float(p.detach().double().sum()) for m in engine.model for p in m.parameters()]
    for opt in megatron_optimizers(engine.optimizer):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                sums.append(float(p.detach().double().sum()))
                for v in opt.optimizer.state[p].values():
                    if isinstance(v, torch.Tensor) and v.numel() > 1:
                        sums.append(float(v.detach().double().sum()))
    return sums


def _wipe_state(engine: Any) -> None:
    """Zero every weight, main weight and moment: a load must write all of them back."""
    from kubetron_trainer.runtime.optimizer import megatron_optimizers

    with torch.no_grad():
        for m in engine.model:
            for p in m.parameters():
                p.zero_()
        for opt in megatron_optimizers(engine.optimizer):
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    p.zero_()
                    for v in opt.optimizer.state[p].values():
                        if isinstance(v, torch.Tensor) and v.numel() > 1:
                            v.zero_()


@dataclass
class _Rank:
    """One rank's share of the piece: its model, optimizer, data and the report it writes."""

    rank: int
    out_dir: Path
    root: Path
    report: dict[str, Any]
    built: Any
    engine: Any
    scheduler: Any
    batches: Any
    pg: Any
    device: torch.device
    identity: Any

    def flush(self) -> None:
        (self.out_dir / f"rank{self.rank}.json").write_text(json.dumps(self.report))

    def checkpointer(self, async_save: bool) -> Any:
        from kubetron_trainer.runtime import checkpoint as ck

        return ck.Checkpointer(self.root, self.built.chunks, self.engine.optimizer,
                               self.scheduler, self.pg, self.device, self.identity,
                               async_save=async_save)  # fmt: skip

    def timed(self, name: str, fn: Any) -> Any:
        import torch.distributed as dist

        dist.barrier()
        with RssSampler() as rss:
            began = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - began
        dist.barrier()
        self.report["phases"][name] = {"s": seconds, **rss.report()}
        self.flush()
        return out

    def roundtrip(self, name: str, before: list[float]) -> None:
        _wipe_state(self.engine)
        self.timed(f"{name}_load", lambda: self.checkpointer(False).load_latest())
        self.engine.after_load()
        after = _state_checksums(self.engine)
        self.report["phases"][f"{name}_load"]["tensors_compared"] = len(before)
        self.report["phases"][f"{name}_load"]["tensors_differing"] = sum(
            a != b for a, b in zip(before, after, strict=True)
        )
        self.flush()

    def remove(self, path: Path) -> None:
        """Rank 0 removes `path` while the other ranks wait."""
        import torch.distributed as dist

        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(path)
        dist.barrier()

    def sync_phase(self) -> None:
        """A synchronous save of step 1, loaded back."""
        from kubetron_api.ckpt_meta import read_latest
        from kubetron_trainer.runtime import checkpoint as ck

        before = _state_checksums(self.engine)
        self.timed("sync_save", lambda: self.checkpointer(False).save(1, 2))
        phase = self.report["phases"]["sync_save"]
        phase["rank_bytes"] = _dir_bytes(ck.step_dir(self.root, 1))  # the whole step, each rank
        phase["latest"] = read_latest(self.root)
        self.roundtrip("sync", before)
        self.remove(ck.step_dir(self.root, 1))

    def async_phase(self) -> None:
        """An asynchronous save of step 2 while two steps train, then loaded back."""
        import torch.distributed as dist

        from kubetron_api.ckpt_meta import read_latest
        from kubetron_trainer.runtime import checkpoint as ck

        self.engine.step(self.batches.step(1))
        self.scheduler.step(1)
        before = _state_checksums(self.engine)
        asyncer = self.checkpointer(True)
        step_s: list[float] = []
        with RssSampler() as rss:
            dist.barrier()
            began = time.perf_counter()
            blocked = asyncer.save(2, 4)
            for i in (2, 3):
                asyncer.finalize()
                t = time.perf_counter()
                self.engine.step(self.batches.step(i))
                torch.cuda.synchronize()
                step_s.append(time.perf_counter() - t)
            waited = time.perf_counter()
            asyncer.finalize(blocking=True)
            total = time.perf_counter() - began
            waited = time.perf_counter() - waited
            asyncer.close()
        self.report["phases"]["async_save"] = {
            "blocked_s": blocked, "total_s": total, "final_wait_s": waited,
            "step_s_while_writing": step_s, "latest": read_latest(self.root),
            "rank_bytes": _dir_bytes(ck.step_dir(self.root, 2)), **rss.report(),
        }  # fmt: skip
        self.flush()
        # the model and optimizer have moved on two steps: load step 2 back and compare
        self.roundtrip("async", before)
        self.remove(self.root)

    def megatron_probe(self) -> None:
        """Megatron's own fully_reshardable state (gathered on every rank), built, not
        written."""
        from kubetron_trainer.runtime import checkpoint as ck

        meta = {"distrib_optim_sharding_type": "fully_reshardable", "dp_cp_group": self.pg.dp_cp,
                "chained_optim_avoid_prefix": True}  # fmt: skip

        def build() -> None:
            model = {"model": ck.sharded_model_state(self.built.chunks[0], self.pg)}
            state = self.engine.optimizer.sharded_state_dict(model, is_loading=False, metadata=meta)
            del state

        self.report["phases"]["megatron_gather_probe"] = {"started": True}
        self.flush()
        torch.cuda.empty_cache()
        self.timed("megatron_gather_probe", build)


def _setup(topo: Any, out_dir: Path, device: torch.device) -> _Rank:
    """This rank's model (fewer layers where the disk is short of space), trained one step so
    Adam's moments exist, and an empty checkpoint directory."""
    import torch.distributed as dist

    from kubetron_api.ckpt_meta import RunIdentity
    from kubetron_api.config import FastPath
    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.data.batches import build_batches
    from kubetron_trainer.models.build import build_model
    from kubetron_trainer.models.fast_path import decide_fast_path
    from kubetron_trainer.runtime.loop import make_groups
    from kubetron_trainer.runtime.optimizer import build_scheduler
    from kubetron_trainer.runtime.seeding import setup_megatron_globals
    from kubetron_trainer.runtime.step_gpu import GpuEngine

    arch = PRESETS[CKPT8B_PRESET]
    params = 8.19e9 * arch.num_layers / 36 if CKPT8B_PRESET == "qwen3-8b" else 8.03e9
    need = int(params * CKPT8B_BYTES_PER_PARAM * 1.05)
    root, space = _pick_ckpt_dir(need)
    free = space["candidates"][str(root.parent)]["free_gib"] * 2**30
    if free < need:  # fewer layers, recorded
        layers = max(2, int(arch.num_layers * free / need) - 1)
        arch = arch.model_copy(update={"num_layers": layers})
    report: dict[str, Any] = {"rank": topo.rank, "space": space, "dir": str(root),
                              "num_layers": arch.num_layers, "phases": {}}  # fmt: skip
    raw = trainer_config(
        "ckpt8b", arch, CKPT8B_PRESET, {}, steps=4, seq=CKPT8B_SEQ, micro_batch=1,
        global_batch=2, fast_path="on", checkpoint=root, save_interval=100,
    )  # fmt: skip
    cfg = TrainerConfig.model_validate(raw)
    dims = ParallelDims.from_degrees(WORLD)
    pg = make_groups(cfg, dims, topo, "nccl", "decentralized")
    setup_megatron_globals(pg, cfg.recipe.seed)
    t0 = time.perf_counter()
    choice = decide_fast_path(FastPath.parse("on"), cfg, dims, device, "sdpa")
    built = build_model(cfg, dims, pg, device, choice)
    engine = GpuEngine(cfg, built.chunks, pg, fast=choice.fast)
    scheduler = build_scheduler(engine.optimizer, cfg.recipe)
    batches = build_batches(cfg, reads_data=True, dp_rank=pg.dp.rank(), dp_size=pg.dp.size(),
                            device=device)  # fmt: skip
    report["build_s"] = time.perf_counter() - t0
    report["params"] = sum(p.numel() for m in built.chunks for p in m.parameters())
    engine.step(batches.step(0))
    scheduler.step(1)
    torch.cuda.synchronize()
    if topo.rank == 0 and root.exists():
        shutil.rmtree(root)
    dist.barrier()
    identity = RunIdentity.from_config(cfg, dims, built.padded_vocab_size)
    return _Rank(topo.rank, out_dir, root, report, built, engine, scheduler, batches, pg,
                 device, identity)  # fmt: skip


def ckpt8b_worker(out_dir: Path, megatron_probe: bool) -> None:
    """One torchrun process of the 8B checkpoint piece (see CKPT8B_PRESET)."""
    import traceback

    import torch.distributed as dist

    from kubetron_trainer.runtime.parallel import init_distributed
    from kubetron_trainer.runtime.topology import Topology

    topo = Topology.from_env()
    init_distributed(topo, "nccl")
    run = _setup(topo, out_dir, torch.device("cuda", topo.local_rank))
    try:
        run.sync_phase()
        run.async_phase()
        if megatron_probe:
            run.megatron_probe()
    except Exception:
        run.report["error"] = traceback.format_exc()[-4000:]
        run.flush()
        raise
    run.report["done"] = True
    run.flush()
    dist.barrier()
    dist.destroy_process_group()


def _reported_done(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("done"))
    except (OSError, ValueError):  # not there yet, or being written
        return False


def _run_until_reported(
    args: list[str], out: Path, timeout: float, exit_grace: float = 45
) -> tuple[list[dict[str, Any]], str | None, dict[str, Any]]:
    """This module under torchrun (its own process group), one process a GPU, until every rank
    wrote `"done"` to `out/rank<r>.json` and exited. A process left `exit_grace` seconds after
    that (or at `timeout`) gets SIGABRT, so faulthandler prints where each thread is (kept in
    the result), then the whole group is killed."""
    cmd = torchrun_command(__name__, *args)
    env = torchrun_env(PYTHONFAULTHANDLER="1")
    log_path = out / "torchrun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        began, reported_at = time.monotonic(), None
        info: dict[str, Any] = {}
        while proc.poll() is None:
            time.sleep(1)
            files = [out / f"rank{r}.json" for r in range(WORLD)]
            if reported_at is None and all(_reported_done(f) for f in files):
                reported_at = time.monotonic()
            late = reported_at is not None and time.monotonic() - reported_at > exit_grace
            if late or time.monotonic() - began > timeout:
                info["hung_after_report"] = late
                for pid in descendants(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGABRT)
                time.sleep(5)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
    text = log_path.read_text()
    info |= {"returncode": proc.returncode, "exit_s_after_report": (
        time.monotonic() - reported_at if reported_at else None)}  # fmt: skip
    if info.get("hung_after_report") is not None:
        info["stacks"] = hung_stacks(text)
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    failed = None if proc.returncode == 0 else text[-4000:]
    return ranks, failed, info


def ckpt8b_run(workdir: Path, megatron_probe: bool = False) -> dict[str, Any]:
    """One torchrun of `ckpt8b_worker` over both GPUs; both ranks' reports."""
    out = fresh_dir(workdir / "ckpt8b")
    args = [str(out)] + ([] if megatron_probe else ["--no-probe"])
    began = time.perf_counter()
    ranks, failed, exit_info = _run_until_reported(args, out, timeout=450)
    if not ranks:
        raise RuntimeError(failed or "no rank reported")
    report: dict[str, Any] = {
        "preset": CKPT8B_PRESET, "parallelism": "DP2 (data parallel 2)",
        "optimizer": "Megatron distributed optimizer, fully_reshardable format (kubetron's "
                     "gather-free writer), bf16 weights + fp32 main weights and Adam moments",
        "wall_s": time.perf_counter() - began, "error": failed, "exit": exit_info,
        "ranks": ranks,
    }  # fmt: skip
    sync = [r["phases"].get("sync_save") for r in ranks]
    if all(sync) and all("rank_bytes" in x for x in sync):
        size = sync[0]["rank_bytes"]
        report["checkpoint_gb"] = size / 1e9
        for name in ("sync_save", "sync_load", "async_load"):
            secs = [r["phases"][name]["s"] for r in ranks if name in r["phases"]]
            if secs:
                report[f"{name}_gb_per_s"] = size / 1e9 / max(secs)
        asy = [r["phases"].get("async_save") for r in ranks]
        if all(asy) and all("total_s" in a for a in asy):
            report["async_save_total_gb_per_s"] = size / 1e9 / max(a["total_s"] for a in asy)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="each rank writes rank<r>.json here")
    p.add_argument("--no-probe", action="store_true", help="skip Megatron's gathered state")
    args = p.parse_args()
    ckpt8b_worker(args.out, not args.no_probe)


if __name__ == "__main__":
    main()
