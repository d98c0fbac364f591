"""LoRA (recipe.peft): its schema, the rules that refuse what it cannot train, the layout of the
adapters of Megatron's fused layers against peft's separate modules (in every tensor-parallel
slice), peft's initialisation, the checkpoint's record of the base weights and its checks, and
the names and config of the exported adapters."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

import pytest
import torch
from pydantic import ValidationError

from kubetron_api.ckpt_meta import PeftId, StepMeta, check_peft, weights_fingerprint
from kubetron_api.config import LoraTarget, ModelArch, PeftSpec, RecipeSpec
from kubetron_api.exitcodes import ConfigError
from kubetron_api.parse import parse_job
from kubetron_operator.cli.crd import crd
from kubetron_operator.plan import PlanError, plan
from kubetron_trainer.models import lora
from kubetron_trainer.models.hf_weights import fuse_qkv
from kubetron_trainer.models.lora import LORA_TARGETS
from tests.builders import job_dict
from tests.unit.test_multi_model_spec import DPO, multi_model_job, set_field

WEIGHTS = "/hf/qwen3"


def lora_job(peft: dict[str, Any] | None, preset: str = "gpt-tiny", **recipe: Any) -> Any:
    body = job_dict(preset, seqLength=64)
    body["spec"]["recipe"] |= {"kind": "finetune", **recipe}
    if recipe.get("kind", "finetune") == "finetune":
        body["spec"]["model"]["weights"] = WEIGHTS
    if peft is not None:
        body["spec"]["recipe"]["peft"] = peft
    return parse_job(body)


# --------------------------------------------------------------------------- schema


def test_peft_is_off_unless_set_and_its_bounds_are_the_schemas() -> None:
    assert RecipeSpec().peft is None
    spec = RecipeSpec.model_validate({"peft": {}}).peft
    assert spec is not None and spec.targets == ["qkv", "proj", "fc1", "fc2"]
    assert spec.scale == spec.alpha / spec.rank
    for bad in ({"rank": 0}, {"alpha": 0}, {"dropout": 1}, {"dropout": -0.1},
                {"targets": ["q_proj"]}, {"targets": []}, {"targets": ["qkv", "qkv"]},
                {"type": "ia3"}):  # fmt: skip
        with pytest.raises(ValidationError):
            PeftSpec.model_validate(bad)
    recipe = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    schema = recipe["properties"]["recipe"]["properties"]["peft"]
    assert "default" not in schema  # absent stays absent: a default {} would turn LoRA on
    props = schema["properties"]
    assert props["rank"]["minimum"] == 1
    assert (props["alpha"]["minimum"], props["alpha"]["exclusiveMinimum"]) == (0, True)
    assert (props["dropout"]["maximum"], props["dropout"]["exclusiveMaximum"]) == (1, True)
    assert props["targets"]["items"]["enum"] == list(get_args(LoraTarget)) == list(LORA_TARGETS)


# --------------------------------------------------------------------------- rules


def problems_of(job: Any) -> list[str]:
    with pytest.raises(PlanError) as info:
        plan(job)
    return info.value.problems


def test_lora_of_a_finetune_is_accepted_and_reaches_the_trainer() -> None:
    p = plan(lora_job({"rank": 8, "targets": ["qkv", "fc2"]}))
    peft = p.trainer_config.recipe.peft
    assert peft is not None and (peft.rank, peft.targets) == (8, ["qkv", "fc2"])


def test_lora_without_base_weights_is_refused() -> None:
    problems = problems_of(lora_job({}, kind="pretrain"))
    assert any(
        "spec.recipe.kind=pretrain: LoRA trains adapters on top of fixed base weights: set "
        "recipe.kind finetune and spec.model.weights" in p
        for p in problems
    ), problems


def test_lora_of_several_models_is_refused_for_now() -> None:
    problems = problems_of(parse_job(multi_model_job(DPO, set_field("recipe.peft", {}))))
    assert [p for p in problems if "LoRA" in p] == [
        "spec.recipe.peft: LoRA is not supported yet for a job of several models (spec.models "
        "with spec.recipe.kind=dpo): it trains adapters on the one model of a finetune; remove "
        "spec.recipe.peft"
    ], problems


def test_lora_on_an_moe_mlp_is_refused_and_attention_targets_pass() -> None:
    problems = problems_of(lora_job({}, preset="gpt-tiny-moe"))
    assert any("lists fc1 or fc2, which LoRA adapts in dense MLPs only" in p for p in problems)
    plan(lora_job({"targets": ["qkv", "proj"]}, preset="gpt-tiny-moe"))


def test_lora_where_transformer_engine_is_needed_is_refused() -> None:
    body = job_dict("gpt-tiny", seqLength=64, context=2, globalBatchSize=4)
    body["spec"]["recipe"] |= {"kind": "finetune", "peft": {}}
    body["spec"]["model"]["weights"] = WEIGHTS
    problems = problems_of(parse_job(body))
    assert any("LoRA adapts the linear layers of Megatron's local spec" in p for p in problems)


def test_the_crd_refuses_lora_without_finetune_and_with_several_models() -> None:
    rules = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    cel = [v["rule"] for v in rules["x-kubernetes-validations"] if "peft" in v["rule"]]
    assert "!has(self.recipe.peft) || !(self.recipe.kind == 'dpo' || " in cel[1]
    assert "self.recipe.kind == 'finetune'" in cel[0] and len(cel) == 2


# --------------------------------------------------------------------------- layout

ARCH = ModelArch.model_validate({
    "numLayers": 2, "hiddenSize": 64, "ffnHiddenSize": 96, "numAttentionHeads": 8,
    "numQueryGroups": 4, "kvChannels": 8, "vocabSize": 512, "maxPositionEmbeddings": 64,
})  # fmt: skip
R = 3


def random_pairs(target: str, fan_in: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """peft's (A, B) of each module of `target`, random."""
    g = torch.Generator().manual_seed(seed)
    rows = lora.rows_per_part(ARCH, target, 2 * ARCH.ffn_hidden_size)
    return [(torch.randn(R, fan_in, generator=g), torch.randn(n, R, generator=g)) for n in rows]


