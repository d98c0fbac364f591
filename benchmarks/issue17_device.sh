#!/usr/bin/env bash
# The device calls of issue 17's last part on one 2x H200 host (the `run` tool's nvidia-h200-x2),
# each under 600 s: `bash benchmarks/issue17_device.sh CALL` with CALL 1, 2 or 3; results in
# $OUT (at most 8 files). Every run is bounded by `timeout`, so the call returns its JSON even
# when a run hangs; the 8B pieces write each finished case as it ends.
#   1: profiles of Qwen3-8B TP2+SP, PP2, DP2 at seq 4096; seq 8192 TP2+SP (both models),
#      Llama3-8B DP2
#   2: seq 8192 Qwen3-8B DP2 and PP2, Llama3-8B DP2 with global groups (PLAN2 overrides);
#      Qwen3-1.7B on one GPU, micro-batch x global-batch sweep (two runs at a time, one per
#      GPU), a profile of the best
#   3: Llama3-8B TP2+SP at 4096 with both kinds of groups (PLAN3 overrides, empty: none); GPU
#      tests: SIGTERM during an async save, SFT on GPUs; the reshard piece and its tests
#      (tests/gpu/test_reshard_gpu.py) if the time allows
#   4: what is left: tests/gpu/test_recompute_gpu.py; Qwen3-8B DP2 at seq 8192 with every layer
#      recomputed (recipe.recomputeLayers 36; it ran out of memory without); seq 8192 rows not
#      run yet: Llama3-8B PP2, TP2+SP of both models with global groups (PLAN4 overrides)
#   5: one H200 (`run`'s nvidia-h200): the GPU tests of the fast path (the Triton RMSNorm and
#      SwiGLU) and of recompute; benchmarks/kernels.py's norms at the Qwen3-1.7B and Qwen3-8B
#      widths; Qwen3-1.7B with the fast path on, without swiglu, at global batch 64, and a
#      profile of on at 8 x 32
#   6: one H200: the fast-path kernel tests again (after call 5's rounding-test fix), the norms
#      and SwiGLU at training sizes (micro-batch 8 / 2 at the 1.7B / 8B widths, 10 passes a
#      timing), Qwen3-1.7B 8 x 32 with torch's own RMSNorm (every piece but norm) and with on
#   7: 2 GPUs, after the swiglu and overlap pieces (on by default): the overlap GPU test (DP2);
#      Qwen3-8B DP2 at seq 8192 with recomputeLayers 36; Qwen3-8B PP2 at 4096 with both kinds of
#      groups, Qwen3-8B TP2+SP at 4096, Llama3-8B PP2 at 8192 (PLAN7 overrides)
#   8: 2 GPUs: the overlap test again (tolerance mended after call 7); Qwen3-8B DP2 at 8192 with
#      12 layers recomputed instead of 36; Llama3-8B DP2 at 4096 without and with overlap
#   9: 2 GPUs, the session's last 5 minutes: Llama3-8B TP2+SP at seq 8192 with both kinds of
#      groups (PLAN9 overrides)
set -u
CALL=${1:?call 1 to 6}
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/api:$PWD/trainer:$PWD/operator:$PWD PYTHONUNBUFFERED=1
export PYTHONWARNINGS=ignore KUBETRON_MULTIGPU_WORKDIR=/tmp NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LOG=$OUT/call$CALL.log
left() { echo $((T0 + ${1} - $(date +%s))); }
say() { echo "[issue17 +$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }
mg() { python3 benchmarks/multigpu.py --no-tests "$@" 2>>"$LOG"; }
# train8b PLAN STOP TIMEOUT RUN_S NAME: the 8B cases of PLAN, 6 steps each, none started with
# less than RUN_S a run left before T0+STOP, the whole killed at T0+TIMEOUT; -> $OUT/NAME.json.
# Variables set before the call (KUBETRON_TRAIN8B_RECOMPUTE) reach the runs.
train8b() {
  KUBETRON_TRAIN8B_UNTIL=$((T0 + $2)) KUBETRON_TRAIN8B_RUN_S=$4 KUBETRON_TRAIN8B_STEPS=6 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True KUBETRON_TRAIN8B=$1 \
    timeout $(left "$3") python3 benchmarks/multigpu.py --no-tests --only train8b \
    --output "$OUT/$5.json" >/dev/null 2>>"$LOG"
  say "train8b $5 done ($?)"
}

# gputests STOP NAME PYTEST_ARGS...: GPU tests, junit in $OUT/NAME.xml, killed at T0+STOP
gputests() {
  local stop=$1 name=$2
  shift 2
  timeout $(left "$stop") python3 -m pytest -q -p no:cacheprovider --rootdir "$PWD" \
    --junitxml "$OUT/$name.xml" "$@" >>"$LOG" 2>&1
  say "$name done ($?)"
}
# kernels STOP NAME ARGS...: benchmarks/kernels.py's norms and SwiGLU -> $OUT/NAME.json
kernels() {
  local stop=$1 name=$2
  shift 2
  timeout $(left "$stop") python3 benchmarks/kernels.py --only norms "$@" \
    --output "$OUT/$name.json" >>"$LOG" 2>&1
  say "$name done ($?)"
}
# qwen17b STOP NAME ARGS...: Qwen3-1.7B variants on one GPU (trainer_throughput.py) -> NAME.json
qwen17b() {
  local stop=$1 name=$2
  shift 2
  timeout $(left "$stop") python3 benchmarks/trainer_throughput.py --skip-runs \
    --preset qwen3-1.7b --seq 4096 --micro-batch 4 --global-batch 8 --variant-steps 8 \
    --workdir "/tmp/$name" "$@" --output "$OUT/$name.json" >/dev/null 2>>"$LOG"
  say "$name done ($?)"
}

say "call $CALL on $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tr '\n' ';') $(nproc) cores"

case $CALL in
1)
  # CUDA-only profiling must see kernels; else record host ops too (KUBETRON_PROFILE_CPU)
  n=$(python3 - <<'EOF' 2>>"$LOG"
import torch
from torch.profiler import ProfilerActivity, profile
from kubetron_trainer.observe.profiling import device_kernels, summarize
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
with profile(activities=[ProfilerActivity.CUDA]) as p:
    for _ in range(5):
        a @ a
    torch.cuda.synchronize()
k = device_kernels(p)
print(len(k), summarize(k, 5).get("families_ms_per_step"))
EOF
)
  say "profiler check: $n"
  case "$n" in 0*|"") export KUBETRON_PROFILE_CPU=1; say "kernels not seen: host ops too" ;; esac
  KUBETRON_TRAIN8B_UNTIL=$((T0 + 330)) KUBETRON_TRAIN8B_RUN_S=80 \
    timeout $(left 340) python3 benchmarks/multigpu.py --no-tests --only profile8b \
    --output "$OUT/profile8b.json" >/dev/null 2>>"$LOG"
  say "profile8b done ($?)"
  train8b qwen3-8b:tp2_sp:dec:8192,llama3-8b:tp2_sp:dec:8192,llama3-8b:dp2:dec:8192 \
    565 585 95 train8b_seq8192_a
  ;;
