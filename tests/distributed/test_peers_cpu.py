"""The full-training peer benchmark (benchmarks/peers.py) on a CPU: kubetron's trainer (fast path
asked for, and Megatron-Core's local spec) and transformers train a tiny random Qwen3 (fp32) from
the same weights on the same mock sequences. They agree on every step's loss (the same tokens,
labels and AdamW update), so the GPU run compares the speed of equal work; fp8 is the trainer's
own refusal on a CPU, reported as skipped.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")  # a dev dependency; the peer's side needs it

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_kubetron_megatron_and_transformers_train_to_the_same_losses(tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "benchmarks.peers", "--tiny", "--workdir", str(tmp_path / "work"),
           "--output", str(report_file)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    results = report["results"]
    assert list(results) == ["kubetron_bf16", "kubetron_fp8", "megatron_local", "hf"]
    ours, local, hf = results["kubetron_bf16"], results["megatron_local"], results["hf"]
    for run in (ours, local, hf):
        assert run["ok"], run.get("log_tail")
        assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])
        assert run["tokens_per_s"] > 0
    assert (ours["fast_path"], local["fast_path"]) == ("on", "off")
    assert local["attention_flag"] == "sdpa"
    assert hf["weights_dtype"] == "torch.float32" and hf["gradient_checkpointing"] is False
    # init std 0.2: the first loss is far from uniform logits' ln(vocab), so agreeing means
    # the same weights read the same tokens with the same labels
    assert ours["losses"][0] > math.log(report["shape"]["arch"]["vocab_size"]) + 0.5
    assert ours["losses"] == pytest.approx(hf["losses"], abs=1e-4)
    assert ours["losses"] == pytest.approx(local["losses"], abs=1e-4)
    fp8 = results["kubetron_fp8"]
    assert fp8["skipped"] and not fp8["ok"]
    assert "fp8 GEMMs need an NVIDIA GPU" in fp8["reason"], fp8
    ratios = report["ratios"]
    assert ratios["kubetron_bf16_over_hf"] > 0 and ratios["kubetron_bf16_over_megatron_local"] > 0
    assert ratios["first_loss_abs_diff_kubetron_bf16_hf"] < 1e-4
    assert not any(k.startswith("kubetron_fp8") for k in ratios)
