"""Trainer shapes on 2 GPUs with decentralized and with Megatron's global process groups.

Each case trains the real trainer with both kinds of groups (same seeds, same ranks in every
group: equal losses up to the GPU kernels' own nondeterminism), timed one after the other or,
where speed says nothing, both at once; the checkpoint case resumes a TP2 checkpoint as PP2
and as TP1 x DP2. tests/gpu/test_multigpu.py checks them; benchmarks/decentralized_groups.py
records them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from devtools.training.gpu import (
    PRECISION,
    Case,
    finish,
    launch_trainer,
    summarize,
    trainer_config,
)
from kubetron_api.config import PRESETS

# qwen3-0.6b as published (28 layers: PP2 x VPP2 gives 7 layers a chunk), bf16, distributed
# optimizer; the MoE case is qwen3-30b-a3b's widths with 4 layers and 16 experts (top-4).
CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("tp2", "qwen3-0.6b", {"tensor": 2}),
        Case("dp2", "qwen3-0.6b", {}, global_first=True),
        Case("pp2", "qwen3-0.6b", {"pipeline": 2}, timed=False),
        Case("pp2_vpp2", "qwen3-0.6b", {"pipeline": 2, "virtualPipeline": 2}, timed=False),
        Case(
            "ep2_moe",
            "qwen3-30b-a3b",
            {"expert": 2},
            {"num_layers": 4, "num_experts": 16, "moe_router_topk": 4},
            seq=1024,
            timed=False,
        ),
    ]
}

# Checkpoint resharding: a small, fast-learning model (qwen3-0.6b widths, 4 layers, a 4096-token
# vocabulary), saved every 4 steps as TP2, resumed from step 4 in other shapes.
CKPT_ARCH = {"num_layers": 4, "vocab_size": 4096}
CKPT_STEPS, CKPT_AT = 8, 4
CKPT_TARGETS = {"pp2": {"pipeline": 2}, "tp1_dp2": {}}


def train_pair(name: str, workdir: Path) -> dict[str, Any]:
    """Case `name` with both kinds of groups, one after the other (each alone on the GPUs)."""
    case = CASES[name]
    cfg = trainer_config(
        name,
        case.arch(),
        case.preset,
        case.parallelism,
        steps=case.steps,
        seq=case.seq,
        micro_batch=case.micro_batch,
        global_batch=case.global_batch,
        distributed_optimizer=case.distributed_optimizer,
    )
    order = ["global", "decentralized"] if case.global_first else ["decentralized", "global"]
    runs = {}
    if case.timed:
        for groups in order:
            started = launch_trainer(cfg, workdir / name / groups, groups)
            runs[groups] = summarize(finish(started, f"{name} {groups}"))
    else:
        both = {groups: launch_trainer(cfg, workdir / name / groups, groups) for groups in order}
        runs = {groups: summarize(finish(s, f"{name} {groups}")) for groups, s in both.items()}
    dec, glo = runs["decentralized"], runs["global"]
    diffs = [abs(a - b) for a, b in zip(dec["losses"], glo["losses"], strict=True)]
    return {
        "case": name,
        "preset": case.preset,
        "arch_overrides": case.arch_overrides,
        "parallelism": case.parallelism,
        "recipe": {
            "steps": case.steps, "seq_length": case.seq, "micro_batch": case.micro_batch,
            "global_batch": case.global_batch, "precision": PRECISION,
            "distributed_optimizer": case.distributed_optimizer, "warmup_steps_excluded": 2,
        },
        "order": order if case.timed else "both at once, 2 processes a GPU: timings not comparable",
        "decentralized": dec,
        "global": glo,
        "losses_bitwise_equal": dec["losses"] == glo["losses"],
        "max_abs_loss_diff": max(diffs),
        "step_time_ratio_decentralized_over_global": dec["median_step_s"] / glo["median_step_s"],
        "tokens_per_s_ratio": dec["tokens_per_s"] / glo["tokens_per_s"],
    }  # fmt: skip


def checkpoint_reshard(workdir: Path) -> dict[str, Any]:
    """TP2 trains CKPT_STEPS steps saving every CKPT_AT; the step-CKPT_AT checkpoint is then
    resumed as each of CKPT_TARGETS (concurrently: only losses are compared here)."""
    arch = PRESETS["qwen3-0.6b"].model_copy(update=CKPT_ARCH)
    base = workdir / "ckpt"
    if base.exists():
        shutil.rmtree(base)

    def cfg(name: str, parallelism: dict[str, int], ckpt: Path) -> dict[str, Any]:
        return trainer_config(
            f"ckpt-{name}", arch, "qwen3-0.6b", parallelism, steps=CKPT_STEPS, seq=512,
            micro_batch=2, global_batch=8, lr=3e-3, checkpoint=ckpt, save_interval=CKPT_AT,
        )  # fmt: skip

    source = base / "tp2"
    full = summarize(finish(launch_trainer(cfg("tp2", {"tensor": 2}, source), base / "run-tp2",
                                           "decentralized"), "checkpoint source tp2"))  # fmt: skip
    started = {}
    for target, parallelism in CKPT_TARGETS.items():
        ckpt = base / f"from-tp2-to-{target}"
        ckpt.mkdir(parents=True)
        shutil.copytree(source / f"iter_{CKPT_AT:07d}", ckpt / f"iter_{CKPT_AT:07d}")
        (ckpt / "latest").write_text(f"{CKPT_AT}\n")
        started[target] = launch_trainer(
            cfg(target, parallelism, ckpt), base / f"run-{target}", "decentralized"
        )
    resumed = {
        target: summarize(finish(s, f"resume as {target}"), warmup=0)
        for target, s in started.items()
    }
    after = full["losses"][CKPT_AT:]
    return {
        "arch": "qwen3-0.6b widths, " + ", ".join(f"{k}={v}" for k, v in CKPT_ARCH.items()),
        "saved_as": {"tensor": 2},
        "saved_step": CKPT_AT,
        "optimizer": "Megatron distributed optimizer, saved fully_reshardable",
        "uninterrupted_tp2": full,
        "resumed": resumed,
        "max_rel_loss_diff": {
            target: max(abs(a - b) / abs(b) for a, b in zip(r["losses"], after, strict=True))
            for target, r in resumed.items()
        },
        "loss_drop_steps_1_to_resume": full["losses"][0] - full["losses"][CKPT_AT],
    }