2)
  train8b "${PLAN2:-qwen3-8b:dp2:dec:8192,llama3-8b:dp2:glo:8192,qwen3-8b:pp2:dec:8192}" \
    330 345 95 train8b_seq8192_b
  common=(--skip-runs --preset qwen3-1.7b --seq 4096 --micro-batch 4 --global-batch 8
    --variant-steps 8 --run-timeout 150)
  CUDA_VISIBLE_DEVICES=0 timeout $(left 520) python3 benchmarks/trainer_throughput.py \
    "${common[@]}" --workdir /tmp/q0 --variants on:4:8 on:4:32 on:8:32 \
    --output "$OUT/q17_gpu0.json" >/dev/null 2>>"$LOG" &
  CUDA_VISIBLE_DEVICES=1 timeout $(left 520) python3 benchmarks/trainer_throughput.py \
    "${common[@]}" --workdir /tmp/q1 --variants on:8:16 on:6:24 on:2:32 \
    --output "$OUT/q17_gpu1.json" >/dev/null 2>>"$LOG" &
  wait
  say "sweep done"
  best=$(python3 - "$OUT"/q17_gpu0.json "$OUT"/q17_gpu1.json <<'EOF'
import json, sys
runs = [r for f in sys.argv[1:] for r in json.load(open(f)).get("ablations", []) if r.get("ok")]
best = max(runs, key=lambda r: r["mfu"])
print(f"{best['fast_path']}:{best['micro_batch']}:{best['global_batch']}")
EOF
)
  say "best: $best"
  if [ "$(left 590)" -gt 70 ]; then
    CUDA_VISIBLE_DEVICES=0 timeout $(left 590) python3 benchmarks/trainer_throughput.py \
      "${common[@]}" --workdir /tmp/qp --profile-variants "${best:-on:4:8}" \
      --output "$OUT/q17_profile.json" >/dev/null 2>>"$LOG"
    say "profile done ($?)"
  fi
  ;;