def local_rows(target: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s rows of a column-parallel layer's full tensor, as Megatron shards W."""
    if target == "fc1":  # [gate; up]: each half split over the ranks
        return torch.cat([half.chunk(tp)[rank] for half in full.chunk(2)])
    return full.chunk(tp)[rank]


@pytest.mark.parametrize("target", ["qkv", "fc1"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_fused_layers_adapter_is_peft_s_separate_adapters_on_every_tensor_rank(
    target: str, tp: int
) -> None:
    """B blocks(compact B) x A on each rank's rows is exactly that rank's rows of peft's
    deltas B_i A_i laid out as Megatron fuses W."""
    pairs = random_pairs(target, ARCH.hidden_size)
    deltas = [b @ a for a, b in pairs]
    full_delta = fuse_qkv(ARCH, *deltas) if target == "qkv" else torch.cat(deltas)
    a, b = lora.fuse(ARCH, target, pairs)
    assert a.shape == (len(pairs) * R, ARCH.hidden_size) and b.shape == (full_delta.shape[0], R)
    for rank in range(tp):
        rows = local_rows(target, b, tp, rank)
        part = lora.local_parts(ARCH, target, rows.shape[0], tp, rank)
        layer = SimpleNamespace(lora_parts=len(pairs), lora_B=rows, lora_part=part)
        got = lora.LoraLayer.blocks(layer) @ a  # type: ignore[arg-type]
        assert torch.allclose(got, local_rows(target, full_delta, tp, rank), atol=1e-5)
    back = lora.unfuse(ARCH, target, a, b)
    for got_pair, pair in zip(back, pairs, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(got_pair, pair, strict=True))


def test_one_rank_r_adapter_on_the_fused_layer_is_not_peft_s() -> None:
    """Why the block-diagonal B: a plain rank-3r adapter mixes q, k and v's A."""
    pairs = random_pairs("qkv", ARCH.hidden_size)
    a, b = lora.fuse(ARCH, "qkv", pairs)
    dense = torch.cat([b] * 3, dim=1)  # every row reading every module's A
    blocks = lora.LoraLayer.blocks(
        SimpleNamespace(lora_parts=3, lora_B=b, lora_part=lora.local_parts(ARCH, "qkv", 128, 1, 0))
    )  # type: ignore[arg-type]
    assert not torch.allclose(dense @ a, blocks @ a)


def test_single_module_targets_and_the_target_names() -> None:
    assert [lora.parts(ARCH, t) for t in LORA_TARGETS] == [3, 1, 2, 1]
    assert lora.target_modules(ARCH, ["qkv", "proj", "fc1", "fc2"]) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]  # fmt: skip
    gelu = ARCH.model_copy(update={"swiglu": False})
    assert lora.peft_modules(gelu, "fc1") == ("mlp.up_proj",)
    assert lora.target_of("decoder.layers.mlp.linear_fc1.lora_B") == "fc1"
    assert lora.target_of("decoder.layers.self_attention.linear_qkv.weight") == "qkv"
    assert lora.is_adapter_key("decoder.layers.0.mlp.linear_fc2.lora_A")
    assert not lora.is_adapter_key("decoder.layers.0.mlp.linear_fc2.weight")
    assert lora.peft_key(3, "self_attn.q_proj", "lora_A") == (
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    )


def test_peft_s_initialisation_from_the_seed() -> None:
    a = lora.init_part(1234, 0, "self_attn.q_proj", 8, 4096)
    assert torch.equal(a, lora.init_part(1234, 0, "self_attn.q_proj", 8, 4096))
    assert not torch.equal(a, lora.init_part(1234, 1, "self_attn.q_proj", 8, 4096))
    assert not torch.equal(a, lora.init_part(1234, 0, "self_attn.k_proj", 8, 4096))
    bound = 1 / math.sqrt(4096)  # kaiming_uniform_(a=sqrt(5)) of peft
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    theirs = torch.nn.init.kaiming_uniform_(torch.empty(8, 4096), a=math.sqrt(5))
    assert theirs.abs().max() <= bound
    pairs = lora.initial_pairs(ARCH, PeftSpec(rank=R), 1, 0, "qkv", (128, 64))
    assert [b.shape[0] for _, b in pairs] == [64, 32, 32]
    assert all(not b.any() for _, b in pairs)


def test_adapter_config_is_peft_s() -> None:
    config = lora.adapter_config(ARCH, PeftSpec(rank=4, alpha=8, targets=["proj"]), "/hf/x")
    assert config | {"target_modules": None} == config | {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.0,
        "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": "/hf/x",
        "target_modules": None,
    }  # fmt: skip
    assert config["target_modules"] == ["o_proj"]
    import peft

    assert peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}).r == 4


