"""Hugging Face `config.json` and kubetron's `ModelArch`: which checkpoints fit which model.

Torch-free: the trainer checks a model's weights here before it joins the job (a finetune's
`spec.model.weights`, each of `spec.models[].weights`: a Hugging Face checkpoint, or a kubetron
checkpoint directory whose `latest` step was written with the same architecture), and the
export command writes the `config.json` of a kubetron checkpoint from the same table.
Supported: Qwen3 (`Qwen3ForCausalLM`), Qwen3 MoE (`Qwen3MoeForCausalLM`) and Llama
(`LlamaForCausalLM`, Llama 3 without RoPE scaling): SwiGLU, RMSNorm, RoPE, no biases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubetron_api.ckpt_meta import (
    StepMeta,
    arch_differences,
    is_checkpoint_dir,
    model_dirs,
    weights_step,
)
from kubetron_api.config import ModelArch
from kubetron_api.exitcodes import ConfigError
from kubetron_api.files import unreadable

WEIGHTS_FIELD = "spec.model.weights"
ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
}


def model_type(arch: ModelArch) -> str:
    """The Hugging Face `model_type` of an architecture (Qwen3 has q/k norms, Llama none)."""
    if arch.is_moe:
        return "qwen3_moe"
    return "qwen3" if arch.qk_layernorm else "llama"


def unsupported(arch: ModelArch) -> list[str]:
    """Why `arch` has no Hugging Face counterpart here (empty when it has one)."""
    why = []
    if not arch.swiglu:
        why.append("a GELU MLP (supported: SwiGLU)")
    if arch.normalization != "RMSNorm":
        why.append(f"{arch.normalization} (supported: RMSNorm)")
    if arch.position_embedding_type != "rope":
        why.append(f"{arch.position_embedding_type} positions (supported: rope)")
    if arch.is_moe and not arch.qk_layernorm:
        why.append("an MoE model without q/k norms (supported: Qwen3 MoE)")
    return why


def hf_config(arch: ModelArch) -> dict[str, Any]:
    """The `config.json` of `arch` (what export writes; what a checkpoint must match)."""
    kind = model_type(arch)
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "num_hidden_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.kv_channels,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "rope_theta": float(arch.rotary_base),
        "rms_norm_eps": arch.norm_epsilon,
        "tie_word_embeddings": not arch.untie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "rope_scaling": rope_scaling(arch),
    }
    if kind == "llama":
        cfg["mlp_bias"] = False
    if arch.is_moe:
        cfg |= {
            "num_experts": arch.num_experts,
            "num_experts_per_tok": arch.moe_router_topk,
            "moe_intermediate_size": arch.moe_ffn_hidden_size,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    return cfg


# Llama 3.1's RoPE scaling as Megatron-Core applies it (its constants; the factor is the model's)
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA3_ORIGINAL_CONTEXT = 8192


def rope_scaling(arch: ModelArch) -> dict[str, Any] | None:
    """config.json's `rope_scaling` of `arch`: None, or Llama 3.1's llama3 type."""
    if arch.rope_scaling_factor is None:
        return None
    return {
        "rope_type": "llama3", "factor": float(arch.rope_scaling_factor), **LLAMA3_ROPE,
        "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT,
    }  # fmt: skip


def _scaling(raw: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's RoPE scaling (`rope_scaling`, or v5's `rope_parameters`) in the form
    `rope_scaling` returns, so the two compare; unknown types keep their keys."""
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        return {k: v for k, v in scaling.items() if k != "rope_theta"}
    out: dict[str, Any] = {"rope_type": kind}
    for key in ("factor", *LLAMA3_ROPE):
        out[key] = float(scaling[key]) if isinstance(scaling.get(key), int | float) else None
    original = scaling.get("original_max_position_embeddings")
    out["original_max_position_embeddings"] = original
    return out


@dataclass(frozen=True)
class Check:
    """One config.json key, the ModelArch field it must equal (camelCase) and its HF default."""

    key: str
    field: str
    default: Any = None


