"""The DPO peer benchmark (benchmarks/dpo_peers.py) on a CPU: kubetron's trainer and TRL's
DPOTrainer both train a tiny random Qwen3 (fp32) against a reference of other weights on the same
pairs. Every token id and loss position TRL trains on is kubetron's, and the two agree on the
loss and rewards of the first step and on the losses after it (the same AdamW update), so the
GPU run compares the speed of equal work.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")  # a dev dependency; the peer's side needs it

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_kubetron_and_trl_train_the_same_pairs_to_the_same_losses(tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "benchmarks.dpo_peers", "--tiny", "--distinct-reference",
           "--workdir", str(tmp_path / "work"), "--output", str(report_file)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    ours, theirs = report["results"]["kubetron"], report["results"]["trl"]
    assert ours["ok"] and theirs["ok"], report["errors"]
    tokens = report["token_ids"]
    assert tokens["identical"] and tokens["trl_shape"] == [12, 2, 32], tokens
    assert tokens["learned_tokens_first_row"] == 17  # 15 prompt tokens, 16 response, EOS
    assert theirs["settings"]["precompute_ref_log_probs"] is False
    assert len(ours["losses"]) == len(theirs["losses"]) == 3
    # other reference weights: the first loss is no ln 2, so agreeing on it means something
    assert ours["losses"][0] != pytest.approx(math.log(2), abs=1e-2)
    assert ours["losses"] == pytest.approx(theirs["losses"], abs=1e-4)
    assert ours["first_step"] == pytest.approx(theirs["first_step"], abs=1e-4)
    assert ours["grad_norms"] == pytest.approx(theirs["grad_norms"], rel=1e-4)
    comparison = report["comparison"]["trl"]
    assert comparison["first_loss_abs_diff"] < 1e-4
    assert comparison["tokens_per_s_kubetron_over_trl"] > 0
