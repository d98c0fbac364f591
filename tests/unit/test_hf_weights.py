"""Hugging Face weights into kubetron's Megatron model: logits equal
transformers' on the same tokens; a config.json that does not fit is refused naming each key.

The parity checks run `tests.hf_models` in a subprocess (a gloo world of one): torch.distributed
stays out of the pytest process. Tensor-parallel parity, the finetune run and the export are in
tests/distributed/test_hf_cpu.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetron_api.config import PRESETS, TrainerConfig
from kubetron_api.exitcodes import ConfigError
from kubetron_api.hf_config import check_model_weights, check_weights, hf_config, mismatches
from kubetron_trainer.__main__ import main as trainer_main
from tests.hf_models import PRESET, check_round_trip, model_spec, run_parity, save_hf_model


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "vocab"),
    [("qwen3", 500), ("llama", 512)],  # 500: padded to 512 with zero rows, cut off again
)
def test_loaded_weights_give_transformers_logits(tmp_path: Path, kind: str, vocab: int) -> None:
    directory = tmp_path / kind
    save_hf_model(kind, vocab, directory)
    result = run_parity(directory, kind, vocab, tp=1, world=1)
    assert result["max_logit"] > 0.5  # random weights give logits of size
    assert result["max_diff"] <= 1e-4, result


@pytest.mark.slow
def test_an_moe_checkpoint_exports_back_to_its_weights(tmp_path: Path) -> None:
    """Qwen3 MoE (router, per-expert gate/up/down) through a TP1 kubetron checkpoint and back;
    MoE logits need CUDA in Megatron-Core (tests/gpu/test_hf_gpu.py)."""
    check_round_trip(tmp_path, "qwen3_moe", 512, tp=1, world=1, ep=1)


def test_fused_qkv_is_megatrons_group_order() -> None:
    from kubetron_trainer.models.hf_weights import fuse_qkv, split_qkv

    arch = model_spec("qwen3", 512).resolve()  # 4 heads, 2 groups, head size 16
    h, d = arch.hidden_size, arch.kv_channels
    q, k, v = (torch.randn(n * d, h) for n in (4, 2, 2))
    fused = fuse_qkv(arch, q, k, v)
    # group 0: q heads 0-1, k head 0, v head 0; then group 1
    expected = torch.cat([q[: 2 * d], k[:d], v[:d], q[2 * d :], k[d:], v[d:]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(arch, fused), (q, k, v), strict=True))


def _hf_dir(tmp_path: Path, kind: str = "qwen3", vocab: int = 512) -> Path:
    directory = tmp_path / "hf"
    save_hf_model(kind, vocab, directory)
    return directory


# config.json change -> what the refusal names (the key, its value, the model's, the field)
MISMATCHES: dict[str, tuple[dict[str, Any], str]] = {
    "layers": ({"num_hidden_layers": 3}, "num_hidden_layers=3, the model needs 2 (numLayers)"),
    "hidden": ({"hidden_size": 128}, "hidden_size=128, the model needs 64 (hiddenSize)"),
    "ffn": ({"intermediate_size": 96}, "intermediate_size=96, the model needs 128"),
    "heads": ({"num_attention_heads": 8}, "num_attention_heads=8, the model needs 4"),
    "groups": ({"num_key_value_heads": 4}, "num_key_value_heads=4, the model needs 2"),
    "head size": ({"head_dim": 32}, "head_dim=32, the model needs 16 (kvChannels)"),
    "vocab": ({"vocab_size": 600}, "vocab_size=600, the model needs 512 (vocabSize)"),
    "rope theta": (
        {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
        "rope_theta=10000.0, the model needs 1000000.0 (rotaryBase)",
    ),
    "rope scaling": (
        {"rope_parameters": {"rope_theta": 1e6, "rope_type": "llama3", "factor": 8.0}},
        "rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': None",
    ),
    "norm eps": ({"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05, the model needs 1e-06"),
    "untied": ({"tie_word_embeddings": False}, "tie_word_embeddings=False, the model needs True"),
    "llama": ({"model_type": "llama"}, "model_type='llama', the model needs 'qwen3'"),
    "moe": ({"num_experts": 8}, "num_experts=8: an MoE checkpoint, a dense model"),
    "bias": ({"attention_bias": True}, "attention_bias=True, the model needs False"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_a_config_that_does_not_fit_is_refused_naming_the_key(tmp_path: Path, case: str) -> None:
    directory = _hf_dir(tmp_path)
    arch = model_spec("qwen3", 512).resolve()
    check_weights(arch, "qwen3-0.6b", directory)  # fits as saved
    change, fragment = MISMATCHES[case]
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(raw | change))
    with pytest.raises(ConfigError) as info:
        check_weights(arch, "qwen3-0.6b", directory)
    assert info.value.field == "spec.model.weights"
    assert fragment in str(info.value), str(info.value)
    assert "pick the preset and spec.model.overrides of that checkpoint" in str(info.value)


def test_the_exported_config_fits_every_supported_preset() -> None:
    for name, arch in PRESETS.items():
        if name.startswith("gpt-tiny"):
            continue
        assert mismatches(arch, hf_config(arch)) == [], name
    assert hf_config(PRESETS["llama3-8b"])["rms_norm_eps"] == 1e-5
    assert hf_config(PRESETS["qwen3-30b-a3b"])["architectures"] == ["Qwen3MoeForCausalLM"]


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing", "is not a directory"),
        ("no safetensors", "holds no *.safetensors files"),
        ("no config", "config.json does not exist"),
        ("gpt-tiny", "preset gpt-tiny has learned_absolute positions (supported: rope)"),
    ],
)
def test_weights_that_cannot_load_are_refused(tmp_path: Path, case: str, fragment: str) -> None:
    directory = _hf_dir(tmp_path)
    arch, preset = model_spec("qwen3", 512).resolve(), "qwen3-0.6b"
    if case == "missing":
        directory = tmp_path / "nowhere"
    elif case == "no safetensors":
        (directory / "model.safetensors").unlink()
    elif case == "no config":
        (directory / "config.json").unlink()
    else:
        arch, preset = PRESETS["gpt-tiny"], "gpt-tiny"
    with pytest.raises(ConfigError, match=r"spec\.model\.weights") as info:
        check_weights(arch, preset, directory)
    assert fragment in str(info.value)


def test_a_model_of_several_names_its_own_weights_field(tmp_path: Path) -> None:
    """spec.models[i].weights: the same checks, refusals naming that field and saying which two
    kinds of directory it takes; one model's spec.model.weights messages are as they were."""
    directory = _hf_dir(tmp_path)
    arch, preset, field = model_spec("qwen3", 512).resolve(), "qwen3-0.6b", "spec.models[1].weights"
    assert check_model_weights(arch, preset, directory, field) == "huggingface"
    assert check_model_weights(arch, preset, directory) == "huggingface"
    both = (
        "; spec.models[1].weights names a Hugging Face checkpoint directory (config.json and "
        "*.safetensors) or a kubetron checkpoint directory (the step its `latest` names)"
    )
    nowhere, empty = tmp_path / "nowhere", tmp_path / "empty"
    empty.mkdir()
    mount = "mount the volume that holds the Hugging Face checkpoint and name its directory"
    expected = {
        (nowhere, field): f"{nowhere} is not a directory; {mount}{both}",
        (nowhere, "spec.model.weights"): f"{nowhere} is not a directory; {mount}",
        (empty, field): f"{empty / 'config.json'} does not exist{both}",
        (empty, "spec.model.weights"): f"{empty / 'config.json'} does not exist",
    }
    for (path, name), message in expected.items():
        with pytest.raises(ConfigError) as info:
            check_model_weights(arch, preset, path, name)
        assert str(info.value) == f"config field {name}: {message}"
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(raw | {"num_hidden_layers": 3}))
    with pytest.raises(ConfigError) as info:
        check_model_weights(arch, preset, directory, field)
    assert info.value.field == field
    assert str(info.value).endswith(
        "num_hidden_layers=3, the model needs 2 (numLayers); pick the preset and "
        "spec.models[1].overrides of that checkpoint"
    )