# What must agree; the defaults are transformers' for Qwen3/Llama configs that omit the key.
CHECKS: tuple[Check, ...] = (
    Check("model_type", "qkLayernorm/numExperts (Qwen3, Qwen3 MoE or Llama)"),
    Check("num_hidden_layers", "numLayers"),
    Check("hidden_size", "hiddenSize"),
    Check("intermediate_size", "ffnHiddenSize"),
    Check("num_attention_heads", "numAttentionHeads"),
    Check("num_key_value_heads", "numQueryGroups"),
    Check("head_dim", "kvChannels"),
    Check("vocab_size", "vocabSize"),
    Check("rope_theta", "rotaryBase"),
    Check("rms_norm_eps", "normEpsilon"),
    Check("tie_word_embeddings", "untieEmbeddings (inverted)", False),
    Check("hidden_act", "swiglu (silu)", "silu"),
    Check("attention_bias", "no biases", False),
    Check("mlp_bias", "no biases", False),
    Check("rope_scaling", "ropeScalingFactor (Llama 3.1's llama3 scaling or none)", None),
    Check("num_experts", "numExperts"),
    Check("num_experts_per_tok", "moeRouterTopk"),
    Check("moe_intermediate_size", "moeFfnHiddenSize"),
    Check("norm_topk_prob", "Megatron's top-k then softmax router (normalized)"),
    Check("decoder_sparse_step", "an MoE MLP in every layer", 1),
    Check("mlp_only_layers", "an MoE MLP in every layer", []),
)


def _value(raw: dict[str, Any], check: Check) -> Any:
    """config.json's value of a key, with transformers' defaults and v5's `rope_parameters`."""
    rope = raw.get("rope_parameters") or {}
    if check.key == "head_dim" and raw.get("head_dim") is None:
        return raw["hidden_size"] // raw["num_attention_heads"]
    if check.key == "num_key_value_heads" and raw.get(check.key) is None:
        return raw.get("num_attention_heads")
    if check.key == "num_experts" and raw.get("num_experts") is None:
        return raw.get("num_local_experts")  # what transformers 5 writes for Qwen3 MoE
    if check.key == "rope_theta" and "rope_theta" not in raw:
        return rope.get("rope_theta")
    if check.key == "rope_scaling":
        return _scaling(raw)
    return raw.get(check.key, check.default)


def mismatches(arch: ModelArch, raw: dict[str, Any]) -> list[str]:
    """Each config.json key whose value differs from what `arch` needs, with both values."""
    want = hf_config(arch)
    out = []
    for check in CHECKS:
        if check.key not in want:  # an MoE key of a dense model, mlp_bias of Qwen3
            experts = _value(raw, check) if check.key == "num_experts" else raw.get(check.key)
            if check.key.startswith(("num_experts", "moe_")) and experts:
                out.append(f"{check.key}={experts!r}: an MoE checkpoint, a dense model")
            continue
        have = _value(raw, check)
        expected = want[check.key]
        same = have == expected
        if isinstance(expected, float) and isinstance(have, int | float):
            same = abs(have - expected) <= 1e-9 * max(abs(expected), 1e-30)
        if not same:
            out.append(f"{check.key}={have!r}, the model needs {expected!r} ({check.field})")
    return out


def _both_kinds(field: str) -> str:
    """What a multi-model job's weights may name, appended to the refusals of a directory that
    is no Hugging Face checkpoint (one model's spec.model.weights reads Hugging Face's only)."""
    if field == WEIGHTS_FIELD:
        return ""
    return (
        f"; {field} names a Hugging Face checkpoint directory (config.json and *.safetensors) "
        "or a kubetron checkpoint directory (the step its `latest` names)"
    )


def _fit_fix(field: str) -> str:
    return f"pick the preset and {field.removesuffix('.weights')}.overrides of that checkpoint"


