"""Hugging Face weights in and out on CPU processes (gloo).

Tiny random Qwen3 and Llama models built with transformers load into kubetron's Megatron model
in tensor-parallel shapes with transformers' logits. A finetune run (TP2) starts at step 0 from
the weights: its first loss is the transformers model's loss on the same batch. Its checkpoint,
exported to a Hugging Face directory by `kubetron_trainer.tools.export` (one process, TP1), loads in
transformers with the loss the trainer computed with those weights at the next step. A restart
of the finetune resumes from its checkpoint instead of the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from devtools.training.launch import example_config, run
from kubetron_trainer.data.batches import MockDataset
from tests.hf_models import (
    PRESET,
    check_round_trip,
    export,
    model_spec,
    run_parity,
    save_hf_model,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TOL = 1e-4


@pytest.mark.parametrize(
    ("kind", "vocab", "tp", "world"),
    [("qwen3", 500, 2, 2), ("llama", 512, 2, 2), ("llama31", 512, 2, 2), ("qwen3", 512, 2, 4)],
    ids=["qwen3-TP2", "llama-TP2", "llama3.1-rope-scaling-TP2", "qwen3-TP2xDP2"],
)
def test_tensor_parallel_load_gives_transformers_logits(
    tmp_path: Path, kind: str, vocab: int, tp: int, world: int
) -> None:
    directory = tmp_path / kind
    save_hf_model(kind, vocab, directory)
    result = run_parity(directory, kind, vocab, tp=tp, world=world)
    assert result["tp"] == tp
    assert result["max_logit"] > 0.5
    assert result["max_diff"] <= TOL, result


@pytest.mark.parametrize(("tp", "world"), [(1, 2), (2, 4)], ids=["PP2", "TP2xPP2"])
def test_pipeline_parallel_load_gives_transformers_logits(
    tmp_path: Path, tp: int, world: int
) -> None:
    """Llama (untied) over two pipeline stages on CPU: each stage loads its layers, the last
    stage's logits are transformers'. (A tied model's two embedding copies go through
    Megatron's CUDA-only setup under pipeline parallelism: Qwen3 PP2 is checked on GPUs, in
    tests/gpu/test_hf_gpu.py.)"""
    directory = tmp_path / "llama"
    save_hf_model("llama", 512, directory)
    result = run_parity(directory, "llama", 512, tp, world, "2")
    assert (result["tp"], result["pp"]) == (tp, 2)
    assert result["max_logit"] > 0.5
    assert result["max_diff"] <= TOL, result


def finetune_config(weights: Path, ckpt: Path, iters: int, tensor: int = 2) -> dict[str, Any]:
    spec = model_spec("qwen3", 512)
    cfg = example_config(
        recipe={
            "kind": "finetune", "trainIters": iters, "globalBatchSize": 2,
            "microBatchSize": 1, "seqLength": 32, "logInterval": 1,
            "lrSchedule": {"style": "constant", "warmupIters": 0},
        },
        parallelism={"tensor": tensor},
        checkpoint={"path": str(ckpt), "saveInterval": 2},
        metrics={"enabled": False},
        worldSize=tensor, gpusPerNode=tensor, preset=PRESET["qwen3"], weights=str(weights),
    )  # fmt: skip
    cfg["model"] = spec.resolve().model_dump(mode="json", by_alias=True)
    cfg["recipe"]["optimizer"] |= {"lr": 1e-3, "minLr": 0.0}
    return cfg


def hf_loss(model: Any, cfg: dict[str, Any], step: int) -> float:
    """The transformers model's mean token loss on the global batch of step `step` (1-based):
    the trainer's mock samples, every token counted (equal micro-batches)."""
    r = cfg["recipe"]
    data = MockDataset(cfg["model"]["vocabSize"], r["seqLength"], 10**6, r["seed"])
    gbs = r["globalBatchSize"]
    samples = [data[i] for i in range((step - 1) * gbs, step * gbs)]
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    with torch.no_grad():
        logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return float(loss)


def test_finetune_starts_from_the_weights_and_exports_back(tmp_path: Path) -> None:
    import transformers
    from safetensors.torch import load_file

    weights, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    original = save_hf_model("qwen3", 512, weights)
    cfg = finetune_config(weights, ckpt, iters=3)
    summary = run(cfg, tmp_path / "run").result()
    losses = [s["loss"] for s in summary["steps"]]
    assert summary["start"] == "weights" and summary["resumed_from"] == 0
    # step 1 runs on the Hugging Face weights as loaded
    assert losses[0] == pytest.approx(hf_loss(original, cfg, 1), abs=TOL)

    # export step 2 (saved by TP2) in one process; transformers loads it
    out = tmp_path / "export"
    done = export(ckpt, out, "--step", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    # the trainer's step 3 ran on the weights of step 2: the export's loss on that batch
    assert losses[2] == pytest.approx(hf_loss(exported, cfg, 3), abs=TOL)
    tensors, before = load_file(out / "model.safetensors"), load_file(weights / "model.safetensors")
    assert set(tensors) == set(before)  # tied: no lm_head.weight, like the original
    moved = max((tensors[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-4  # it trained: the export is not the original

    # a restart of the finetune resumes from its own checkpoint (step 3), not the weights
    again = run(finetune_config(weights, ckpt, iters=4), tmp_path / "restart").result()
    assert again["start"] == "checkpoint" and again["resumed_from"] == 3
    assert [s["step"] for s in again["steps"]] == [4]


@pytest.mark.parametrize(
    ("kind", "vocab", "tp", "world", "ep", "shard"),
    [
        ("qwen3", 500, 2, 2, 1, None),
        ("llama", 500, 2, 2, 1, "100KB"),  # 2 x 128 KB embeddings + layers: 3 shards or more
        ("qwen3_moe", 512, 1, 2, 2, None),
    ],
    ids=["qwen3-TP2", "llama-TP2-sharded", "qwen3-moe-EP2"],
)
def test_export_of_another_shape_gives_back_the_weights(
    tmp_path: Path, kind: str, vocab: int, tp: int, world: int, ep: int, shard: str | None
) -> None:
    check_round_trip(
        tmp_path, kind, vocab, tp, world, ep, *(["--max-shard-size", shard] if shard else [])
    )
    shards = sorted((tmp_path / "export").glob("model-*-of-*.safetensors"))
    assert (len(shards) >= 3) == (shard is not None), shards


def test_export_refuses_a_model_without_hugging_face_counterpart(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    cfg = example_config(
        recipe={"trainIters": 1},
        checkpoint={"path": str(ckpt), "saveInterval": 1},
        metrics={"enabled": False},
        parallelism={"tensor": 1},
        worldSize=1,
        gpusPerNode=1,
    )
    cfg["recipe"]["globalBatchSize"] = 2
    run(cfg, tmp_path / "run")
    done = export(ckpt, tmp_path / "out")
    assert done.returncode == 2
    assert "learned_absolute positions" in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()
