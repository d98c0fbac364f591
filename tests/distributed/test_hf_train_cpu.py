"""Train on data prepared with a Hugging Face tokenizer: a BPE
trained here, JSONL and Parquet prepared by `python -m kubetron_trainer.tools.prepare` with two
workers, then gpt-tiny trained by 2 gloo processes (TP2) with `tokenizer.type: huggingface`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from devtools.hf_tokenizer import build_bpe, documents
from devtools.training.launch import ROOT, example_config, run
from kubetron_trainer.data.tokenizer import HuggingFaceTokenizer

pytestmark = pytest.mark.distributed
STEPS = 8


def test_gpt_tiny_trains_on_data_prepared_with_a_hugging_face_tokenizer(tmp_path: Path) -> None:
    tok = tmp_path / "tokenizer"
    build_bpe(tok)
    docs = documents(1200, seed=3)
    with open(tmp_path / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:800])
    pq.write_table(pa.table({"text": docs[800:]}), tmp_path / "b.parquet")
    prefix = tmp_path / "data" / "corpus"
    cmd = [sys.executable, "-m", "kubetron_trainer.tools.prepare", str(tmp_path / "a.jsonl")]
    cmd += [str(tmp_path / "b.parquet"), "--tokenizer", str(tok), "--append-eod"]
    cmd += ["--output-prefix", str(prefix), "--workers", "2"]
    done = subprocess.run(cmd, cwd=ROOT / "trainer", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1,200 documents (0 empty, skipped)" in done.stdout

    cfg = example_config(
        recipe={"trainIters": STEPS, "logInterval": 1, "lrSchedule": {"warmupIters": 1}},
        data={
            "type": "indexed",
            "paths": [{"prefix": str(prefix)}],
            "tokenizer": {"type": "huggingface", "name": str(tok)},
        },
        checkpoint={"path": None},
        metrics={"enabled": False},
        worldSize=2,
        gpusPerNode=2,
    )
    started = run(cfg, tmp_path / "run")
    loss = [s["loss"] for s in started.result()["steps"]]
    assert len(loss) == STEPS and all(math.isfinite(x) for x in loss), loss
    assert loss[0] == pytest.approx(math.log(512), abs=0.15)  # untrained: uniform over 512
    assert max(loss[-2:]) < loss[0] - 0.3, loss  # it learns
    hf = HuggingFaceTokenizer(tok)
    used = f"indexed data: 1 dataset(s), tokenizer {tok} ({hf.vocab_size} tokens, EOD {hf.eod}, pad"
    assert used in started.output()