def read_hf_config(directory: Path, field: str = WEIGHTS_FIELD) -> dict[str, Any]:
    """`directory/config.json`, refusing (ConfigError on `field`) a directory without it or
    without safetensors files."""
    if not directory.is_dir():
        raise ConfigError(
            field,
            f"{directory} is not a directory; mount the volume that holds the Hugging Face "
            f"checkpoint and name its directory{_both_kinds(field)}",
        )
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(field, f"{path} does not exist{_both_kinds(field)}") from None
    except PermissionError:
        raise ConfigError(field, unreadable(path) or f"{path}: permission denied") from None
    except json.JSONDecodeError as err:
        raise ConfigError(field, f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(field, f"{path} does not hold a JSON object")
    if not any(directory.glob("*.safetensors")):
        raise ConfigError(
            field,
            f"{directory} holds no *.safetensors files (only safetensors checkpoints are read; "
            "convert .bin weights with transformers' save_pretrained)",
        )
    blocked = [unreadable(p) for p in sorted(directory.glob("*.safetensors*"))]
    if problems := [p for p in blocked if p is not None]:
        raise ConfigError(field, "; ".join(problems))
    return raw


def check_weights(
    arch: ModelArch, preset: str, directory: Path, field: str = WEIGHTS_FIELD
) -> dict[str, Any]:
    """Refuse Hugging Face weights that do not fit the resolved architecture, naming every
    differing key; returns the checkpoint's config.json."""
    if why := unsupported(arch):
        raise ConfigError(
            field,
            f"preset {preset} has {', '.join(why)}, which no supported Hugging Face model has "
            f"(Qwen3, Qwen3 MoE, Llama); remove {field} or pick such a preset",
        )
    raw = read_hf_config(directory, field)
    if problems := mismatches(arch, raw):
        raise ConfigError(
            field,
            f"{directory}/config.json does not match the model (preset {preset} with its "
            f"overrides): {'; '.join(problems)}; {_fit_fix(field)}",
        )
    return raw


# What a model's weights name: a Hugging Face checkpoint or a kubetron one.
WeightsKind = Literal["huggingface", "kubetron"]


def check_checkpoint_weights(arch: ModelArch, preset: str, root: Path, field: str) -> StepMeta:
    """Refuse a kubetron checkpoint directory whose `latest` step is not complete or was written
    with another architecture (the padded vocabulary may differ: the loader reshards it);
    returns that step's `kubetron.json`."""
    meta = weights_step(root, field)
    current = arch.model_dump(mode="json", by_alias=True)
    if diffs := arch_differences(meta.model.arch, current, "the model"):
        raise ConfigError(
            field,
            f"step {meta.step} of {root} holds {meta.model.describe()}, another architecture "
            f"than the model (preset {preset} with its overrides): {'; '.join(diffs)}; "
            f"{_fit_fix(field)}",
        )
    return meta


def check_model_weights(
    arch: ModelArch, preset: str, path: Path, field: str = WEIGHTS_FIELD
) -> WeightsKind:
    """Refuse, before the trainer joins the job, weights that cannot start the model; returns
    which kind they are. `field` names them in the refusals: spec.models[1].weights (a model of
    a multi-model job) accepts a Hugging Face checkpoint directory (`check_weights`) or a
    kubetron checkpoint directory (one model's `latest` and steps, `check_checkpoint_weights`);
    spec.model.weights (a finetune of one model) a Hugging Face one only, as it always did."""
    if field == WEIGHTS_FIELD:
        check_weights(arch, preset, path, field)
        return "huggingface"
    if is_checkpoint_dir(path):
        check_checkpoint_weights(arch, preset, path, field)
        return "kubetron"
    if models := model_dirs(path):
        raise ConfigError(
            field,
            f"{path} holds the checkpoints of a job with several models ({', '.join(models)}); "
            f"name one model's directory, e.g. {path / next(iter(models))}",
        )
    check_weights(arch, preset, path, field)
    return "huggingface"
