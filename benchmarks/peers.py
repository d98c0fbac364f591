"""Full training on one GPU: kubetron against Megatron-Core's local spec and transformers + Liger.

kubetron's fast path (bf16, FP8), Megatron-Core's local spec and transformers with Liger's
kernels train the same model on the same sequences and tokens per optimizer step, in one
invocation, JSON out.

Each run in a process of its own, one after the other:

- `kubetron_bf16`: the real trainer (`python -m kubetron_trainer`, one process), recipe finetune,
  bf16 (fp32 main weights and Adam state in the distributed optimizer), `fastPath: on`;
- `kubetron_fp8`: the same with `precision: fp8` (kubetron's row-wise scaled e4m3 GEMMs, Hopper
  or newer); where the trainer refuses it (say, on a CPU), the report keeps its refusal as the
  reason the run was skipped;
- `megatron_local`: the same in bf16 with `fastPath: off` and `--attention sdpa`: Megatron-Core's
  local layer spec (no Transformer Engine) with torch SDPA as core attention;
- `hf_liger`: transformers' model of the same checkpoint, fp32 weights under bf16 autocast,
  Liger's Qwen3 kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy), SDPA attention,
  fused AdamW with the trainer's lr, betas, eps, clipping and no weight decay, micro-batches
  (`--peer-micro-batch`, default the trainer's) with gradient accumulation to the same tokens a
  step; `hf_liger_compile` (`--compile`): the
  same under `torch.compile`. Where a peer runs out of memory without gradient checkpointing it
  is run again with it, and the report says so.

Every side starts from the same random weights (transformers' initialisation, saved once, in bf16
on a GPU) and reads the trainer's mock sequences in the trainer's order with its next-token
labels, so the first losses compare. Tokens/s counts global batch x seq a step over the steps
after two warmup steps; MFU is the trainer's formula (`kubetron_trainer.observe.flops`, full
fine-tuning) against the GPU's dense bf16 peak for every run; peak memory is each process's
`torch.cuda.max_memory_allocated`. `ratios` divides each kubetron run's tokens/s by each
other's.

    python -m benchmarks.peers --output benchmarks/results/peers.json

`--tiny` checks the plumbing on a CPU: a 2-layer Qwen3, seq 32, 3 steps, fp32, the peer without
Liger (its kernels need a GPU).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "api"), str(ROOT / "trainer"), str(ROOT / "operator")]

from benchmarks.dpo_peers import (  # noqa: E402
    PEERS,
    TINY_INIT_STD,
    TINY_MODEL,
    WARMUP,
    Run,
    peer_versions,
    save_random_model,
    write,
)
from benchmarks.lora_peers import (  # noqa: E402
    BETAS,
    CLIP,
    EPS,
    LR,
    add_peer_args,
    kubetron_config,
    mfu,
    peer_steps,
    peer_worker,
    run_worker,
    trainer_run,
)
from benchmarks.report import machine, versions  # noqa: E402
from kubetron_api.config import PRESETS, ModelArch, ModelSpec  # noqa: E402

KUBETRON = ("kubetron_bf16", "kubetron_fp8")
# The trainer's refusal of a config field: the line it logs before it exits.
REFUSAL = re.compile(r"config field (spec\.recipe\.precision: .*?)(?:; exiting .*)?$", re.M)


@dataclass(frozen=True)
class Shape(Run):
    """What every side runs: sequences (`Run`), tokens counted a step."""

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq


def shape_of(args: argparse.Namespace) -> Shape:
    if args.tiny:
        arch = ModelSpec.model_validate({"preset": args.preset, "overrides": TINY_MODEL}).resolve()
        return Shape(args.preset, arch, 32, 4, 2, 3, args.seed, "cpu", TINY_INIT_STD)
    if any(args.global_batch % (m or 1) for m in (args.micro_batch, args.peer_micro_batch)):
        sys.exit("--global-batch must be a multiple of --micro-batch and --peer-micro-batch")
    return Shape(args.preset, PRESETS[args.preset], args.seq, args.global_batch,
                 args.micro_batch, args.steps, args.seed, "cuda", None)  # fmt: skip


# ------------------------------------------------------------------------------------ kubetron


def run_kubetron(name: str, shape: Shape, weights: Path, workdir: Path, timeout: float) -> dict:
    """One trainer run: `kubetron_bf16`, `kubetron_fp8` or `megatron_local`."""
    precision = "fp8" if name == "kubetron_fp8" else shape.precision
    fast = "off" if name == "megatron_local" else "on"
    cfg = kubetron_config(shape, weights, False, shape.arch, precision=precision, fastPath=fast)
    cfg["jobName"] = "peers"
    attention = "sdpa" if name == "megatron_local" else "auto"
    result = trainer_run(cfg, workdir / name, shape.tokens_per_step, timeout, attention)
    result |= {"precision": precision, "fast_path": fast, "attention_flag": attention}
    refused = REFUSAL.search(result.get("log_tail", "")) if not result.get("ok") else None
    if refused:  # the trainer's own refusal, before it built anything: not a failure of ours
        return {"ok": False, "skipped": True, "reason": refused[1], "precision": precision}
    return result


# ---------------------------------------------------------------------------------------- peer


def run_peer(
    name: str, shape: Shape, micro_batch: int, weights: Path, workdir: Path, timeout: float
) -> dict:
    ran = replace(shape, micro_batch=micro_batch)
    spec = {"shape": asdict(ran) | {"arch": shape.arch.model_dump(mode="json")},
            "weights": str(weights), "liger": "liger" in name,
            "compile": name.endswith("_compile")}  # fmt: skip
    return run_worker("benchmarks.peers", spec, workdir / name, shape.tokens_per_step, timeout)


def hf_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Full training of transformers' model: fp32 weights (bf16 autocast on a GPU), Liger's
    kernels and torch.compile as the spec asks."""
    import transformers

    shape = Shape(**spec["shape"] | {"arch": ModelArch.model_validate(spec["shape"]["arch"])})
    device = torch.device(shape.device)
    if spec["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3

        apply_liger_kernel_to_qwen3()
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(
        spec["weights"], dtype=torch.float32, attn_implementation="sdpa"
    )
    model = model.to(device)
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = list(model.parameters())
    runs = torch.compile(model) if spec["compile"] else model
    return peer_steps(runs, params, shape, model.config.vocab_size, device) | {
        "gradient_checkpointing": spec["checkpointing"], "liger": spec["liger"],
        "compile": spec["compile"], "weights_dtype": str(params[0].dtype),
        "bf16_autocast": device.type == "cuda", "micro_batch": shape.micro_batch,
        "trainable_parameters": sum(p.numel() for p in params),
    }  # fmt: skip


# ---------------------------------------------------------------------------------- comparison


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Each kubetron run's tokens/s over every other run's, and its first loss's distance from
    each other run's."""
    out: dict[str, Any] = {}
    for ours in KUBETRON:
        mine = results.get(ours, {})
        for name, theirs in results.items():
            if name == ours or (ours, name) == KUBETRON:  # fp8 over bf16, not bf16 over fp8
                continue
            if mine.get("tokens_per_s") and theirs.get("tokens_per_s"):
                out[f"{ours}_over_{name}"] = round(mine["tokens_per_s"] / theirs["tokens_per_s"], 4)
            if mine.get("losses") and theirs.get("losses"):
                out[f"first_loss_abs_diff_{ours}_{name}"] = abs(
                    mine["losses"][0] - theirs["losses"][0]
                )
    return out


def run(args: argparse.Namespace) -> int:
    shape = shape_of(args)
    if shape.device == "cuda" and not torch.cuda.is_available():
        sys.exit("peers needs a CUDA GPU (or --tiny)")
    workdir = Path(args.workdir)
    peer = "hf_liger" if shape.device == "cuda" and args.liger else "hf"
    names = ["kubetron_bf16", "kubetron_fp8", "megatron_local", peer]
    names += [f"{peer}_compile"] if args.compile else []
    names = [n for n in names if not args.runs or n in args.runs]
    report: dict[str, Any] = {
        "benchmark": "peers",
        "command": "python -m benchmarks.peers " + shlex.join(sys.argv[1:]),
        "machine": machine(), "versions": versions() | peer_versions(PEERS[:1]),
        "shape": asdict(shape) | {
            "arch": shape.arch.model_dump(mode="json"), "precision": shape.precision,
            "tokens_per_step": shape.tokens_per_step, "warmup_steps_excluded": WARMUP,
            "optimizer": {"lr": LR, "betas": BETAS, "eps": EPS, "clip": CLIP,
                          "weight_decay": 0.0, "schedule": "constant"},
            "mfu": "trainer's formula (full fine-tuning) against the GPU's dense bf16 peak",
        },
        "results": {}, "ratios": {},
    }  # fmt: skip
    weights = workdir / "weights"
    if not (weights / "config.json").exists():
        save_random_model(shape.arch, weights, shape.seed, shape.precision == "bf16",
                          shape.init_std)  # fmt: skip
    for name in names:
        began = time.monotonic()
        if name.startswith("hf"):
            micro = shape.micro_batch if args.tiny else args.peer_micro_batch or shape.micro_batch
            result = run_peer(name, shape, micro, weights, workdir, args.run_timeout)
        else:
            result = run_kubetron(name, shape, weights, workdir, args.run_timeout)
        result["wall_s"] = round(time.monotonic() - began, 1)  # start-up included
        if result.get("ok"):
            result["mfu_by_formula"] = mfu(result.get("tokens_per_s"), shape.arch, shape.seq, False)
        report["results"][name] = result
        report["ratios"] = ratios(report["results"])
        done = result.get("tokens_per_s") if result.get("ok") else result.get("reason", "failed")
        print(f"[peers] {name}: {done}", file=sys.stderr, flush=True)
        write(report, args.output)  # after each run: a run cut off keeps what finished
    print(json.dumps(report, indent=1))
    return 0 if all(r.get("ok") or r.get("skipped") for r in report["results"].values()) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--preset", default="qwen3-1.7b", choices=sorted(PRESETS))
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward (default 4)")
    p.add_argument("--peer-micro-batch", type=int,
                   help="the peers' sequences per forward (default: --micro-batch)")  # fmt: skip
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    p.add_argument("--compile", action="store_true", help="also the peer under torch.compile")
    p.add_argument("--runs", nargs="+", metavar="NAME",
                   help="only these runs (kubetron_bf16 kubetron_fp8 megatron_local hf_liger "
                        "hf_liger_compile; default: all)")  # fmt: skip
    p.add_argument("--tiny", action="store_true",
                   help="CPU plumbing check: 2-layer Qwen3, seq 32, 3 steps, fp32")  # fmt: skip
    add_peer_args(p, "peers", 600)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return peer_worker(args.peer_worker, hf_train) if args.peer_worker else run(args)


if __name__ == "__main__":
    sys.exit(main())