def test_the_trainer_refuses_unfit_weights_before_joining(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = _hf_dir(tmp_path)
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(raw | {"num_hidden_layers": 4}))
    spec = model_spec("qwen3", 512)
    cfg = TrainerConfig.model_validate(
        {"model": spec.resolve().model_dump(), "preset": PRESET["qwen3"],
         "weights": str(directory),
         "recipe": {"kind": "finetune", "precision": "fp32", "seqLength": 32},
         "metrics": {"enabled": False}, "gpusPerNode": 1}
    )  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    assert trainer_main(["--config", str(path), "--device", "cpu"]) == 2
    assert "config field spec.model.weights" in caplog.text
    assert "num_hidden_layers=4, the model needs 2 (numLayers)" in caplog.text
    assert "exiting 2 (not retryable)" in caplog.text


def test_the_expert_count_is_read_under_either_name() -> None:
    """Qwen's published configs say num_experts; transformers 5 writes num_local_experts."""
    arch = PRESETS["qwen3-30b-a3b"]
    raw = hf_config(arch)
    raw["num_local_experts"] = raw.pop("num_experts")
    assert mismatches(arch, raw) == []
    raw["num_local_experts"] = 64
    assert mismatches(arch, raw) == ["num_experts=64, the model needs 128 (numExperts)"]
    dense = model_spec("qwen3", 512).resolve()
    assert mismatches(dense, hf_config(dense) | {"num_local_experts": 8}) == [
        "num_experts=8: an MoE checkpoint, a dense model"
    ]


