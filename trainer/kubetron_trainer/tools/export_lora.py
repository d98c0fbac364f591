"""The export of a LoRA checkpoint (`kubetron-export --peft` / `--merged`).

A LoRA checkpoint holds the adapters alone, in Megatron's layout (`models/lora.py`): their full
tensors are read straight from the checkpoint (no model is built, the base weights are not
needed), and mapped onto peft's modules. `--peft` writes them as peft saves a LoRA adapter
(`adapter_config.json`, `adapter_model.safetensors`), loadable by
`peft.PeftModel.from_pretrained(base, OUTPUT)`. `--merged` adds `alpha/r B A` to each target
weight of the base (the Hugging Face directory the checkpoint records, or `--base`, checked by
its fingerprint) and writes a Hugging Face checkpoint as the export of a full model does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from kubetron_api.ckpt_meta import StepMeta, weights_fingerprint
from kubetron_api.config import ModelArch, PeftSpec
from kubetron_api.exitcodes import ConfigError
from kubetron_trainer.models.lora import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterTensors,
    adapter_config,
    is_adapter_key,
    peft_pairs,
    target_of,
    to_peft,
)
from kubetron_trainer.tools.export import init_single_process

log = logging.getLogger(__name__)


def read_adapters(source: Path) -> AdapterTensors:
    """The model's adapter tensors of a checkpoint step, whole ([layers, ...] each)."""
    from megatron.core import dist_checkpointing

    init_single_process()
    metadata = dist_checkpointing.load_tensors_metadata(str(source))
    request = {k: v for k, v in metadata.items() if k.startswith("decoder.") and is_adapter_key(k)}
    loaded = dist_checkpointing.load(request, str(source), validate_access_integrity=False)
    return {(str(target_of(k)), k.rsplit(".", 1)[-1]): t for k, t in loaded.items()}


def saved_peft(meta: StepMeta) -> PeftSpec:
    assert meta.peft is not None
    return PeftSpec.model_validate(meta.peft.settings)


def write_adapters(meta: StepMeta, source: Path, arch: ModelArch, output: Path) -> Path:
    """`output/adapter_config.json` and `adapter_model.safetensors` in peft's format."""
    from safetensors.torch import save_file

    assert meta.peft is not None
    tensors = to_peft(arch, saved_peft(meta), read_adapters(source))
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output / WEIGHTS_FILE), metadata={"format": "pt"})
    config = adapter_config(arch, saved_peft(meta), meta.peft.base)
    (output / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    log.info(
        "exported the LoRA adapters of step %d (%d tensors, base %s) to %s", meta.step,
        len(tensors), meta.peft.base, output,
    )  # fmt: skip
    return output


def merged_weights(
    meta: StepMeta, source: Path, arch: ModelArch, base: Path | None, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The base weights under Hugging Face names with `alpha/r B A` added to each target
    (in fp32, then the base's dtype or `dtype`)."""
    from kubetron_trainer.models.hf_weights import HfWeights

    assert meta.peft is not None
    directory = base or Path(meta.peft.base)
    if weights_fingerprint(directory) != meta.peft.fingerprint:
        raise ConfigError(
            "--base",
            f"{directory} holds other weights than the base the adapters of step {meta.step} "
            f"were trained on ({meta.peft.base}); pass that base with --base",
        )
    weights = HfWeights(directory)
    out = {name: weights.get(name) for name in weights.files}
    peft = saved_peft(meta)
    for layer, module, a, b in peft_pairs(arch, peft, read_adapters(source)):
        name = f"model.layers.{layer}.{module}.weight"
        w = out[name]
        out[name] = (w.float() + peft.scale * (b.float() @ a.float())).to(w.dtype)
    return {k: v.to(dtype) if dtype else v for k, v in out.items()}