3)
  PLAN=${PLAN3-llama3-8b:tp2_sp:both}
  if [ -n "$PLAN" ]; then
    KUBETRON_TRAIN8B_UNTIL=$((T0 + 150)) KUBETRON_TRAIN8B_RUN_S=60 KUBETRON_TRAIN8B_STEPS=6 \
      KUBETRON_TRAIN8B=$PLAN timeout $(left 160) python3 benchmarks/multigpu.py --no-tests \
      --only train8b --output "$OUT/train8b_c.json" >/dev/null 2>>"$LOG"
    say "train8b done ($?)"
  fi
  timeout $(left 330) python3 -m pytest -q -p no:cacheprovider --rootdir "$PWD" \
    --junitxml "$OUT/tests_call3.xml" tests/gpu/test_async_sigterm_gpu.py tests/gpu/test_sft_gpu.py \
    >>"$LOG" 2>&1
  say "tests done ($?)"
  if [ "$(left 590)" -gt "${RESHARD_NEEDS:-290}" ]; then
    timeout $(left 590) python3 benchmarks/multigpu.py --only reshard --output "$OUT/reshard.json" \
      >>"$LOG" 2>&1
    say "reshard + tests done ($?)"
  else
    say "reshard not run: $(left 590) s left"
  fi
  ;;
4)
  gputests 120 tests_call4 tests/gpu/test_recompute_gpu.py
  KUBETRON_TRAIN8B_RECOMPUTE=36 train8b qwen3-8b:dp2:dec:8192 250 260 110 train8b_recompute
  train8b "${PLAN4:-llama3-8b:pp2:dec:8192,qwen3-8b:tp2_sp:glo:8192,llama3-8b:tp2_sp:glo:8192}" \
    570 585 95 train8b_seq8192_d
  ;;
5)
  gputests 230 tests_call5 tests/gpu/test_fast_path.py tests/gpu/test_recompute_gpu.py
  kernels 260 kernels_qwen3_1p7b --iters 20
  kernels 290 kernels_qwen3_8b --iters 20 --micro-batch 1 --hidden 4096 --ffn 12288 --heads 32
  qwen17b 590 q17_call5 --run-timeout 150 \
    --variants on:8:32 ce,norm,rope,cudnn,wgrad,adam:8:32 on:8:64 --profile-variants on:8:32
  ;;
6)
  gputests 90 tests_call6 tests/gpu/test_fast_path.py -k "rmsnorm or swiglu"
  kernels 150 kernels_qwen3_1p7b --iters 10 --micro-batch 8
  kernels 200 kernels_qwen3_8b --iters 10 --micro-batch 2 --hidden 4096 --ffn 12288 --heads 32
  qwen17b 330 q17_call6 --run-timeout 120 --variants ce,rope,cudnn,wgrad,adam,swiglu:8:32 on:8:32
  ;;
7)
  gputests 110 tests_call7 tests/gpu/test_fast_path.py -k overlapped
  KUBETRON_TRAIN8B_RECOMPUTE=36 train8b qwen3-8b:dp2:dec:8192 240 250 110 train8b_recompute
  train8b "${PLAN7:-qwen3-8b:pp2:both:4096,qwen3-8b:tp2_sp:dec:4096,llama3-8b:pp2:dec:8192}" \
    570 585 75 train8b_call7
  ;;
8)
  gputests 100 tests_call8 tests/gpu/test_fast_path.py -k overlapped
  KUBETRON_TRAIN8B_RECOMPUTE=12 train8b qwen3-8b:dp2:dec:8192 210 220 100 train8b_recompute12
  KUBETRON_TRAIN8B_FAST=ce,norm,rope,cudnn,wgrad,adam,swiglu \
    train8b llama3-8b:dp2:dec 290 300 70 train8b_no_overlap
  train8b llama3-8b:dp2:dec 370 380 70 train8b_overlap
  ;;
9)
  train8b "${PLAN9:-llama3-8b:tp2_sp:both:8192}" 215 225 80 train8b_call9
  ;;
esac
say "end"
