"""FP8 against bf16 on one Hopper GPU: the trainer's tokens/s, MFU and memory, JSON out.

Runs the real trainer (`python -m kubetron_trainer`, one process, mock data, no checkpoints,
distributed optimizer, fast path on) for each preset at the same tokens per step, in bf16 and
in fp8 (`recipe.precision: fp8`: kubetron's row-wise scaled e4m3 GEMMs, `models/fp8.py`), in
one invocation on the same GPU. MFU is counted against the GPU's dense bf16 peak in both (the
fp8 peak is recorded beside it), so the two MFUs compare like the tokens/s. First, a GEMM
check: whether this torch's `_scaled_mm` takes row-wise scales with a bf16 output, and one
GEMM's time in bf16, in fp8 alone and in fp8 with the quantisation of both operands.

`--curve STEPS` adds a loss-curve comparison: bf16 and fp8 trained for STEPS steps on indexed
text (this Python's standard library sources, byte tokenizer) with the first preset.

    python -m benchmarks.fp8 --output benchmarks/results/fp8.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "trainer"), str(ROOT / "operator")]

from benchmarks.report import machine, versions  # noqa: E402
from devtools.training.launch import launch  # noqa: E402
from kubetron_api.config import PRESETS, RecipeSpec, TrainerConfig  # noqa: E402
from kubetron_trainer.observe.flops import peak_flops  # noqa: E402

WARMUP = 2
FP8_DENSE_PEAK = {"H100": 1979e12, "H200": 1979e12}  # e4m3 dense, SXM (twice bf16's)
GEMM_SHAPE = (4096, 2048, 6144)  # tokens x in-features x out-features
CURVE_FROM, CURVE_WINDOW = 50, 10  # the loss curves must agree within 1% from step 50 on


def gemm_check(repeat: int = 50) -> dict[str, Any]:
    """Row-wise `_scaled_mm` support and one GEMM's time: bf16, fp8, fp8 with quantisation."""
    from kubetron_trainer.models.fp8 import _gemm, _quantiser, fp8_matmul

    m, k, n = GEMM_SHAPE
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    out: dict[str, Any] = {"shape_mkn": [m, k, n]}
    try:
        qx, sx = _quantiser("rows")(x)
        qw, sw = _quantiser("rows")(w)
        y = _gemm(qx, sx, qw, sw)
        ref = x.float() @ w.float().t()
        out["rowwise_scaled_mm"] = True
        out["rel_err_vs_fp32"] = round(float((y.float() - ref).norm() / ref.norm()), 5)
    except RuntimeError as err:
        return out | {"rowwise_scaled_mm": False, "error": str(err)[:500]}
    flops = 2 * m * k * n
    runs = {
        "bf16": lambda: x @ w.t(),
        "fp8_gemm_only": lambda: _gemm(qx, sx, qw, sw),
        "fp8_with_quantisation": lambda: fp8_matmul(x, w),
    }
    for name, fn in runs.items():
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / repeat
        out[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
    return out


def config(
    args: argparse.Namespace, preset: str, precision: str, steps: int, data: dict | None = None
) -> dict[str, Any]:
    micro, global_batch, layers = args.shapes[preset]
    recipe = RecipeSpec.model_validate(
        {
            "trainIters": steps, "globalBatchSize": global_batch, "microBatchSize": micro,
            "seqLength": args.seq, "precision": precision, "fastPath": "on",
            "optimizer": {"distributed": True}, "logInterval": 1,
            "lrSchedule": {"warmupIters": min(20, steps // 10)},
        }
    )  # fmt: skip
    arch = PRESETS[preset]
    if layers:
        arch = arch.model_copy(update={"num_layers": layers})
    cfg = TrainerConfig(job_name="fp8", model=arch, preset=preset, recipe=recipe)
    out = cfg.model_dump(mode="json", by_alias=True)
    out["metrics"]["enabled"] = False
    if data:
        out["data"] = data
    return out


def measure(
    args: argparse.Namespace, preset: str, precision: str, steps: int, data: dict | None = None
) -> dict[str, Any]:
    """One trainer run; a failed one (say, out of memory) is recorded, not raised."""
    micro, global_batch, layers = args.shapes[preset]
    name = f"{preset}-{precision}" + ("-curve" if data else "")
    entry: dict[str, Any] = {
        "preset": preset, "precision": precision, "layers": layers or PRESETS[preset].num_layers,
        "micro_batch": micro, "global_batch": global_batch,
        "tokens_per_step": global_batch * args.seq, "steps": steps,
    }  # fmt: skip
    t0 = time.monotonic()
    started = launch(config(args, preset, precision, steps, data), Path(args.workdir) / name)
    codes = started.wait(timeout=args.run_timeout)
    entry["wall_s"] = round(time.monotonic() - t0, 1)
    if codes != [0]:
        tail = started.output()[-2000:]
        print(f"run {name} failed: {codes}\n{tail}", file=sys.stderr)
        return entry | {"ok": False, "exit_codes": codes, "log_tail": tail}
    result = started.result()
    timed = [s["duration_s"] for s in result["steps"][WARMUP:]]
    median = statistics.median(timed)
    return entry | {
        "ok": True,
        "engine": result["attention"],
        "tokens_per_s": round(entry["tokens_per_step"] / median),
        "trainer_tokens_per_s": round(result["tokens_per_s"]),
        "mfu_vs_bf16_peak": round(result["mfu"], 4) if result["mfu"] is not None else None,
        "median_step_s": round(median, 4),
        "peak_memory_gib": result.get("peak_memory_gib"),
        "losses": [round(s["loss"], 4) for s in result["steps"]],
    }


def ratio(runs: list[dict[str, Any]], preset: str) -> dict[str, Any]:
    """fp8 over bf16 for one preset: tokens/s, memory, and the first loss."""
    by = {r["precision"]: r for r in runs if r["preset"] == preset and r.get("ok")}
    if set(by) != {"bf16", "fp8"}:
        return {"preset": preset, "ok": False}
    bf16, fp8 = by["bf16"], by["fp8"]
    return {
        "preset": preset,
        "fp8_over_bf16_tokens_per_s": round(fp8["tokens_per_s"] / bf16["tokens_per_s"], 3),
        "fp8_minus_bf16_peak_memory_gib": round(
            (fp8["peak_memory_gib"] or 0) - (bf16["peak_memory_gib"] or 0), 2
        ),
        "first_loss_bf16_fp8": [bf16["losses"][0], fp8["losses"][0]],
        "goal_1_3x_met": fp8["tokens_per_s"] >= 1.3 * bf16["tokens_per_s"],
    }


def stdlib_corpus(workdir: Path) -> dict[str, Any]:
    """Indexed data from this Python's standard library sources (byte tokenizer)."""
    text = workdir / "stdlib.txt"
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    with text.open("w") as out:
        for path in files:
            out.write(Path(path).read_text(errors="replace") + "\n\n")
    prefix = workdir / "stdlib"
    cmd = [sys.executable, "-m", "kubetron_trainer.tools.prepare", "--output-prefix", str(prefix)]
    subprocess.run([*cmd, "--overwrite", str(text)], check=True, env=os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT / "trainer"), os.environ.get("PYTHONPATH", "")])
    })  # fmt: skip
    return {"type": "indexed", "paths": [{"prefix": str(prefix)}], "tokenizer": {"type": "byte"}}


