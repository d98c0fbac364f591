"""A few steady-state steps under `torch.profiler`: GPU time by kernel family, per rank.

`kubetron-train --profile-steps START:COUNT --profile-out DIR` profiles optimizer steps
START+1 .. START+COUNT (after START unprofiled steps) and each rank writes
DIR/profile_rank<R>.json: the time of every kernel family per step, the top kernels, and the
kernels' timeline folded into busy time (any kernel running), compute (a non-communication
kernel running), communication overlapped with compute and communication exposed (only a
collective or p2p kernel running), and idle (no kernel running: launch gaps, host work,
pipeline bubbles, waits for the peer). The folding and the family names are pure functions of
(name, start, end), tested on the CPU (tests/unit/test_profiling.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMM = "nccl"  # every communication family starts with this
# (family, substrings of the lower-cased kernel name), first match wins: the order matters
# (a cuDNN attention kernel's name holds "gemm"-like tile words; Adam's multi-tensor kernels and
# the grad-norm's L2 norm hold "norm").
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("nccl:all_gather", ("allgather", "all_gather")),
    ("nccl:reduce_scatter", ("reducescatter", "reduce_scatter")),
    ("nccl:all_reduce", ("allreduce", "all_reduce")),
    ("nccl:p2p", ("sendrecv", "nccldevkernel_send", "nccldevkernel_recv", "ncclkernel_send")),
    ("nccl:other", ("nccl",)),
    ("attention", ("sdpa", "flash", "fmha", "attention", "attn")),
    ("optimizer", ("multi_tensor_apply", "adam", "l2norm", "foreach")),
    ("gemm", ("nvjet", "gemm", "xmma", "cutlass", "cublas", "sm90_", "sm80_", "wgmma")),
    ("cross_entropy", ("cross_entropy", "crossentropy", "log_softmax", "softmax", "nll_loss")),
    ("norm", ("rms_norm", "rmsnorm", "layer_norm", "layernorm", "gammabeta", "_norm_")),
    ("rope", ("rope", "rotary")),
    ("activation", ("swiglu", "silu", "geglu", "gelu")),
    ("copy", ("memcpy", "memset", "copy_kernel", "catarraybatchedcopy")),
)
OTHER = "elementwise/other"


def kernel_family(name: str) -> str:
    """The family of a GPU kernel (or memcpy/memset) by its name."""
    k = name.lower()
    for fam, needles in _RULES:
        if any(n in k for n in needles):
            return fam
    return OTHER


@dataclass(frozen=True)
class Kernel:
    name: str
    start_us: float
    end_us: float


def _union(spans: Iterable[tuple[float, float]]) -> float:
    """Total length covered by the (start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(spans):
        if cur_e is None or s > cur_e:
            if cur_e is not None and cur_s is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    if cur_e is not None and cur_s is not None:
        total += cur_e - cur_s
    return total


def summarize(kernels: Sequence[Kernel], steps: int, top: int = 25) -> dict[str, Any]:
    """Per-step milliseconds: families (kernel time summed, overlapping kernels each counted),
    the timeline (span from the first kernel's start to the last one's end) split into
    compute, exposed communication and idle, and the `top` kernels by time."""
    if not kernels or steps < 1:
        return {"kernels": 0}
    per = 1e3 * steps
    fams: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for k in kernels:
        d = k.end_us - k.start_us
        fam = kernel_family(k.name)
        fams[fam] = fams.get(fam, 0.0) + d
        entry = by_name.setdefault(k.name, [0.0, 0])
        entry[0] += d
        entry[1] += 1
    span = max(k.end_us for k in kernels) - min(k.start_us for k in kernels)
    busy = _union((k.start_us, k.end_us) for k in kernels)
    compute = _union(
        (k.start_us, k.end_us) for k in kernels if not kernel_family(k.name).startswith(COMM)
    )
    comm = _union((k.start_us, k.end_us) for k in kernels if kernel_family(k.name).startswith(COMM))
    total = sum(fams.values())
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "kernels": len(kernels),
        "span_ms_per_step": round(span / per, 2),
        "timeline_ms_per_step": {
            "compute": round(compute / per, 2),
            "communication_overlapped": round((comm - (busy - compute)) / per, 2),
            "communication_exposed": round((busy - compute) / per, 2),
            "idle": round((span - busy) / per, 2),
        },
        "timeline_share": {
            "compute": round(compute / span, 4) if span else None,
            "communication_exposed": round((busy - compute) / span, 4) if span else None,
            "idle": round((span - busy) / span, 4) if span else None,
        },
        "kernel_ms_per_step": round(total / per, 2),
        "families_ms_per_step": {
            f: round(v / per, 2) for f, v in sorted(fams.items(), key=lambda kv: -kv[1])
        },
        "top_kernels": [
            {
                "kernel": name[:160],
                "family": kernel_family(name),
                "ms_per_step": round(t / per, 3),
                "calls_per_step": round(n / steps, 1),
                "share": round(t / total, 4) if total else None,
            }
            for name, (t, n) in ranked
        ],
    }


