"""Single-kernel timings at the Qwen3-1.7B training shape (one H100), JSON out.

Times forward+backward of the pieces the fast path can swap, at seq 4096, micro-batch 2,
hidden 2048, 16 query / 8 key-value heads of 128: each SDPA backend (with grouped-query
attention done by the kernel or by expanding K/V first), the weight-gradient accumulation
into an fp32 `main_grad` (bf16 GEMM + add vs one GEMM with an fp32 output), and RMSNorm (hidden
and q/k-head rows) and SwiGLU: kubetron's Triton kernels against Liger's, torch's and
Megatron's, with the GB/s each reaches. CUDA events,
median of `--iters` after warmup. It informs which spec choice `models/fused.py` makes; the
end-to-end numbers are `trainer_throughput.py`'s.

    python benchmarks/kernels.py --output kernels.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn: Callable[[], Any], iters: int) -> float:
    """Median milliseconds of `fn` over `iters` runs after 3 warmups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def attention(args: argparse.Namespace) -> dict[str, Any]:
    s, b, hq, hkv, d = args.seq, args.micro_batch, args.heads, args.kv_heads, args.head_dim
    # Megatron's layout [s, b, n, d], permuted to SDPA's [b, n, s, d] (no copy), as in the model
    q = torch.randn(s, b, hq, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(s, b, hkv, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    v = torch.randn(s, b, hkv, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16)
    flops = 4 * b * hq * s * s * d / 2 * 3.5  # causal; backward ~2.5x forward

    def run(backend: SDPBackend, expand: bool) -> Callable[[], None]:
        def fn() -> None:
            qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (q, k, v))
            if expand:
                kk = kk.repeat_interleave(hq // hkv, dim=1)
                vv = vv.repeat_interleave(hq // hkv, dim=1)
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(
                    qq, kk, vv, is_causal=True, enable_gqa=not expand
                )
            out.backward(grad)

        return fn

    results: dict[str, Any] = {}
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        for expand in (False, True):
            key = f"{name}{'+expand_kv' if expand else '+enable_gqa'}"
            try:
                ms = timed(run(backend, expand), args.iters)
                results[key] = {"fwd_bwd_ms": ms, "tflops": round(flops / ms / 1e9, 1)}
            except RuntimeError as err:
                results[key] = {"error": str(err).splitlines()[0][:200]}
    return results


def wgrad(args: argparse.Namespace) -> dict[str, Any]:
    tokens = args.seq * args.micro_batch
    out: dict[str, Any] = {}
    for name, (d_in, d_out) in {"mlp_fc1": (2048, 12288), "mlp_fc2": (6144, 2048)}.items():
        x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(tokens, d_out, device="cuda", dtype=torch.bfloat16)
        main_grad = torch.zeros(d_out, d_in, device="cuda")

        def unfused(x: torch.Tensor = x, g: torch.Tensor = g, mg: torch.Tensor = main_grad) -> None:
            mg.add_(g.t().matmul(x))

        def fused(x: torch.Tensor = x, g: torch.Tensor = g, mg: torch.Tensor = main_grad) -> None:
            torch.addmm(mg, g.t(), x, torch.float32, out=mg)

        entry: dict[str, Any] = {"bf16_gemm_then_add_ms": timed(unfused, args.iters)}
        try:
            entry["fp32_out_gemm_ms"] = timed(fused, args.iters)
        except (RuntimeError, TypeError) as err:
            entry["fp32_out_gemm_error"] = str(err).splitlines()[0][:200]
        out[name] = entry
    return out


def _gb_per_s(nbytes: float, ms: float) -> float:
    return round(nbytes / ms / 1e6, 1)


REPEAT = 10  # forward+backward passes per timed run: the host queues ahead, as in training


def norms_and_swiglu(args: argparse.Namespace) -> dict[str, Any]:
    """RMSNorm forward+backward (kubetron's Triton kernels, Liger's, torch's) and SwiGLU
    forward+backward (kubetron's, Megatron's `bias_swiglu_impl`), with the bytes each must
    move (x, dy, dx; y, 2 halves and their gradients) over the time: GB/s. Use training-sized
    rows (micro-batch 8 at seq 4096): small ones measure the host's launch time."""
    tokens = args.seq * args.micro_batch
    hidden, ffn = args.hidden, args.ffn
    from kubetron_trainer.models.kernels import SwiGLU, rms_norm

    out: dict[str, Any] = {"rms_norm": {}, "swiglu": {}}
    for name, shape in {
        "hidden": (tokens, hidden),
        "qk_head": (tokens * args.heads, args.head_dim),
    }.items():
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_()
        w = torch.ones(shape[-1], device="cuda", dtype=torch.bfloat16).requires_grad_()
        dy = torch.randn_like(x)
        nbytes = 5 * x.numel() * x.element_size()  # fwd: read x, write y; bwd: x, dy, dx
        impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "kubetron": lambda t, w=w: rms_norm(t, w, 1e-6),
            "torch": lambda t, w=w: F.rms_norm(t, (t.shape[-1],), w, 1e-6),
        }
        try:
            liger = importlib.import_module("liger_kernel.ops.rms_norm").LigerRMSNormFunction
            impls["liger"] = lambda t, w=w, f=liger: f.apply(t, w, 1e-6, 0.0, "llama", False)
        except ImportError:
            pass
        entry: dict[str, Any] = {"shape": list(shape)}
        for impl, fn in impls.items():

            def step(fn: Callable[[torch.Tensor], torch.Tensor] = fn, x=x, dy=dy, w=w) -> None:
                for _ in range(REPEAT):
                    torch.autograd.grad(fn(x), (x, w), dy)

            ms = timed(step, args.iters) / REPEAT
            entry[impl] = {"fwd_bwd_ms": round(ms, 4), "gb_per_s": _gb_per_s(nbytes, ms)}
        out["rms_norm"][name] = entry
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    xy = torch.randn(tokens, 2 * ffn, device="cuda", dtype=torch.bfloat16).requires_grad_()
    g = torch.randn(tokens, ffn, device="cuda", dtype=torch.bfloat16)
    nbytes = (2 + 1 + 2 + 1 + 2) * tokens * ffn * 2  # fwd: xy, out; bwd: xy, g, dxy
    for impl, fn in {"kubetron": SwiGLU(), "megatron": lambda t: bias_swiglu_impl(t, None)}.items():

        def swiglu_step(fn: Callable[[torch.Tensor], torch.Tensor] = fn) -> None:
            for _ in range(REPEAT):
                torch.autograd.grad(fn(xy), xy, g)

        ms = timed(swiglu_step, args.iters) / REPEAT
        out["swiglu"][impl] = {"fwd_bwd_ms": round(ms, 4), "gb_per_s": _gb_per_s(nbytes, ms)}
    out["swiglu"]["shape"] = [tokens, 2 * ffn]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=6144)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--only", choices=["attention", "wgrad", "norms"], nargs="*", help="pieces (default: all)"
    )
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels.py needs a CUDA GPU")
    result = {
        "benchmark": "kernels",
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "shape": vars(args) | {"output": None},
    }
    pieces = {
        "attention": ("attention_fwd_bwd", attention),
        "wgrad": ("wgrad_accumulate", wgrad),
        "norms": ("rms_norm_and_swiglu", norms_and_swiglu),
    }
    for name, (key, piece) in pieces.items():
        if not args.only or name in args.only:
            result[key] = piece(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