def shapes(args: argparse.Namespace) -> dict[str, tuple[int, int, int | None]]:
    """PRESET=MICRO:GLOBAL[:LAYERS] for every preset (LAYERS: fewer layers to fit memory)."""
    out: dict[str, tuple[int, int, int | None]] = {}
    for spec in args.shape:
        preset, _, rest = spec.partition("=")
        parts = [int(p) for p in rest.split(":")]
        out[preset] = (parts[0], parts[1], parts[2] if len(parts) > 2 else None)
    for preset in args.presets:
        out.setdefault(preset, (args.micro_batch, args.global_batch, None))
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["qwen3-1.7b", "qwen3-4b"])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument(
        "--shape",
        nargs="*",
        default=[],
        help="PRESET=MICRO:GLOBAL[:LAYERS] per preset, e.g. qwen3-4b=2:8:24 (fewer layers "
        "where the whole model does not fit one GPU)",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--curve", type=int, metavar="STEPS", help="also a loss curve of STEPS steps")
    p.add_argument("--skip-gemm", action="store_true")
    p.add_argument("--run-timeout", type=float, default=300)
    p.add_argument("--workdir", default="/tmp/kubetron-fp8")
    p.add_argument("--output", type=Path)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.fp8 needs a CUDA GPU")
    args.shapes = shapes(args)
    gpu = torch.cuda.get_device_name(0)
    out: dict[str, Any] = {
        "benchmark": "fp8",
        "command": "python -m benchmarks.fp8 " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "versions": versions(),
        "seq_length": args.seq,
        "warmup_steps_excluded": WARMUP,
        "bf16_peak_flops": peak_flops(gpu, "bf16"),
        "fp8_peak_flops": next((v for k, v in FP8_DENSE_PEAK.items() if k in gpu), None),
        "mfu_note": "MFU of both precisions against the bf16 peak",
        "recipe": "row-wise current scaling, e4m3 activations, weights and gradients",
        "gemm": None, "runs": [], "ratios": [], "curve": None,
    }  # fmt: skip
    if not args.skip_gemm:
        out["gemm"] = gemm_check()
        record(args, out, None, out["gemm"])
    for preset in args.presets:
        for precision in ("bf16", "fp8"):
            record(args, out, "runs", measure(args, preset, precision, args.steps))
        record(args, out, "ratios", ratio(out["runs"], preset))
    if args.curve:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        data = stdlib_corpus(Path(args.workdir))
        curves = {p: measure(args, args.presets[0], p, args.curve, data) for p in ("bf16", "fp8")}
        out["curve"] = {p: {k: r.get(k) for k in ("ok", "losses")} for p, r in curves.items()}
        if all(r.get("ok") for r in curves.values()):
            out["curve"]["agreement"] = agreement(curves["bf16"]["losses"], curves["fp8"]["losses"])
        record(args, out, None, {"curve_steps": args.curve})
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))


