"""The fast path (`--fast-path`) on one CUDA GPU: each fused piece against the unfused math.

Skipped where CUDA or liger-kernel is absent (never faked). Kernel-level checks compare each
piece with the path it replaces on random bf16 inputs (values and gradients); the training
check runs a 4-layer qwen3-0.6b-shaped model with the fast path on and off and requires the
losses to agree within bf16 tolerance, and the fast path to give the same losses on
decentralized groups and on Megatron's global `parallel_state`.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch

from devtools.training.launch import run
from tests.gpu.test_train_gpu import STEPS, qwen3_small_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_fused_rope_matches_megatron(layout: str) -> None:
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from kubetron_trainer.models.rope import apply_rope, cos_sin

    s, b, n, d = 512, 2, 16, 128
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    f = torch.outer(torch.arange(s, device="cuda").float(), inv)
    emb = torch.cat((f, f), -1)[:, None, None, :]
    x = torch.randn(s, b, n, d, device="cuda", dtype=torch.float64).requires_grad_()
    ref = _apply_rotary_pos_emb_bshd(x, emb.double())  # float64 reference
    grad = torch.randn_like(ref)
    (ref_grad,) = torch.autograd.grad(ref, x, grad)
    xb = x.detach().bfloat16()
    if layout == "strided":  # a [b, n, s, d] buffer seen as [s, b, n, d], as SDPA's gradients
        xb = xb.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)
        assert not xb.is_contiguous()
    xb.requires_grad_()
    cos, sin = cos_sin(emb, s)
    out = apply_rope(xb, cos, sin)
    (out_grad,) = torch.autograd.grad(out, xb, grad.bfloat16())
    assert rel_err(out, ref) < 1e-2
    assert rel_err(out_grad, ref_grad) < 1e-2


@pytest.mark.parametrize("width", [2048, 4096, 128], ids=["hidden-2048", "hidden-4096", "qk-head"])
def test_triton_rmsnorm_matches_torch(width: int) -> None:
    from megatron.core.transformer.transformer_config import TransformerConfig

    from kubetron_trainer.models.norm import Norm

    config = TransformerConfig(
        num_layers=1, hidden_size=2048, num_attention_heads=16, normalization="RMSNorm"
    )
    fused = Norm(config, width, eps=1e-6, fused=True).cuda().bfloat16()
    ref = torch.nn.RMSNorm(width, eps=1e-6).cuda().double()
    with torch.no_grad():
        w = 1 + 0.1 * torch.randn(width, device="cuda")
        fused.weight.copy_(w)
        ref.weight.copy_(w)
    rows = 2 * 2048 * 2048 // width  # a q/k norm sees heads x tokens rows
    x = torch.randn(rows // 2 + 3, 2, width, device="cuda", dtype=torch.float64)
    grad = torch.randn_like(x)
    xd = x.clone().requires_grad_()
    out_ref = ref(xd)
    out_ref.backward(grad)
    xb = x.bfloat16().requires_grad_()
    out = fused(xb)
    out.backward(grad.bfloat16())
    assert rel_err(out, out_ref) < 1e-2
    assert rel_err(xb.grad, xd.grad) < 1e-2
    assert rel_err(fused.weight.grad, ref.weight.grad) < 1e-2


def test_triton_rmsnorm_rounds_like_the_llama_norm() -> None:
    """bf16: normalised in fp32, rounded to bf16, then scaled (HF Llama/Qwen). Equal to that
    but where the inverse RMS's last fp32 bits (another summation order, an approximate rsqrt)
    move the normalised value across a bf16 rounding boundary: rare, and one bf16 step apart.
    Rounding once after the scale instead would differ in a large share of elements."""
    from kubetron_trainer.models.kernels import rms_norm

    x = torch.randn(4096, 2048, device="cuda").bfloat16()
    w = (1 + 0.1 * torch.randn(2048, device="cuda")).bfloat16()
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    llama = w * normed.bfloat16()
    rounded_once = (w.float() * normed).bfloat16()
    out = rms_norm(x, w, 1e-6)
    differ = out != llama
    assert differ.float().mean() < 1e-3, float(differ.float().mean())
    ulp = llama.float().abs() * 2**-7  # bf16 keeps 8 significant bits
    assert ((out.float() - llama.float()).abs() <= ulp + 1e-30).all()
    assert (rounded_once != llama).float().mean() > 0.05  # the test tells the orders apart


def test_triton_swiglu_matches_megatrons_fused_swiglu() -> None:
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    from kubetron_trainer.models.kernels import SwiGLU

    x = (torch.randn(2048, 2, 2 * 6144, device="cuda", dtype=torch.float64)).requires_grad_()
    grad = torch.randn(2048, 2, 6144, device="cuda", dtype=torch.float64)
    a, b = x.chunk(2, -1)
    ref = torch.nn.functional.silu(a) * b
    (ref_grad,) = torch.autograd.grad(ref, x, grad)
    outs = {}
    for name, fn in [("ours", SwiGLU()), ("megatron", lambda t: bias_swiglu_impl(t, None))]:
        xb = x.detach().bfloat16().requires_grad_()
        out = fn(xb)
        (g,) = torch.autograd.grad(out, xb, grad.bfloat16())
        outs[name] = (rel_err(out, ref), rel_err(g, ref_grad))
    # as close to fp64 as Megatron's own fused (torch.compile'd) SwiGLU, within bf16 rounding
    assert outs["ours"][0] < 1e-2 and outs["ours"][1] < 1e-2, outs
    assert outs["ours"][0] <= 1.5 * outs["megatron"][0] + 1e-4, outs
    assert outs["ours"][1] <= 1.5 * outs["megatron"][1] + 1e-4, outs


def test_fused_linear_cross_entropy_matches_unfused_loss() -> None:
    pytest.importorskip("liger_kernel")
    from kubetron_trainer.models.fused import fused_lm_loss
    from kubetron_trainer.runtime.step import masked_mean

    s, b, h, vocab = 512, 2, 256, 4096
    hidden = (torch.randn(s, b, h, device="cuda") * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, h, device="cuda") * 0.05).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (b, s), device="cuda")
    mask = (torch.rand(b, s, device="cuda") > 0.1).float()
    loss = fused_lm_loss(
        hidden_states=hidden, output_layer=torch.nn.Identity(), output_weight=weight,
        labels=labels, loss_mask=mask,
    )  # fmt: skip
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    hd, wd = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = torch.einsum("sbh,vh->bsv", hd, wd)
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab), labels.reshape(-1), reduction="none"
    ).reshape(b, s)
    ref = masked_mean(per_token, mask)
    rh, rw = torch.autograd.grad(ref, (hd, wd))
    assert float(loss) == pytest.approx(float(ref), rel=2e-3)
    assert rel_err(gh, rh) < 2e-2
    assert rel_err(gw, rw) < 2e-2


@functools.cache
def losses(fast: str, groups: str) -> list[float]:
    tmp = Path(tempfile.mkdtemp(prefix="kubetron-fast-"))
    started = run(
        qwen3_small_config(None), tmp / f"{fast}-{groups}", "--device", "cuda",
        "--attention", "sdpa", "--fast-path", fast, groups=groups,
    )  # fmt: skip
    result = started.result()
    if fast != "off":
        assert "fast path" in result["attention"], result["attention"]
    return [s["loss"] for s in result["steps"]]


def test_fast_path_trains_like_the_unfused_path() -> None:
    pytest.importorskip("liger_kernel")
    base = losses("off", "decentralized")
    fast = losses("on", "decentralized")
    assert len(fast) == STEPS
    # bf16 kernels with different rounding and reduction order: equal to about 1%.
    assert fast == pytest.approx(base, rel=1e-2), (fast, base)


def test_fast_path_gives_the_same_losses_on_global_groups() -> None:
    pytest.importorskip("liger_kernel")
    ours = losses("on", "decentralized")
    theirs = losses("on", "global")
    assert ours == pytest.approx(theirs, rel=2e-3), (ours, theirs)


def test_wgrad_accumulation_matches_fp64() -> None:
    from kubetron_trainer.models.fused import _WgradAccumulate, enable_wgrad_fusion

    assert enable_wgrad_fusion(torch.device("cuda")) is None
    tokens, d_in, d_out = 4096, 512, 1024
    main_grad = torch.randn(d_out, d_in, device="cuda")
    ref = main_grad.double()
    for _ in range(3):  # three micro-batches accumulate into the same fp32 buffer
        x = torch.randn(tokens, d_in, device="cuda").bfloat16()
        g = torch.randn(tokens, d_out, device="cuda").bfloat16()
        _WgradAccumulate.wgrad_gemm_accum_fp32(x, g, main_grad)
        ref += g.double().t() @ x.double()
    assert main_grad.dtype == torch.float32
    assert rel_err(main_grad, ref) < 1e-5  # fp32 accumulation of exact bf16 products


def test_fused_adam_matches_foreach_adam() -> None:
    from kubetron_trainer.models.fused import use_fused_adam

    class Holder:  # the shape of Megatron's optimizer wrapper: `.optimizer` is torch's
        def __init__(self, opt: torch.optim.Optimizer) -> None:
            self.optimizer = opt

    torch.manual_seed(0)
    p1 = torch.randn(1000, 257, device="cuda", requires_grad=True)
    p2 = p1.detach().clone().requires_grad_()
    foreach = torch.optim.AdamW([p1], lr=1e-2, weight_decay=0.1, foreach=True)
    fused = torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.1)
    assert use_fused_adam(Holder(fused)) == 1
    assert fused.param_groups[0]["fused"] and not fused.param_groups[0]["foreach"]
    for _ in range(5):
        g = torch.randn_like(p1)
        p1.grad, p2.grad = g.clone(), g.clone()
        foreach.step()
        fused.step()
    assert fused.state[p2]["step"].device.type == "cuda"
    assert rel_err(p2, p1) < 1e-6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_overlapped_gradient_reduce_trains_like_the_reduce_after_backward(tmp_path: Path) -> None:
    """The `overlap` piece (bucketed reduce-scatters started during the backward pass), DP2 on
    two GPUs: the same losses and gradient norms as reducing after the backward pass."""
    runs = {}
    for fast in ("on", "ce,norm,rope,cudnn,wgrad,adam,swiglu"):
        cfg = qwen3_small_config(None)
        cfg["worldSize"] = 2
        started = run(cfg, tmp_path / fast.replace(",", "+"), "--device", "cuda",
                      "--attention", "sdpa", "--fast-path", fast)  # fmt: skip
        runs[fast] = started.result()["steps"]
    on, off = runs.values()
    assert len(on) == STEPS
    # the same sums over the same two ranks; bucketing changes only the optimizer's shard
    # boundaries, hence the order of the grad-norm sum: ulps, which bf16 training amplifies
    # step by step (on 2 H200s the grad norms of steps 6 and 8 came 1.8e-3 apart). Unreduced
    # or half-reduced gradients would differ from the first step on.
    assert [s["loss"] for s in on] == pytest.approx([s["loss"] for s in off], rel=2e-3)
    first = [[s["grad_norm"] for s in run[:4]] for run in (on, off)]
    assert first[0] == pytest.approx(first[1], rel=1e-3), first
