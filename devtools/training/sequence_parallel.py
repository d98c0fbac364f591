"""Sequence parallelism without Transformer Engine on 2 GPUs: gradients, then training.

The gradient check (this module under torchrun, one process a GPU): per path, the same seed,
data and TP2 model without and with SP; one fp32 forward/backward through the trainer's
GpuEngine (Megatron's DDP, schedule and finalize_model_grads), then every parameter's
`main_grad` compared. The trainer runs: TP2 with and without SP per path, bf16, each run alone
on the GPUs, then SP on Megatron's global groups. tests/gpu/test_multigpu.py checks both;
benchmarks/sequence_parallel.py records them.

    python -m torch.distributed.run --standalone --nproc-per-node=2 \
        -m devtools.training.sequence_parallel OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from devtools.training.gpu import (
    PRECISION,
    WORLD,
    Case,
    finish,
    fresh_dir,
    launch_trainer,
    summarize,
    torchrun_module,
    trainer_config,
)
from kubetron_api.config import PRESETS, TrainerConfig

# The trainer runs: qwen3-0.6b as published at TP2, like the tp2 case, on the local spec and with
# `fastPath: on` (at TP2 that is norm+rope+cudnn+adam: ce needs TP1, wgrad needs ce or untied
# embeddings), each with and without sequence parallelism, then SP on Megatron's global groups.
SP_CASE = Case("sp", "qwen3-0.6b", {"tensor": 2})
SP_PATHS = {"local": "off", "fast": "on"}
# The gradient check: qwen3-0.6b widths, 4 layers (q/k norms), a 4096-token vocabulary, fp32,
# 2 micro-batches of 2 x 1024 tokens; the fast path's norm piece is Liger's RMSNorm in fp32.
SP_GRAD_ARCH = {"num_layers": 4, "vocab_size": 4096}
SP_GRAD_PATHS = {"local": "off", "fast_norm": "norm"}


def sp_trainer_config(name: str, sp: bool, fast_path: str) -> dict[str, Any]:
    case = SP_CASE
    return trainer_config(
        name, case.arch(), case.preset, {**case.parallelism, "sequenceParallel": sp},
        steps=case.steps, seq=case.seq, micro_batch=case.micro_batch,
        global_batch=case.global_batch, distributed_optimizer=case.distributed_optimizer,
        fast_path=fast_path,
    )  # fmt: skip


def loss_diffs(a: list[float], b: list[float]) -> dict[str, Any]:
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return {
        "abs_loss_diff_per_step": diffs,
        "max_abs_loss_diff": max(diffs),
        "max_rel_loss_diff": max(d / abs(y) for d, y in zip(diffs, b, strict=True)),
        "losses_bitwise_equal": a == b,
    }


def sequence_parallel_runs(workdir: Path) -> dict[str, Any]:
    """TP2 with and without SP per path, one run after the other (each alone on the GPUs;
    the order alternates between paths), then SP on the local spec with global groups."""
    runs: dict[str, Any] = {}
    plan = []
    for i, (path, fast) in enumerate(SP_PATHS.items()):
        order = [False, True] if i % 2 == 0 else [True, False]
        plan += [(f"{path}_{'sp' if sp else 'nosp'}", sp, fast, "decentralized") for sp in order]
    plan.append(("local_sp_global", True, SP_PATHS["local"], "global"))
    for name, sp, fast, groups in plan:
        cfg = sp_trainer_config(name, sp, fast)
        started = launch_trainer(cfg, workdir / "sp" / name, groups)
        runs[name] = summarize(finish(started, f"sp {name}")) | {"fast_path": fast, "sp": sp}
    compare = {}
    for path in SP_PATHS:
        on, off = runs[f"{path}_sp"], runs[f"{path}_nosp"]
        compare[path] = loss_diffs(on["losses"], off["losses"]) | {
            "peak_memory_gib_rank0": {"sp": on["peak_memory_gib_rank0"],
                                      "nosp": off["peak_memory_gib_rank0"]},
            "median_step_s": {"sp": on["median_step_s"], "nosp": off["median_step_s"]},
            "step_time_ratio_sp_over_nosp": on["median_step_s"] / off["median_step_s"],
            "tokens_per_s": {"sp": on["tokens_per_s"], "nosp": off["tokens_per_s"]},
        }  # fmt: skip
    glo, dec = runs["local_sp_global"], runs["local_sp"]
    compare["local_sp_decentralized_vs_global"] = loss_diffs(dec["losses"], glo["losses"])
    case = SP_CASE
    return {
        "preset": case.preset,
        "parallelism": {**case.parallelism, "sequenceParallel": "both"},
        "recipe": {
            "steps": case.steps, "seq_length": case.seq, "micro_batch": case.micro_batch,
            "global_batch": case.global_batch, "precision": PRECISION,
            "distributed_optimizer": case.distributed_optimizer, "warmup_steps_excluded": 2,
        },
        "order": [name for name, *_ in plan],
        "runs": runs,
        "compare": compare,
    }  # fmt: skip


def _grads(cfg: TrainerConfig, pg: Any, device: torch.device, fast: str) -> dict[str, Any]:
    """One forward/backward of the config's TP2 model: losses, every parameter's main_grad,
    the SP-marked parameters and how far their gradients differ over the tp ranks."""
    import torch.distributed as dist

    from kubetron_api.config import FastPath
    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.data.batches import build_batches
    from kubetron_trainer.models.build import build_model
    from kubetron_trainer.models.fast_path import decide_fast_path
    from kubetron_trainer.runtime.seeding import setup_megatron_globals
    from kubetron_trainer.runtime.step_gpu import GpuEngine

    dims = ParallelDims.from_degrees(WORLD, tp=2)
    setup_megatron_globals(pg, cfg.recipe.seed)
    choice = decide_fast_path(FastPath.parse(fast), cfg, dims, device, "sdpa")
    built = build_model(cfg, dims, pg, device, choice)
    engine = GpuEngine(cfg, built.chunks, pg, fast=choice.fast)
    batches = build_batches(cfg, reads_data=True, dp_rank=0, dp_size=1, device=device)
    losses = engine.forward_backward(batches.step(0))
    named = list(engine.model[0].named_parameters())
    grads = {n: p.main_grad.detach().float().clone() for n, p in named}
    marked = [n for n, p in named if getattr(p, "sequence_parallel", False)]
    # the all-reduced norm gradients must be equal on both tensor-parallel ranks
    spread = 0.0
    for n in marked:
        first = grads[n].clone()
        dist.broadcast(first, src=dist.get_global_rank(pg.tp, 0), group=pg.tp)
        spread = max(spread, float((grads[n] - first).abs().max()))
    seen = {
        "losses": [float(x["lm loss"]) for x in losses],
        "grads": grads,
        "marked": marked,
        "tp_spread": spread,
        "attention": built.attention,
    }
    del engine, built
    torch.cuda.empty_cache()
    return seen


def _compare(fast: str, off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """One path's record: losses and every parameter's gradient, without SP against with."""
    rel = {
        n: float((on["grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
        for n, g in off["grads"].items()
    }
    norms = {n: r for n, r in rel.items() if n in on["marked"]}
    worst = max(rel, key=lambda n: rel[n])
    return {
        "fast_path": fast,
        "attention": on["attention"],
        "losses": {"nosp": off["losses"], "sp": on["losses"]},
        "max_abs_loss_diff": max(
            abs(a - b) for a, b in zip(on["losses"], off["losses"], strict=True)
        ),
        "params": len(rel),
        "sp_marked_params": len(on["marked"]),
        "sp_marked_without_sp": len(off["marked"]),
        "max_rel_grad_diff": rel[worst],
        "worst_param": worst,
        "max_rel_grad_diff_norms": max(norms.values()) if norms else None,
        "sp_norm_grad_spread_over_tp": on["tp_spread"],
    }


def sp_grads_worker(out_dir: Path) -> None:
    """One torchrun process of the gradient check: per path, the same seed, data and TP2 model
    without and with SP; one forward/backward through the trainer's GpuEngine (Megatron's DDP,
    schedule and finalize_model_grads), then every parameter's `main_grad` compared."""
    import torch.distributed as dist

    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.runtime.loop import make_groups
    from kubetron_trainer.runtime.parallel import init_distributed
    from kubetron_trainer.runtime.topology import Topology

    topo = Topology.from_env()
    init_distributed(topo, "nccl")
    device = torch.device("cuda", topo.local_rank)
    arch = PRESETS["qwen3-0.6b"].model_copy(update=SP_GRAD_ARCH)
    pg = None
    report: dict[str, Any] = {"arch": SP_GRAD_ARCH, "precision": "fp32", "paths": {}}
    for path, fast in SP_GRAD_PATHS.items():
        seen: dict[bool, Any] = {}
        for sp in (False, True):
            raw = trainer_config(
                f"spg-{path}", arch, "qwen3-0.6b", {"tensor": 2, "sequenceParallel": sp},
                steps=1, seq=1024, micro_batch=2, global_batch=4,
                distributed_optimizer=False, fast_path=fast, precision="fp32",
            )  # fmt: skip
            cfg = TrainerConfig.model_validate(raw)
            if pg is None:
                dims = ParallelDims.from_degrees(WORLD, tp=2)
                pg = make_groups(cfg, dims, topo, "nccl", "decentralized")
            seen[sp] = _grads(cfg, pg, device, fast)
        report["paths"][path] = _compare(fast, seen[False], seen[True])
    (out_dir / f"rank{topo.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def sp_grads_run(workdir: Path) -> dict[str, Any]:
    """One torchrun of `sp_grads_worker` over both GPUs; rank 0's report plus rank 1's spread."""
    out = fresh_dir(workdir / "sp-grads")
    ranks = torchrun_module(__name__, [str(out)], out)
    report = ranks[0]
    report["rank1"] = {p: r["sp_norm_grad_spread_over_tp"] for p, r in ranks[1]["paths"].items()}
    return dict(report)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="each rank writes rank<r>.json here")
    sp_grads_worker(p.parse_args().out)


if __name__ == "__main__":
    main()