def agreement(bf16: list[float], fp8: list[float], start: int = CURVE_FROM) -> dict[str, Any]:
    """How far fp8's losses stray from bf16's (same data, same order) from step `start` on:
    the largest relative gap of one step, and of the means over windows of CURVE_WINDOW steps."""
    pairs = list(zip(bf16, fp8, strict=True))[start - 1 :]
    step_gaps = [abs(f - b) / b for b, f in pairs]
    windows = [pairs[i : i + CURVE_WINDOW] for i in range(0, len(pairs), CURVE_WINDOW)]
    window_gaps = [
        abs(sum(f for _, f in w) - sum(b for b, _ in w)) / sum(b for b, _ in w) for w in windows
    ]
    return {
        "from_step": start,
        "max_step_rel_gap": round(max(step_gaps), 5),
        "window_steps": CURVE_WINDOW,
        "max_window_rel_gap": round(max(window_gaps), 5),
        "within_1_percent": max(step_gaps) <= 0.01,
    }


def record(
    args: argparse.Namespace, out: dict[str, Any], key: str | None, entry: dict[str, Any]
) -> dict[str, Any]:
    """Add `entry` under `out[key]`, print a summary line, rewrite `--output` (a run cut off by
    a time limit keeps what was measured)."""
    if key is not None:
        out[key].append(entry)
    print(json.dumps({k: v for k, v in entry.items() if k not in ("losses", "log_tail")}))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=1) + "\n")
    return entry


if __name__ == "__main__":
    main()