def parse_window(text: str) -> tuple[int, int]:
    """`START:COUNT` (steps to run before profiling, steps to profile)."""
    start, sep, count = text.partition(":")
    try:
        window = int(start), int(count) if sep else 1
    except ValueError:
        raise ValueError(f"--profile-steps {text!r}: expected START:COUNT, e.g. 3:2") from None
    if window[0] < 0 or window[1] < 1:
        raise ValueError(f"--profile-steps {text!r}: START >= 0 and COUNT >= 1")
    return window


class StepProfiler:
    """Wraps steps [start, start + count) (0-based loop indices) of this process in
    `torch.profiler` and writes `out/profile_rank<rank>.json` after the last of them."""

    def __init__(self, window: tuple[int, int], out: Path, rank: int, device: Any) -> None:
        self.start, self.count = window
        self.out, self.rank, self.device = out, rank, device
        self._prof: Any = None
        self._began = 0.0

    def before(self, index: int) -> None:
        if index != self.start:
            return
        from torch.profiler import ProfilerActivity, profile

        # on GPUs the kernels alone (CUPTI): host-side op records would slow the host down by
        # about as much as they explain; KUBETRON_PROFILE_CPU=1 records them too
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities = [ProfilerActivity.CUDA]
            if os.environ.get("KUBETRON_PROFILE_CPU") == "1":
                activities.append(ProfilerActivity.CPU)
        self._sync()
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._began = time.perf_counter()

    def after(self, index: int, extra: dict[str, Any] | None = None) -> None:
        if self._prof is None or index != self.start + self.count - 1:
            return
        self._sync()
        wall = time.perf_counter() - self._began
        self._prof.__exit__(None, None, None)
        t0 = time.perf_counter()
        kernels = device_kernels(self._prof)
        report = {
            "rank": self.rank,
            "steps": [self.start + 1, self.start + self.count],
            "wall_ms_per_step": round(wall * 1e3 / self.count, 2),
        } | summarize(kernels, self.count)
        report["summarize_s"] = round(time.perf_counter() - t0, 1)
        report |= extra or {}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"profile_rank{self.rank}.json").write_text(json.dumps(report, indent=1))
        first, last = self.start + 1, self.start + self.count
        log.info("profile of steps %d-%d written to %s", first, last, self.out)
        self._prof = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def device_kernels(prof: Any) -> list[Kernel]:
    """The GPU kernels, memcpys and memsets of a finished profile (user annotations such as
    `ProfilerStep#3` or `Optimizer.step#AdamW.step` also carry GPU time: left out)."""
    import torch

    cuda = torch.autograd.DeviceType.CUDA
    out = []
    for e in prof.events():
        if getattr(e, "device_type", None) != cuda or "#" in e.name:
            continue
        if e.name.startswith(("ProfilerStep", "Optimizer.")):
            continue
        out.append(Kernel(e.name, float(e.time_range.start), float(e.time_range.end)))
    return out