# --------------------------------------------------------------------------- checkpoints


def hf_dir(root: Path, value: float) -> Path:
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    save_file({"w": torch.full((4, 4), value)}, str(root / "model.safetensors"))
    return root


def test_the_fingerprint_follows_the_weights_not_the_path(tmp_path: Path) -> None:
    one = weights_fingerprint(hf_dir(tmp_path / "a", 1.0))
    assert one == weights_fingerprint(hf_dir(tmp_path / "copy", 1.0))
    assert one != weights_fingerprint(hf_dir(tmp_path / "b", 2.0))


def test_a_lora_checkpoint_resumes_only_onto_its_base_and_settings(tmp_path: Path) -> None:
    settings = {"type": "lora", "rank": 4, "alpha": 8.0, "targets": ["qkv"]}
    saved = PeftId(settings, "/hf/a", "f" * 64)
    assert PeftId.from_json(json.loads(json.dumps(saved.to_json()))) == saved
    check_peft(tmp_path, saved, PeftId(settings, "/mnt/elsewhere", "f" * 64))  # moved: fine
    with pytest.raises(ConfigError, match=r"config field model.weights: .* trained on the base "):
        check_peft(tmp_path, saved, PeftId(settings, "/hf/b", "0" * 64))
    with pytest.raises(ConfigError, match=r"config field recipe.peft: .* adapters of "):
        check_peft(tmp_path, saved, PeftId({**settings, "rank": 8}, "/hf/a", "f" * 64))
    with pytest.raises(ConfigError, match="holds LoRA adapters only"):
        check_peft(tmp_path, saved, None)
    with pytest.raises(ConfigError, match="holds a full model, not LoRA adapters"):
        check_peft(tmp_path, None, saved)
    check_peft(tmp_path, None, None)


def test_export_asks_for_peft_or_merged_on_a_lora_checkpoint_only() -> None:
    from kubetron_trainer.tools.export import check_lora_kind

    raw = {"format": 1, "step": 5, "consumedSamples": 20, "globalBatchSize": 4, "seed": 1,
           "model": {"preset": "x", "arch": {}, "paddedVocabSize": 512},
           "shape": {"worldSize": 1}}  # fmt: skip
    full = StepMeta.from_json(raw)
    settings = {"type": "lora", "rank": 4, "alpha": 8.0, "targets": ["qkv"]}
    adapters = StepMeta.from_json(raw | {"peft": PeftId(settings, "/hf", "0").to_json()})
    with pytest.raises(ConfigError, match=r"holds LoRA adapters only .* pass --peft"):
        check_lora_kind(adapters, None)
    with pytest.raises(ConfigError, match="config field --merged: step 5 holds a full model"):
        check_lora_kind(full, "merged")
    check_lora_kind(adapters, "peft")
    check_lora_kind(full, None)
