"""LoRA fine-tuning on CPU processes (gloo, fp32): a tiny random Qwen3 saved by transformers
gets adapters on every linear layer (qkv, proj, fc1, fc2) in TP2 x DP2. The adapters start from
a peft adapter directory whose A and B are both random (B = 0, peft's start, would leave the
model its base and check nothing of the adapters' arithmetic): the trainer's first loss is
peft's on the same samples. The checkpoint holds the adapters alone; a resumed run loads the
base from spec.model.weights, then the adapters, and its first loss is that of peft with the
exported adapters on the next samples; `kubetron-export --merged` is peft's merged model; a
resume onto another base is refused. peft's initialisation from the seed starts TP2 x DP2 and
DP4 from the same adapters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from devtools.training.launch import example_config, launch, run
from kubetron_api.ckpt_meta import step_dir
from kubetron_trainer.data.batches import MockDataset
from tests.hf_models import PRESET, export, exported_tensors, model_spec, save_hf_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
VOCAB, SEQ, GBS, RANK, ALPHA, STEPS = 512, 32, 4, 4, 8.0, 4
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(
    weights: Path, adapters: Path | None, ckpt: Path, steps: int, world: int = 4,
    parallelism: dict[str, int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A LoRA finetune of `weights` (from `adapters`), TP2 x DP2 unless told otherwise."""
    peft: dict[str, Any] = {"rank": RANK, "alpha": ALPHA}
    if adapters is not None:
        peft["adapters"] = str(adapters)
    cfg = example_config(
        recipe={
            "kind": "finetune", "trainIters": steps, "globalBatchSize": GBS,
            "microBatchSize": 1, "seqLength": SEQ, "logInterval": 1, "peft": peft,
            "lrSchedule": {"style": "constant", "warmupIters": 0},
        },
        checkpoint={"path": str(ckpt), "saveInterval": 100},
        metrics={"enabled": False}, worldSize=world, gpusPerNode=world,
        preset=PRESET["qwen3"], weights=str(weights),
    )  # fmt: skip
    cfg["model"] = model_spec("qwen3", VOCAB).resolve().model_dump(mode="json", by_alias=True)
    cfg["recipe"]["optimizer"] |= {"lr": 1e-2, "minLr": 0.0}
    cfg["parallelism"] |= parallelism or {"tensor": 2}
    return cfg


def peft_model(base: Path, adapters: Path | None = None) -> Any:
    """transformers' model of `base` with peft's LoRA: from `adapters`, or random A and B."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    if adapters is not None:
        return peft.PeftModel.from_pretrained(model, adapters).eval()
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=MODULES, lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    return wrapped.eval()


def loss_of(model: Any, first: int, count: int) -> float:
    """The mean token loss over mock samples first..first+count-1 (every token counts)."""
    data = MockDataset(VOCAB, SEQ, 10 * GBS, seed=1234)
    losses = []
    for i in range(first, first + count):
        sample = data[i]
        with torch.no_grad():
            logits = model(input_ids=sample["tokens"][None]).logits[0]
        losses.append(torch.nn.functional.cross_entropy(logits.double(), sample["labels"]))
    return float(torch.stack(losses).mean())


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """A tiny Qwen3 (transformers), random peft adapters on it and peft's first-step loss."""
    root = tmp_path_factory.mktemp("lora-weights")
    save_hf_model("qwen3", VOCAB, root / "hf", seed=0)
    model = peft_model(root / "hf")
    model.save_pretrained(root / "adapters")
    return root / "hf", root / "adapters", loss_of(model, 0, GBS)


def test_lora_first_loss_equals_peft_and_the_checkpoint_holds_the_adapters(
    weights: tuple[Path, Path, float], tmp_path: Path
) -> None:
    base, adapters, expected = weights
    ckpt = tmp_path / "ckpt"
    started = run(lora_config(base, adapters, ckpt, STEPS), tmp_path / "run")
    losses = [s["loss"] for s in started.result()["steps"]]
    assert losses[0] == pytest.approx(expected, abs=1e-5), (losses, expected)
    assert losses[-1] < losses[0], losses
    assert "LoRA r=4 alpha=8 dropout=0 on qkv,proj,fc1,fc2" in started.output()

    # the checkpoint: the adapters and their optimizer state, and the base it needs
    from megatron.core import dist_checkpointing

    keys = list(dist_checkpointing.load_tensors_metadata(str(step_dir(ckpt, STEPS))))
    assert keys and all(".lora_" in k for k in keys), keys
    meta = json.loads((step_dir(ckpt, STEPS) / "kubetron.json").read_text())
    assert meta["peft"]["base"]["weights"] == str(base)

    # export: peft loads the adapters; a resumed run's first loss is theirs on the next samples
    done = export(ckpt, tmp_path / "peft", "--peft")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exported = peft_model(base, tmp_path / "peft")
    resumed = run(lora_config(base, adapters, ckpt, STEPS + 1), tmp_path / "resumed")
    summary = resumed.result()
    assert summary["resumed_from"] == STEPS and summary["start"] == "checkpoint"
    assert summary["steps"][0]["loss"] == pytest.approx(
        loss_of(exported, STEPS * GBS, GBS), abs=1e-5
    )

    # --merged: the base with the adapters added in, as peft merges them
    done = export(ckpt, tmp_path / "merged", "--merged", "--step", str(STEPS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    merged = exported_tensors(tmp_path / "merged")
    theirs = exported.merge_and_unload().state_dict()
    assert set(merged) == set(theirs) - {"lm_head.weight"}
    assert all(torch.allclose(merged[k], theirs[k], atol=1e-6) for k in merged)


def test_lora_resume_onto_another_base_is_refused(
    weights: tuple[Path, Path, float], tmp_path: Path
) -> None:
    base, adapters, _ = weights
    ckpt = tmp_path / "ckpt"
    run(lora_config(base, adapters, ckpt, 1), tmp_path / "run")
    other = tmp_path / "other"
    save_hf_model("qwen3", VOCAB, other, seed=5)
    started = launch(lora_config(other, adapters, ckpt, 2), tmp_path / "resumed")
    assert started.wait() == [2] * 4
    out = started.output()
    assert "config field model.weights" in out and str(base) in out, out[-3000:]


def test_lora_starts_from_the_same_adapters_in_every_shape(
    weights: tuple[Path, Path, float], tmp_path: Path
) -> None:
    """peft's initialisation from the seed (B = 0: step 1 is the base's loss) gives the same
    adapters in TP2 x DP2 and DP4: step 2, after the first update, has the same loss."""
    import transformers

    base = weights[0]
    losses = {}
    for name, shape in (("tp2", {"tensor": 2}), ("dp4", {"tensor": 1})):
        cfg = lora_config(base, None, tmp_path / name / "ckpt", 2, parallelism=shape)
        steps = run(cfg, tmp_path / name).result()["steps"]
        losses[name] = [s["loss"] for s in steps]
    plain = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    assert losses["tp2"][0] == pytest.approx(loss_of(plain, 0, GBS), abs=1e-5)
    assert losses["tp2"] == pytest.approx(losses["dp4"], abs=1e-5), losses
    moved = losses["tp2"][1] - loss_of(plain, GBS, GBS)  # the adapters are no longer zero
    assert abs(moved) > 1e-4, losses
