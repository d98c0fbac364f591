"""Supervised fine-tuning on CPU processes (gloo): a tiny random
Qwen3 saved by transformers is fine-tuned (TP2, recipe.kind finetune) on conversations that
`prepare --chat` rendered with a ChatML template. The trainer's first loss is what transformers
computes on the assistant's tokens only, each packed conversation run on its own (so the
packing's attention mask, positions and loss mask are those of separate conversations), and the
loss on the assistant's tokens goes down.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from devtools.hf_tokenizer import build_chat_bpe, conversations
from devtools.training.launch import example_config, run
from kubetron_trainer.data.packing import ChatDataset
from kubetron_trainer.data.tokenizer import HuggingFaceTokenizer
from kubetron_trainer.tools import prepare as prep
from tests.hf_models import PRESET, model_spec, save_hf_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
SEQ, STEPS, GBS = 256, 40, 4


def sft_config(
    weights: Path, prefix: Path, tok: Path, parallelism: dict[str, int] | None = None
) -> dict[str, Any]:
    cfg = example_config(
        recipe={
            "kind": "finetune", "trainIters": STEPS, "globalBatchSize": GBS,
            "microBatchSize": 2, "seqLength": SEQ, "logInterval": 1,
            "lrSchedule": {"style": "constant", "warmupIters": 0},
        },
        data={
            "type": "chat", "paths": [{"prefix": str(prefix)}], "split": "1,0,0",
            "tokenizer": {"type": "huggingface", "name": str(tok)},
        },
        parallelism=parallelism or {"tensor": 2},
        checkpoint={"path": None},
        metrics={"enabled": False},
        worldSize=2, gpusPerNode=2, preset=PRESET["qwen3"], weights=str(weights),
    )  # fmt: skip
    cfg["model"] = model_spec("qwen3", 512).resolve().model_dump(mode="json", by_alias=True)
    cfg["recipe"]["optimizer"] |= {"lr": 3e-3, "minLr": 0.0}
    return cfg


def assistant_loss(model: Any, data: ChatDataset, index: int) -> float:
    """transformers' mean loss over the assistant's tokens of packed sample `index`, each
    conversation in it run alone from position 0."""
    sample = data.sample(index)
    losses: list[torch.Tensor] = []
    for number in range(int(sample.document_ids.max()) + 1):
        where = (sample.document_ids == number).nonzero()[0]
        tokens = torch.from_numpy(sample.tokens[where])
        learned = torch.from_numpy(sample.loss_mask[where][1:]).bool()
        with torch.no_grad():
            logits = model(tokens[None]).logits[0, :-1]
        per_token = torch.nn.functional.cross_entropy(logits, tokens[1:], reduction="none")
        losses.append(per_token[learned])
    return float(torch.cat(losses).mean())


def prepare_sft(tmp_path: Path) -> tuple[Path, Path, Path, Any]:
    """Tokenizer, tiny random Qwen3 (transformers) and prepared conversations under tmp_path."""
    tok, weights = tmp_path / "tokenizer", tmp_path / "hf"
    build_chat_bpe(tok)
    assert HuggingFaceTokenizer(tok).vocab_size <= 512
    original = save_hf_model("qwen3", 512, weights)
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(160, 21)))
    prefix = tmp_path / "data" / "chat"
    args = [str(src), "--output-prefix", str(prefix), "--tokenizer", str(tok), "--chat"]
    assert prep.main([*args, "--workers", "1"]) == 0
    return tok, weights, prefix, original


def first_step_loss(original: Any, cfg: dict[str, Any], prefix: Path, tok: Path) -> float:
    """transformers' loss of step 1 as the trainer averages it: each micro-batch's mean over
    its assistant labels, then the mean over micro-batches (data parallel 1)."""
    pad = HuggingFaceTokenizer(tok).pad
    assert pad is not None
    r = cfg["recipe"]
    data = ChatDataset(
        str(prefix), seq_length=r["seqLength"], num_samples=STEPS * GBS, seed=r["seed"],
        split="1,0,0", pad=pad,
    )  # fmt: skip
    mbs = r["microBatchSize"]
    micro_batches = r["globalBatchSize"] // mbs
    assert all(data.sample(i).document_ids.max() >= 1 for i in range(4))  # packed: 2 or more
    expected = []
    for micro in range(micro_batches):
        indices = range(mbs * micro, mbs * (micro + 1))
        losses = [assistant_loss(original, data, i) for i in indices]
        counts = [float(data[i]["loss_mask"].sum()) for i in indices]
        expected.append(sum(x * c for x, c in zip(losses, counts, strict=True)) / sum(counts))
    return sum(expected) / len(expected)


def test_finetune_on_chat_data_learns_the_assistants_tokens_only(tmp_path: Path) -> None:
    tok, weights, prefix, original = prepare_sft(tmp_path)
    cfg = sft_config(weights, prefix, tok)
    started = run(cfg, tmp_path / "run")
    summary = started.result()
    losses = [s["loss"] for s in summary["steps"]]
    assert summary["start"] == "weights" and len(losses) == STEPS
    assert all(math.isfinite(x) for x in losses), losses
    assert "chat data: 160 conversations" in started.output()

    # step 1 trains on the imported weights; each packed conversation counts as if alone
    assert losses[0] == pytest.approx(first_step_loss(original, cfg, prefix, tok), rel=1e-4)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses  # it learns the answers
