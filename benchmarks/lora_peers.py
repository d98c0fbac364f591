"""LoRA against a peer: kubetron's trainer and peft + transformers on one GPU, same model,
tokens and adapters per optimizer step, JSON out; beside them kubetron's full fine-tuning of a
model that fits, and the arithmetic of why the LoRA model's full fine-tuning does not.

One invocation, each side in a process of its own, one after the other:

- `kubetron_lora`: the real trainer (`python -m kubetron_trainer`, one process), recipe finetune
  with `recipe.peft` (rank, alpha, every target: qkv, proj, fc1, fc2; no dropout), bf16 frozen
  base weights loaded from the Hugging Face checkpoint below, fp32 adapters and their Adam state
  in the distributed optimizer, `fastPath: on`, mock tokens;
- `peft` (and `peft_liger`, unless `--no-liger`): transformers' model of the same checkpoint in
  bf16 with peft's LoRA of the same rank, alpha and modules (q/k/v/o, gate/up/down; peft keeps
  the adapters in fp32), bf16 autocast, fused AdamW with the same lr, betas, eps, clipping and
  no weight decay, SDPA attention, micro-batch 1 with gradient accumulation to the same tokens
  a step; `peft_liger` first applies Liger's Qwen3 kernels (RMSNorm, RoPE, SwiGLU, fused linear
  cross-entropy). Where a peer runs out of memory without gradient checkpointing it is run again
  with it, and the report says so;
- `kubetron_full` (`--full-preset`, default qwen3-1.7b): full fine-tuning of a model that fits,
  at the same sequence length and tokens a step.

The models have random weights (transformers' initialisation, saved in bf16), nothing is
downloaded. Every sequence is `--seq` tokens of `MockDataset` (the peers read the trainer's
mock sequences in its order, with its next-token labels); tokens/s counts global batch x seq a
step over the steps after two warmup steps.
MFU uses the trainer's formula (`kubetron_trainer.observe.flops`; LoRA counts 4 FLOPs per frozen
weight, full fine-tuning 6) against the GPU's dense bf16 peak. Peak memory is each process's
`torch.cuda.max_memory_allocated`.

    python -m benchmarks.lora_peers --output benchmarks/results/lora_peers.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "api"), str(ROOT / "trainer"), str(ROOT / "operator")]

from benchmarks.dpo_peers import (  # noqa: E402
    PEERS,
    WARMUP,
    add_run_args,
    peer_versions,
    python_path,
    save_random_model,
    step_ends,
    timing,
    train,
    write,
)
from benchmarks.report import machine, versions  # noqa: E402
from kubetron_api.config import PRESETS, ModelArch, TrainerConfig  # noqa: E402

TARGETS = ["qkv", "proj", "fc1", "fc2"]
PEFT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Megatron's distributed optimizer on one GPU keeps, per trained parameter: the bf16 weight (2),
# its fp32 gradient buffer (4), the fp32 main weight (4) and Adam's two fp32 moments (8).
FULL_STATE_BYTES_PER_PARAM = 18
LR, BETAS, EPS, CLIP = 1e-4, (0.9, 0.95), 1e-8, 1.0


@dataclass(frozen=True)
class Shape:
    """What every side runs."""

    preset: str
    seq: int
    global_batch: int  # sequences per optimizer step
    micro_batch: int
    steps: int
    rank: int
    alpha: int
    seed: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq


# ------------------------------------------------------------------------------------ kubetron


class Steps(Protocol):
    """What a side's optimizer steps read: the model, the mock sequences and how a step
    batches them."""

    @property
    def preset(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def global_batch(self) -> int: ...
    @property
    def micro_batch(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def seed(self) -> int: ...


def kubetron_config(
    shape: Steps, weights: Path, lora: bool, arch: ModelArch | None = None, **recipe_fields: Any
) -> dict[str, Any]:
    """The trainer's config: `arch` (default: the preset's) and recipe fields (`precision`,
    `fastPath`) as given, else bf16 with the fast path on."""
    model = (arch or PRESETS[shape.preset]).model_dump(mode="json", by_alias=True)
    recipe: dict[str, Any] = {
        "kind": "finetune", "trainIters": shape.steps, "globalBatchSize": shape.global_batch,
        "microBatchSize": shape.micro_batch, "seqLength": shape.seq, "seed": shape.seed,
        "precision": "bf16", "logInterval": 1, "fastPath": "on",
        "optimizer": {"lr": LR, "minLr": 0.0, "weightDecay": 0.0, "distributed": True},
        "lrSchedule": {"style": "constant", "warmupIters": 0},
    } | recipe_fields  # fmt: skip
    if lora:
        assert isinstance(shape, Shape)
        recipe["peft"] = {"type": "lora", "rank": shape.rank, "alpha": shape.alpha,
                          "dropout": 0.0, "targets": TARGETS}  # fmt: skip
    cfg = TrainerConfig.model_validate({
        "jobName": "lora-peers", "model": model, "preset": shape.preset, "weights": str(weights),
        "recipe": recipe, "data": {"type": "mock"}, "checkpoint": {"path": None},
    }).model_dump(mode="json", by_alias=True)  # fmt: skip
    cfg["metrics"]["enabled"] = False
    return cfg


def run_kubetron(
    shape: Shape, weights: Path, workdir: Path, lora: bool, timeout: float
) -> dict[str, Any]:
    return trainer_run(kubetron_config(shape, weights, lora), workdir, shape.tokens_per_step,
                       timeout)  # fmt: skip


def trainer_run(
    cfg: dict[str, Any],
    workdir: Path,
    tokens_per_step: int,
    timeout: float,
    attention: str = "auto",
) -> dict[str, Any]:
    """The real trainer on `cfg`: its step times, MFU, memory and losses, or what failed."""
    ran = train(cfg, workdir, timeout, attention)
    if isinstance(ran, dict):
        return ran
    log, summary = ran
    return {
        "ok": True,
        **timing(step_ends(log), None, tokens_per_step),
        "mfu": summary["mfu"],
        "summary_tokens_per_s": round(summary["tokens_per_s"], 1),
        "peak_memory_gib": summary.get("peak_memory_gib"),
        "losses": [s["loss"] for s in summary["steps"]],
        "attention": summary["attention"],
    }


# ---------------------------------------------------------------------------------------- peft


def run_peer(shape: Shape, weights: Path, workdir: Path, liger: bool, timeout: float) -> dict:
    spec = {"shape": asdict(shape), "weights": str(weights), "liger": liger}
    return run_worker("benchmarks.lora_peers", spec, workdir, shape.tokens_per_step, timeout)


def run_worker(
    module: str, spec: dict[str, Any], workdir: Path, tokens_per_step: int, timeout: float
) -> dict[str, Any]:
    """A peer (`python -m MODULE --peer-worker SPEC`) in a process of its own; once more with
    gradient checkpointing if it ran out of memory without."""
    for checkpointing in (False, True):
        spec = spec | {"checkpointing": checkpointing, "out": str(workdir)}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "spec.json").write_text(json.dumps(spec))
        (workdir / "result.json").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", module, "--peer-worker", str(workdir / "spec.json")]
        env = os.environ | {"PYTHONPATH": python_path(), "HF_HUB_OFFLINE": "1"}
        with open(workdir / "log.txt", "w") as log:
            try:
                done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=timeout)  # fmt: skip
                code = done.returncode
            except subprocess.TimeoutExpired:
                code = 124
        found = workdir / "result.json"
        result: dict[str, Any] = json.loads(found.read_text()) if found.exists() else {}
        if result.get("ok"):
            ends, began = result.pop("step_ends"), result.pop("train_began")
            return {**result, **timing(ends, began, tokens_per_step)}
        if not result.get("out_of_memory"):
            break
    tail = (workdir / "log.txt").read_text()[-3000:]
    return {"ok": False, "exit_code": code, **result, "log_tail": tail}


def peer_worker(spec_file: Path, peer_train: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """One peer run (`--peer-worker SPEC`) by `peer_train`: writes result.json."""
    spec = json.loads(spec_file.read_text())
    out = Path(spec["out"])
    try:
        result = peer_train(spec)
    except torch.cuda.OutOfMemoryError as err:
        result = {"ok": False, "out_of_memory": True, "error": str(err)[:500],
                  "gradient_checkpointing": spec["checkpointing"]}  # fmt: skip
    (out / "result.json").write_text(json.dumps(result))
    return 0 if result["ok"] else 1


def lora_train(spec: dict[str, Any]) -> dict[str, Any]:
    import peft
    import transformers

    shape = Shape(**spec["shape"])
    if spec["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3

        apply_liger_kernel_to_qwen3()
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(
        spec["weights"], dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model = model.cuda()
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = peft.LoraConfig(r=shape.rank, lora_alpha=shape.alpha, lora_dropout=0.0,
                           target_modules=PEFT_MODULES, task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    return peer_steps(model, params, shape, model.config.vocab_size, torch.device("cuda")) | {
        "gradient_checkpointing": spec["checkpointing"], "liger": spec["liger"],
        "trainable_parameters": sum(p.numel() for p in params),
        "adapter_dtype": str(params[0].dtype),
    }  # fmt: skip


def peer_steps(
    model: Any, params: list[torch.nn.Parameter], shape: Steps, vocab: int, device: torch.device
) -> dict[str, Any]:
    """The trainer's optimizer steps on a transformers model: its mock sequences in its order
    (sample `step x global batch + i`), its next-token labels (`shift_labels`: every sequence's
    `seq` predictions), bf16 autocast on a GPU, fused AdamW with its lr, betas, eps, clipping and
    no weight decay, gradient accumulation of micro-batches to the global batch, in training
    mode."""
    from kubetron_trainer.data.batches import MockDataset

    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS,
                                  weight_decay=0.0, fused=True)  # fmt: skip
    data = MockDataset(vocab, shape.seq, shape.global_batch * shape.steps, shape.seed)
    model.train()  # from_pretrained leaves eval mode, where Liger's loss materialises the logits
    accumulate = shape.global_batch // shape.micro_batch
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    began, ends, losses = time.time(), [], []
    for step in range(shape.steps):
        total = torch.zeros((), device=device)
        for micro in range(accumulate):
            first = (step * accumulate + micro) * shape.micro_batch
            rows = torch.stack([torch.as_tensor(data.sequence(first + i))
                                for i in range(shape.micro_batch)]).long().to(device)  # fmt: skip
            ids = rows[:, :-1]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = model(input_ids=ids, labels=ids, shift_labels=rows[:, 1:].contiguous())
            loss = out.loss / accumulate
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))  # a host sync: the step's kernels are done
        ends.append(time.time())
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    return {"ok": True, "losses": losses, "step_ends": ends, "train_began": began,
            "peak_memory_gib": peak}  # fmt: skip


# ---------------------------------------------------------------------------------- comparison


def mfu(tokens_per_s: float | None, arch: ModelArch, seq: int, lora: bool) -> float | None:
    """The trainer's formula against this GPU's dense bf16 peak (None without a GPU)."""
    from kubetron_trainer.models.megatron_config import padded_vocab_size
    from kubetron_trainer.observe.flops import flops_per_token, peak_flops

    per_token = flops_per_token(arch, seq, padded_vocab_size(arch.vocab_size, 1), not lora)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = peak_flops(gpu, "bf16")
    return round(tokens_per_s * per_token / peak, 4) if tokens_per_s and peak else None


def full_state(weights: Path) -> dict[str, Any]:
    """Why the LoRA model's full fine-tuning does not fit one GPU: its optimizer state alone,
    from the parameters in its checkpoint."""
    from safetensors import safe_open

    params = 0
    for file in sorted(weights.glob("*.safetensors")):
        with safe_open(str(file), "pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                params += math.prod(tensors.get_slice(name).get_shape())
    state = params * FULL_STATE_BYTES_PER_PARAM
    gpu = torch.cuda.get_device_properties(0).total_memory
    return {
        "parameters": params, "bytes_per_parameter": FULL_STATE_BYTES_PER_PARAM,
        "state_gib": round(state / 2**30, 1), "gpu_memory_gib": round(gpu / 2**30, 1),
        "fits": state < gpu,
    }  # fmt: skip


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    ours = results.get("kubetron_lora", {})
    out: dict[str, Any] = {}
    for name in ("peft", "peft_liger"):
        theirs = results.get(name, {})
        if ours.get("tokens_per_s") and theirs.get("tokens_per_s"):
            out[f"tokens_per_s_kubetron_over_{name}"] = round(
                ours["tokens_per_s"] / theirs["tokens_per_s"], 4
            )
    return out


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        sys.exit("lora_peers needs a CUDA GPU")
    if args.global_batch % args.micro_batch:
        sys.exit("--global-batch must be a multiple of --micro-batch")
    shape = Shape(args.preset, args.seq, args.global_batch, args.micro_batch, args.steps,
                  args.rank, args.alpha, args.seed)  # fmt: skip
    workdir = Path(args.workdir)
    report: dict[str, Any] = {
        "benchmark": "lora_peers",
        "command": "python -m benchmarks.lora_peers " + shlex.join(sys.argv[1:]),
        "machine": machine(), "versions": versions() | peer_versions((*PEERS, "peft")),
        "shape": asdict(shape) | {"tokens_per_step": shape.tokens_per_step,
                                  "warmup_steps_excluded": WARMUP, "targets": TARGETS},
        "results": {},
    }  # fmt: skip
    weights = workdir / shape.preset
    if not (weights / "config.json").exists():
        save_random_model(PRESETS[shape.preset], weights, shape.seed, bf16=True)
    report["full_finetune_of_lora_model"] = full_state(weights)
    sides: list[tuple[str, Any]] = [
        ("kubetron_lora", lambda: run_kubetron(shape, weights, workdir / "kt-lora", True,
                                               args.run_timeout)),
        ("peft", lambda: run_peer(shape, weights, workdir / "peft", False, args.run_timeout)),
    ]  # fmt: skip
    if args.full_preset:
        full = Shape(**asdict(shape) | {"preset": args.full_preset})
        full_weights = workdir / full.preset
        sides.append(("kubetron_full", lambda: _full(full, full_weights, workdir, args)))
    if args.liger:
        sides.append(("peft_liger", lambda: run_peer(shape, weights, workdir / "peft-liger",
                                                     True, args.run_timeout)))  # fmt: skip
    for name, side in sides:
        result = report["results"][name] = side()
        if result.get("ok"):
            preset = args.full_preset if name == "kubetron_full" else shape.preset
            result["mfu_by_formula"] = mfu(result.get("tokens_per_s"), PRESETS[preset],
                                           shape.seq, name != "kubetron_full")  # fmt: skip
        print(f"[lora_peers] {name}: {result.get('tokens_per_s', 'failed')} tokens/s",
              file=sys.stderr, flush=True)  # fmt: skip
        report["comparison"] = ratios(report["results"])
        write(report, args.output)  # after each side: a run cut off keeps what finished
    print(json.dumps(report, indent=1))
    return 0 if all(r.get("ok") for r in report["results"].values()) else 1


def _full(shape: Shape, weights: Path, workdir: Path, args: argparse.Namespace) -> dict:
    if not (weights / "config.json").exists():
        save_random_model(PRESETS[shape.preset], weights, shape.seed, bf16=True)
    return run_kubetron(shape, weights, workdir / "kt-full", False, args.run_timeout)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--preset", default="qwen3-8b", choices=sorted(PRESETS))
    p.add_argument("--full-preset", default="qwen3-1.7b",
                   help="full fine-tuning of this preset beside ('' to skip)")  # fmt: skip
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    add_peer_args(p, "lora-peers", 300)
    return p.parse_args(argv)


def add_peer_args(p: argparse.ArgumentParser, name: str, timeout: float) -> None:
    """What a benchmark against transformers peers takes besides its shape: the seed, whether
    the peers run Liger's kernels, its run arguments and its workers' hidden flag."""
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-liger", dest="liger", action="store_false",
                   help="the peers without Liger's kernels")  # fmt: skip
    add_run_args(p, name, timeout)
    p.add_argument("--peer-worker", type=Path, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return peer_worker(args.peer_worker, lora_train) if args.peer_worker else run(args)


if __name__ == "__main__":
    sys.exit(main())
