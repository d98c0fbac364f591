"""`python -m kubetron_trainer.export CKPT_DIR OUT_DIR [--step N]` (console script
`kubetron-export`): a Hugging Face checkpoint (`model.safetensors` + `config.json`) from a
kubetron checkpoint of any parallel shape.

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

from kubetron_api.ckpt_meta import StepMeta, read_latest, step_dir, step_status
from kubetron_api.config import ModelArch, Precision, RecipeSpec, TrainerConfig
from kubetron_api.dims import ParallelDims
from kubetron_api.exitcodes import ConfigError, ExitCode
from kubetron_api.hf_config import hf_config, unsupported

log = logging.getLogger("kubetron_trainer.export")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kubetron-export", description="write a Hugging Face checkpoint from a kubetron one"
    )
    p.add_argument("checkpoint", type=Path, help="the job's checkpoint.path")
    p.add_argument("output", type=Path, help="directory for config.json and model.safetensors")
    p.add_argument("--step", type=int, help="the step to export (default: `latest`)")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="dtype of the written tensors (default: the checkpoint's parameter dtype)",
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

    from kubetron_trainer.parallel import build_process_groups, init_distributed
    from kubetron_trainer.seeding import setup_megatron_globals
    from kubetron_trainer.topology import Topology

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
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from kubetron_trainer.checkpoint import sharded_model_state
    from kubetron_trainer.models.build import build_model

    pg = init_single_process()
    # the saved padded vocabulary (a multiple of 128 x the saving tensor degree) as the vocab
    padded = arch.model_copy(update={"vocab_size": meta.model.padded_vocab_size})
    precision = Precision.FP32 if dtype == torch.float32 else Precision.BF16
    seq = min(arch.max_position_embeddings, 4096)
    cfg = TrainerConfig(model=padded, recipe=RecipeSpec(precision=precision, seq_length=seq))
    built = build_model(cfg, ParallelDims.from_degrees(1), pg, torch.device("cpu"), "sdpa")
    [chunk] = built.chunks
    state = sharded_model_state(chunk, pg)
    request = {
        k: v for k, v in state.items() if isinstance(v, ShardedTensor | ShardedTensorFactory)
    }
    loaded = dist_checkpointing.load({"model": request}, str(source))["model"]
    result = chunk.load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint load: missing {missing}, unexpected {result.unexpected_keys}"
        )
    return chunk, pg


def export(root: Path, output: Path, step: int | None = None, dtype: str | None = None) -> Path:
    """Write `output/config.json` and `output/model.safetensors`; returns `output`."""
    from safetensors.torch import save_file

    from kubetron_trainer.hf import hf_state_dict

    meta = pick_step(root, step)
    arch = export_arch(meta)
    source = step_dir(root, meta.step)
    param_dtype = saved_dtype(source)
    chunk, pg = load_model(meta, source, arch, param_dtype)
    out_dtype = DTYPES[dtype] if dtype else param_dtype
    tensors = {k: v.to(out_dtype) for k, v in hf_state_dict(chunk, pg, arch).items()}
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(arch) | {"torch_dtype": str(out_dtype).removeprefix("torch.")}
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info(
        "exported step %d of %s (%s, saved as %s) to %s: %d tensors",
        meta.step, root, meta.model.describe(), meta.shape, output, len(tensors),
    )  # fmt: skip
    return output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export(args.checkpoint, args.output, args.step, args.dtype)
    except ConfigError as err:
        log.error("%s", err)
        return int(ExitCode.CONFIG)
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