def test_export_shard_sizes_and_plan() -> None:
    import argparse

    from kubetron_trainer.tools.export import parse_size, shard_plan

    assert [parse_size(t) for t in ("5GB", "500mb", "100KB", "2048")] == [5e9, 5e8, 1e5, 2048]
    for bad in ("5XB", "0GB", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
    sizes = {"a": 40, "b": 70, "c": 20, "d": 150, "e": 10}
    assert shard_plan(sizes, 100) == [["a"], ["b", "c"], ["d"], ["e"]]  # d alone: larger
    assert shard_plan(sizes, 10**9) == [list(sizes)]


def test_llama31_rope_scaling_is_megatrons_and_matches_its_config() -> None:
    """Megatron's llama3 RoPE scaling (the preset llama3.1-8b) gives transformers' inverse
    frequencies for the real head size, and config.json's scaling is checked key by key."""
    import transformers
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    arch = PRESETS["llama3.1-8b"]
    cfg = hf_config(arch)
    assert cfg["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    ours = RotaryEmbedding(
        kv_channels=arch.kv_channels, rotary_percent=1.0, rotary_base=arch.rotary_base,
        rope_scaling=True, rope_scaling_factor=8.0, use_cpu_initialization=True,
    ).inv_freq  # fmt: skip
    params = {**cfg["rope_scaling"], "rope_theta": float(arch.rotary_base)}
    config = transformers.LlamaConfig(
        hidden_size=arch.hidden_size, num_attention_heads=arch.num_attention_heads,
        head_dim=arch.kv_channels, max_position_embeddings=arch.max_position_embeddings,
        rope_parameters=params,
    )  # fmt: skip
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"]
    theirs, _ = init(config, "cpu")
    plain = 1.0 / arch.rotary_base ** (torch.arange(0, 128, 2).float() / 128)
    assert not torch.allclose(theirs, plain)  # the scaling changes the low frequencies
    assert torch.allclose(ours.float(), theirs.float(), rtol=1e-6, atol=0)
    # v5's rope_parameters (theta inside) and v4's rope_scaling both match; llama3-8b refuses it
    assert mismatches(arch, cfg | {"rope_scaling": None, "rope_parameters": params}) == []
    assert mismatches(arch, cfg) == []
    problems = mismatches(PRESETS["llama3-8b"], hf_config(arch) | {"max_position_embeddings": 8192})
    assert problems == [
        f"rope_scaling={cfg['rope_scaling']!r}, the model needs None (ropeScalingFactor "
        "(Llama 3.1's llama3 scaling or none))"
    ]
    other = cfg | {"rope_scaling": cfg["rope_scaling"] | {"factor": 32.0}}
    assert "'factor': 32.0" in mismatches(arch, other)[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a check as another user")
def test_weights_the_trainer_user_cannot_read_are_refused_before_joining() -> None:
    """safetensors writes 0600 files: saved by root, the image's user 10001 cannot read them.
    The check says so (uid, mode, owner, the fix) instead of a missing-file error later."""
    directory = Path(tempfile.mkdtemp(prefix="kubetron-perm-"))
    try:
        directory.chmod(0o755)
        save_hf_model("qwen3", 512, directory / "hf")
        assert (directory / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o600
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child drops to the image's user, runs the check, reports, exits
            os.setgid(10001)
            os.setuid(10001)
            try:
                check_weights(PRESETS["qwen3-0.6b"], "qwen3-0.6b", directory / "hf")
                out = "no error"
            except Exception as err:
                out = f"{type(err).__name__} {err}"
            os.write(write, out.encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read) as pipe:
            out = pipe.read()
        assert "ConfigError config field spec.model.weights:" in out, out
        assert "model.safetensors cannot be read by this process (uid 10001, gid 10001)" in out
        assert "mode -rw-------, owner uid 0" in out and "chmod -R a+rX" in out, out
    finally:
        shutil.rmtree(directory)
