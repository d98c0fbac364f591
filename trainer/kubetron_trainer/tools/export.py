"""`python -m kubetron_trainer.tools.export CKPT_DIR OUT_DIR [--step N] [--model NAME]`
(console script `kubetron-export`): a Hugging Face checkpoint (`model.safetensors` +
`config.json`) from a kubetron checkpoint of any parallel shape; of a job of several models,
the trained model `--model` names (its directory `CKPT_DIR/NAME`); of a LoRA checkpoint, the
adapters in peft's format (`--peft`) or the base with them merged in (`--merged`,
`tools/export_lora.py`). Weights larger than
`--max-shard-size` (default 5GB, as `save_pretrained`) are split, in key order, into
`model-0000K-of-0000N.safetensors` with a `model.safetensors.index.json` naming each tensor's
file.

One process on the CPU: it builds the saved architecture as a TP1/PP1 `GPTModel` (with the
saved padded vocabulary), lets Megatron's loader reshard the checkpoint's model tensors into it
(the optimizer state is not read), and writes the weights under Hugging Face names and layouts
(`hf.hf_state_dict`) for Qwen3, Qwen3 MoE and Llama. Exit 0 when written, 2 when the checkpoint
cannot be exported (the message says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from kubetron_api.ckpt_meta import StepMeta, pick_model_dir, read_latest, step_dir, step_status
from kubetron_api.config import ModelArch, Precision, RecipeSpec, TrainerConfig
from kubetron_api.dims import ParallelDims
from kubetron_api.exitcodes import ConfigError, ExitCode
from kubetron_api.hf_config import hf_config, unsupported

log = logging.getLogger("kubetron_trainer.tools.export")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD = 5 * UNITS["GB"]  # save_pretrained's default


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `100KB` or a byte count (decimal units, as transformers counts)."""
    upper = text.strip().upper()
    unit = next((u for u in UNITS if upper.endswith(u)), "")
    number, factor = upper.removesuffix(unit), UNITS.get(unit, 1)
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB or 500MB") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the shard size must be positive")
    return size


