"""Validation loss on CPU processes (gloo): a tiny random Qwen3 saved by transformers is
fine-tuned on chat data by 2 ranks in data parallel (recipe.kind finetune, fp32) with
`recipe.eval`. Each evaluation's loss is what transformers computes, token-weighted, on the same
validation samples with the weights kubetron-export writes from that step's checkpoint; the
validation samples each dp rank read are its own (no repeats across ranks) and hold no
conversation the training steps read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from devtools.training.launch import run
from kubetron_api.config import RecipeSpec
from kubetron_trainer.data.batches import split_indices
from kubetron_trainer.data.packing import ChatDataset
from kubetron_trainer.data.tokenizer import HuggingFaceTokenizer
from tests.distributed.test_sft_cpu import assistant_loss, prepare_sft, sft_config
from tests.hf_models import export

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS, GBS, SPLIT = 4, 4, "80,20,0"
EVAL = {"interval": 2, "iterations": 2}


def validation_loss(model: Any, data: ChatDataset, indices: list[int]) -> float:
    """transformers' mean loss over every assistant label of the samples `indices` (each
    packed conversation run alone): the per-token losses summed, over their count."""
    counts = [float(data[i]["loss_mask"].sum()) for i in indices]
    means = [assistant_loss(model, data, i) for i in indices]
    return sum(m * c for m, c in zip(means, counts, strict=True)) / sum(counts)


def test_validation_loss_is_transformers_loss_on_the_held_out_conversations(
    tmp_path: Path,
) -> None:
    import transformers

    tok, weights, prefix, _ = prepare_sft(tmp_path)
    cfg = sft_config(weights, prefix, tok, parallelism={"tensor": 1})  # data parallel 2
    cfg["recipe"] |= {"trainIters": STEPS, "microBatchSize": 1, "eval": EVAL}
    cfg["data"]["split"] = SPLIT
    cfg["checkpoint"] |= {"path": str(tmp_path / "ckpt"), "saveInterval": 2}
    started = run(cfg, tmp_path / "run")
    summary = started.result()
    evaluations = summary["validation"]
    assert [e["step"] for e in evaluations] == [2, 4]  # atEnd: step 4 was just evaluated
    assert "step 4 | validation loss " in started.output() and " | ppl " in started.output()

    # each dp rank read its own validation samples, the ones the index arithmetic gives
    recipe = RecipeSpec.model_validate(cfg["recipe"])
    read = summary["validation_indices"]
    assert read == [split_indices(recipe, r, 2).validation for r in range(2)]
    assert sorted(read[0] + read[1]) == list(range(EVAL["iterations"] * GBS))

    # ... packed from conversations that no training step read
    pad = HuggingFaceTokenizer(tok).pad
    assert pad is not None
    common = {"seq_length": cfg["recipe"]["seqLength"], "seed": cfg["recipe"]["seed"],
              "split": SPLIT, "pad": pad}  # fmt: skip
    valid = ChatDataset(str(prefix), num_samples=len(read[0]) * 2, part=1, **common)
    train = ChatDataset(str(prefix), num_samples=STEPS * GBS, **common)
    trained = {int(d) for r in range(2) for i in split_indices(recipe, r, 2).train
               for d in train.documents(i)}  # fmt: skip
    scored = {int(d) for i in read[0] + read[1] for d in valid.documents(i)}
    assert scored and trained and not scored & trained

    # the loss of each evaluation is transformers' on the exported weights of its step
    for evaluation in evaluations:
        out = tmp_path / f"export-{evaluation['step']}"
        done = export(tmp_path / "ckpt", out, "--step", str(evaluation["step"]))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        expected = validation_loss(model, valid, read[0] + read[1])
        assert evaluation["loss"] == pytest.approx(expected, abs=1e-5)
        assert evaluation["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert evaluations[1]["loss"] != evaluations[0]["loss"]  # the model trained in between
