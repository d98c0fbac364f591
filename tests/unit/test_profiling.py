"""The profile's pure parts: kernel names to families, the timeline folded into compute,
exposed communication and idle, and the --profile-steps window."""

from __future__ import annotations

import pytest

from kubetron_trainer.observe.profiling import Kernel, kernel_family, parse_window, summarize


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "nccl:all_gather"),
        ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
         "nccl:reduce_scatter"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
         "nccl:all_reduce"),
        ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "nccl:p2p"),
        ("ncclDevKernel_Broadcast_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "nccl:other"),
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1",
         "gemm"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1",
         "attention"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
         "optimizer"),
        ("void multi_tensor_apply_kernel<TensorListMetadata<1>, L2NormFunctor<float>>",
         "optimizer"),
        ("_rms_norm_forward_kernel", "norm"),
        ("void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<bf16>",
         "norm"),
        ("_cross_entropy_kernel", "cross_entropy"),
        ("_triton_rope", "rope"),
        ("_swiglu_backward_kernel", "activation"),
        ("Memcpy DtoD (Device -> Device)", "copy"),
        ("void at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)", "copy"),
        ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>",
         "elementwise/other"),
    ],
)  # fmt: skip
def test_kernel_family(name: str, family: str) -> None:
    assert kernel_family(name) == family


def test_timeline_splits_compute_exposed_communication_and_idle() -> None:
    # one step: GEMM 0-10, attention 5-12 (overlaps the GEMM), all-gather 11-15 (1 us under the
    # attention, 3 exposed), idle 15-20, reduce-scatter 20-22 exposed, norm 22-30
    ms = 1e3  # kernel times are in microseconds
    kernels = [
        Kernel("nvjet_gemm", 0, 10 * ms),
        Kernel("cudnn_sdpa", 5 * ms, 12 * ms),
        Kernel("ncclDevKernel_AllGather_RING", 11 * ms, 15 * ms),
        Kernel("ncclDevKernel_ReduceScatter_Sum", 20 * ms, 22 * ms),
        Kernel("_rms_norm_forward_kernel", 22 * ms, 30 * ms),
    ]
    out = summarize(kernels, steps=1)
    t = out["timeline_ms_per_step"]
    ms = 1.0
    assert out["span_ms_per_step"] == pytest.approx(30 * ms)
    assert t["compute"] == pytest.approx(20 * ms)  # 0-12 and 22-30
    assert t["communication_exposed"] == pytest.approx(5 * ms)  # 12-15 and 20-22
    assert t["communication_overlapped"] == pytest.approx(1 * ms)  # 11-12
    assert t["idle"] == pytest.approx(5 * ms)  # 15-20
    fams = out["families_ms_per_step"]
    assert fams == pytest.approx(
        {
            "gemm": 10 * ms,
            "attention": 7 * ms,
            "nccl:all_gather": 4 * ms,
            "nccl:reduce_scatter": 2 * ms,
            "norm": 8 * ms,
        }
    )
    assert out["top_kernels"][0]["kernel"] == "nvjet_gemm"
    assert out["top_kernels"][0]["calls_per_step"] == 1


def test_summary_is_per_step() -> None:
    kernels = [Kernel("nvjet", 0, 1000), Kernel("nvjet", 1000, 2000)]
    out = summarize(kernels, steps=2)
    assert out["families_ms_per_step"] == {"gemm": 1.0}
    assert out["top_kernels"][0]["calls_per_step"] == 1
    assert summarize([], steps=2) == {"kernels": 0}


def test_parse_window() -> None:
    assert parse_window("3:2") == (3, 2)
    assert parse_window("4") == (4, 1)
    for bad in ("x:2", "3:0", "-1:2"):
        with pytest.raises(ValueError, match="--profile-steps"):
            parse_window(bad)
