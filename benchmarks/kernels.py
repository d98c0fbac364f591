"""Single-kernel timings at the Qwen3-1.7B training shape (one H100), JSON out.

Times forward+backward of the pieces the fast path can swap, at seq 4096, micro-batch 2,
hidden 2048, 16 query / 8 key-value heads of 128: each SDPA backend (with grouped-query
attention done by the kernel or by expanding K/V first), and the weight-gradient accumulation
into an fp32 `main_grad` (bf16 GEMM + add vs one GEMM with an fp32 output). CUDA events,
median of `--iters` after warmup. It informs which spec choice `models/fused.py` makes; the
end-to-end numbers are `trainer_throughput.py`'s.

    python benchmarks/kernels.py --output kernels.json
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
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
        "attention_fwd_bwd": attention(args),
        "wgrad_accumulate": wgrad(args),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
