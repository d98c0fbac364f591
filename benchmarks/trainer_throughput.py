"""Trainer throughput on this machine's GPU: tokens/s and MFU of a preset at a given shape.

Runs the real trainer (`python -m kubetron_trainer`, one process per GPU, mock data, no
checkpoints) twice, with kubetron's decentralized process groups and with Megatron's global
`parallel_state` as the baseline, and prints one JSON document: what was measured, on which
GPU, with which versions, and the command that reproduces it. The first two steps are warmup
and excluded from the averages.

    python benchmarks/trainer_throughput.py --preset qwen3-1.7b --seq 4096 --micro-batch 2 \
        --global-batch 8 --steps 10 --output benchmarks/results/trainer_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "trainer"), str(ROOT / "operator")]

from kubetron_trainer.config import PRESETS, RecipeSpec, TrainerConfig  # noqa: E402
from tests.distributed.train_harness import run  # noqa: E402


def config(args: argparse.Namespace) -> dict[str, Any]:
    recipe = RecipeSpec.model_validate(
        {
            "trainIters": args.steps,
            "globalBatchSize": args.global_batch,
            "microBatchSize": args.micro_batch,
            "seqLength": args.seq,
            "precision": "bf16",
            "optimizer": {"distributed": True},
            "logInterval": 1,
        }
    )
    cfg = TrainerConfig(
        job_name="bench", model=PRESETS[args.preset], preset=args.preset, recipe=recipe
    ).model_dump(mode="json", by_alias=True)
    cfg["metrics"]["enabled"] = False
    return cfg


def measure(args: argparse.Namespace, groups: str) -> dict[str, Any]:
    workdir = Path(args.workdir) / groups
    result = run(config(args), workdir, "--attention", args.attention, groups=groups).result()
    steps = result["steps"][2:]
    return {
        "groups": groups,
        "attention": result["attention"],
        "tokens_per_s": round(result["tokens_per_s"]),
        "mfu": round(result["mfu"], 4) if result["mfu"] is not None else None,
        "step_s": [round(s["s"], 4) for s in steps],
        "losses": [round(s["loss"], 4) for s in result["steps"]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-1.7b", choices=sorted(PRESETS))
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--attention", default="auto", choices=["auto", "te", "sdpa", "unfused"])
    p.add_argument("--workdir", default="/tmp/kubetron-bench")
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("trainer_throughput needs a CUDA GPU")
    out = {
        "benchmark": "trainer_throughput",
        "command": "python " + shlex.join(sys.argv),
        "shape": {
            "preset": args.preset, "seq_length": args.seq, "micro_batch": args.micro_batch,
            "global_batch": args.global_batch, "precision": "bf16",
            "distributed_optimizer": True, "steps": args.steps, "warmup_steps_excluded": 2,
        },
        "machine": {
            "gpu": torch.cuda.get_device_name(0), "gpus": 1, "cpu": platform.processor(),
        },
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "megatron-core": version("megatron-core"),
            "transformer-engine": (
                version("transformer-engine") if find_spec("transformer_engine") else None
            ),
        },
        "peak_flops": "989e12 (H100/H200 dense BF16)",
        "runs": [measure(args, "decentralized"), measure(args, "global")],
    }  # fmt: skip
    text = json.dumps(out, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