def shard_plan(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names in files of at most `max_bytes` each, in order (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_safetensors(tensors: dict[str, torch.Tensor], output: Path, max_bytes: int) -> list[str]:
    """One file, or shards and their index; returns the files written."""
    from safetensors.torch import save_file

    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    plan = shard_plan(sizes, max_bytes)
    if len(plan) == 1:
        save_file(tensors, str(output / SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    for name, keys in zip(names, plan, strict=True):
        save_file({k: tensors[k] for k in keys}, str(output / name), metadata={"format": "pt"})
    weight_map = {k: name for name, keys in zip(names, plan, strict=True) for k in keys}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (output / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kubetron-export", description="write a Hugging Face checkpoint from a kubetron one"
    )
    p.add_argument("checkpoint", type=Path, help="the job's checkpoint.path")
    p.add_argument("output", type=Path, help="directory for config.json and the safetensors")
    p.add_argument("--step", type=int, help="the step to export (default: `latest`)")
    p.add_argument(
        "--model",
        help="the model to export from a job of several models (its checkpoint directory "
        "CKPT_DIR/MODEL); needed there, refused for one model's directory",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="dtype of the written tensors (default: the checkpoint's parameter dtype)",
    )
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--peft",
        action="store_true",
        help="a LoRA checkpoint: write its adapters in peft's format (adapter_config.json and "
        "adapter_model.safetensors), for peft.PeftModel.from_pretrained(base, OUTPUT)",
    )
    kind.add_argument(
        "--merged",
        action="store_true",
        help="a LoRA checkpoint: write the base weights with the adapters merged in (W + "
        "alpha/r B A), a Hugging Face checkpoint like a full model's export",
    )
    p.add_argument(
        "--base",
        type=Path,
        help="--merged: the base weights (default: the directory the checkpoint records, whose "
        "fingerprint they must have)",
    )
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=DEFAULT_MAX_SHARD,
        help="largest safetensors file, e.g. 5GB (the default) or 500MB; larger weights are "
        "split into shards with model.safetensors.index.json",
    )
    return p.parse_args(argv)


def pick_step(root: Path, step: int | None) -> StepMeta:
    """The `kubetron.json` of the step to export; ConfigError when it is not a complete
    kubetron checkpoint (export needs the recorded architecture)."""
    if step is None:
        step = read_latest(root)
        if step is None:
            raise ConfigError("CKPT_DIR", f"{root} has no `latest`; name a step with --step")
    status = step_status(root, step)
    if not status.complete or status.meta is None:
        why = status.problem or "no kubetron.json (saved before format 1): its model is unknown"
        raise ConfigError("--step", f"step {step} of {root} cannot be exported: {why}")
    return status.meta


def export_arch(meta: StepMeta) -> ModelArch:
    arch = ModelArch.model_validate(meta.model.arch)
    if why := unsupported(arch):
        raise ConfigError(
            "CKPT_DIR",
            f"the checkpoint's model ({meta.model.describe()}) has {', '.join(why)}: no "
            "supported Hugging Face model (Qwen3, Qwen3 MoE, Llama) has that",
        )
    return arch


def saved_dtype(source: Path) -> torch.dtype:
    """The dtype the checkpoint holds the model's parameters in (its embedding's)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(source))
    return metadata["embedding.word_embeddings.weight"].dtype  # type: ignore[no-any-return]


def init_single_process() -> Any:
    """A gloo world of one and its process groups (TP1/PP1/DP1)."""
    import torch.distributed as dist

    from kubetron_trainer.runtime.parallel import build_process_groups, init_distributed
    from kubetron_trainer.runtime.seeding import setup_megatron_globals
    from kubetron_trainer.runtime.topology import Topology

    topology = Topology.single_process()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", topology.master_addr)
        os.environ.setdefault("MASTER_PORT", str(topology.master_port))
        init_distributed(topology, "gloo")
    pg = build_process_groups(ParallelDims.from_degrees(1), topology, "gloo").pg
    setup_megatron_globals(pg, 1)  # the seed only initialises what the checkpoint replaces
    return pg


def load_model(meta: StepMeta, source: Path, arch: ModelArch, dtype: torch.dtype) -> Any:
    """The checkpoint's model in one TP1/PP1 chunk on the CPU, and its process groups."""
    from kubetron_trainer.models.build import build_model
    from kubetron_trainer.models.fast_path import EngineChoice
    from kubetron_trainer.runtime.checkpoint import load_model_state

    pg = init_single_process()
    # the saved padded vocabulary (a multiple of 128 x the saving tensor degree) as the vocab
    padded = arch.model_copy(update={"vocab_size": meta.model.padded_vocab_size})
    precision = Precision.FP32 if dtype == torch.float32 else Precision.BF16
    seq = min(arch.max_position_embeddings, 4096)
    cfg = TrainerConfig(model=padded, recipe=RecipeSpec(precision=precision, seq_length=seq))
    built = build_model(
        cfg, ParallelDims.from_degrees(1), pg, torch.device("cpu"), EngineChoice("sdpa")
    )
    load_model_state(built.chunks, pg, source)
    [chunk] = built.chunks
    return chunk, pg


def export(
    root: Path,
    output: Path,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD,
    model: str | None = None,
    lora: str | None = None,
    base: Path | None = None,
) -> Path:
    """Write `output/config.json` and the weights (one safetensors file or shards and their
    index) of `root`, or of its model `model` for a job of several models; returns `output`.
    A LoRA checkpoint: `lora` "peft" writes its adapters in peft's format, "merged" the base
    weights (`base`, default the recorded ones) with the adapters merged in."""
    from kubetron_trainer.models.hf_weights import hf_state_dict

    root = pick_model_dir(root, model, "--model")
    meta = pick_step(root, step)
    arch = export_arch(meta)
    source = step_dir(root, meta.step)
    check_lora_kind(meta, lora)
    if lora == "peft":
        from kubetron_trainer.tools.export_lora import write_adapters

        return write_adapters(meta, source, arch, output)
    if lora == "merged":
        from kubetron_trainer.tools.export_lora import merged_weights

        tensors = merged_weights(meta, source, arch, base, DTYPES[dtype] if dtype else None)
    else:
        param_dtype = saved_dtype(source)
        chunk, pg = load_model(meta, source, arch, param_dtype)
        out_dtype = DTYPES[dtype] if dtype else param_dtype
        tensors = {k: v.to(out_dtype) for k, v in hf_state_dict(chunk, pg, arch).items()}
    write_hf_checkpoint(tensors, arch, output, max_shard_bytes)
    log.info(
        "exported step %d of %s (%s, saved as %s%s) to %s: %d tensors",
        meta.step, root, meta.model.describe(), meta.shape,
        ", LoRA adapters merged" if lora else "", output, len(tensors),
    )  # fmt: skip
    return output


def write_hf_checkpoint(
    tensors: dict[str, torch.Tensor], arch: ModelArch, output: Path, max_shard_bytes: int
) -> None:
    """config.json and the weights (one safetensors file, or shards and their index)."""
    output.mkdir(parents=True, exist_ok=True)
    for stale in [output / SINGLE, output / INDEX, *output.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # an earlier export's files would mix with these
    files = write_safetensors(tensors, output, max_shard_bytes)
    dtype = next(iter(tensors.values())).dtype
    config = hf_config(arch) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info("wrote %s and config.json", ", ".join(files))


def check_lora_kind(meta: StepMeta, lora: str | None) -> None:
    """A LoRA checkpoint (the adapters alone) exports with --peft or --merged, and only it."""
    if meta.peft is not None and lora is None:
        raise ConfigError(
            "--peft",
            f"step {meta.step} holds LoRA adapters only (no base weights): pass --peft for the "
            "adapters in peft's format, or --merged for the base with the adapters merged in",
        )
    if meta.peft is None and lora is not None:
        raise ConfigError(
            f"--{lora}",
            f"step {meta.step} holds a full model, not LoRA adapters; export it without --{lora}",
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        lora = "peft" if args.peft else "merged" if args.merged else None
        export(
            args.checkpoint, args.output, args.step, args.dtype, args.max_shard_size, args.model,
            lora, args.base,
        )  # fmt: skip
    except ConfigError as err:
        log.error("%s", err)
        return int(ExitCode.CONFIG)
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
