"""Distillation between a teacher and a student of different tensor-parallel shapes on 4 CPU
ranks (gloo), against one process that sees whole vocabularies.

One `torchrun` launch runs this file as its worker for every case. On each rank a fake teacher
(logits a fixed function of the tokens, position ids and attention mask it is given, garbage in
the padding) runs on the input `teacher_batch` gathered, its vocab shard goes through
`exchange_teacher_logits`, and `distill_loss` runs on the student's shard of random logits
(garbage in the padding too). The rank then recomputes everything for its own micro-batch on the
whole real vocabulary with torch's `kl_div` and records the differences: the teacher piece, the
per-token KL, the loss and the gradient of the student logits (zero in the padding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kubetron_trainer.data.batches import Batch
from kubetron_trainer.models.megatron_config import padded_vocab_size
from kubetron_trainer.recipes.distill import (
    DistillLayout,
    TeacherBatch,
    distill_kl,
    distill_loss,
    teacher_logits_for_student,
)

pytestmark = pytest.mark.distributed

WORLD, SEQ, TOKENS = 4, 6, 50
# (teacher TP, student TP, vocab, micro-batch, temperature, attention mask). 300 pads to
# 384 / 512 / 512 for TP 1 / 2 / 4; 600 to 640 / 768 / 1024, leaving TP4's last shard padding.
CASES = [
    (2, 1, 300, 2, 1.0, False),
    (1, 2, 300, 2, 2.0, True),  # the two teacher groups split the rows
    (1, 2, 300, 1, 1.0, False),  # one row: both teacher groups run it
    (2, 2, 600, 1, 1.0, True),
    (4, 1, 600, 2, 3.0, False),
    (1, 4, 600, 2, 1.0, False),  # the student's last shard is all padding
    (1, 4, 600, 4, 0.5, True),
    (4, 2, 300, 1, 1.0, True),
    (2, 4, 600, 2, 2.0, False),
    (1, 1, 300, 1, 1.0, False),
    (4, 4, 1000, 2, 1.0, True),
]
TOL = 1e-6


def tp_groups() -> dict[int, dist.ProcessGroup]:
    """This rank's group for each TP degree, TP fastest (every rank creates every group)."""
    mine = {}
    for tp in (1, 2, 4):
        for first in range(0, WORLD, tp):
            group = dist.new_group(list(range(first, first + tp)))
            if first <= dist.get_rank() < first + tp:
                assert isinstance(group, dist.ProcessGroup)
                mine[tp] = group
    return mine


def micro_batch(case: int, batch: int, mb: int, masked: bool) -> Batch:
    """Student data-parallel rank `batch`'s micro-batch: the same on every rank."""
    g = torch.Generator().manual_seed(1000 * case + batch)
    tokens = torch.randint(0, TOKENS, (mb, SEQ), generator=g)
    positions = torch.arange(SEQ).expand(mb, SEQ) + torch.randint(0, 9, (mb, 1), generator=g)
    loss_mask = (torch.rand(mb, SEQ, generator=g) < 0.7).double()
    loss_mask[:, 0] = 1.0
    mask = torch.rand(mb, 1, SEQ, SEQ, generator=g) < 0.4 if masked else None
    return Batch(tokens, tokens, loss_mask, positions, mask)


def fake_teacher(inputs: TeacherBatch, vocab: int, padded: int) -> torch.Tensor:
    """[rows, seq, padded] logits from the tokens, positions and mask; padding far above all."""
    g = torch.Generator().manual_seed(7)
    table = torch.randn(TOKENS, padded, generator=g, dtype=torch.float64) * 3
    by_position = torch.randn(32, padded, generator=g, dtype=torch.float64)
    logits = table[inputs.tokens] + by_position[inputs.position_ids]
    if inputs.attention_mask is not None:
        masked = inputs.attention_mask.squeeze(1).sum(-1, keepdim=True)  # [rows, seq, 1]
        logits = logits + 0.5 * masked * by_position[0]
    logits[..., vocab:] = 1e3
    return logits


def run_case(case: int, groups: dict[int, dist.ProcessGroup]) -> dict[str, Any]:
    tp_t, tp_s, vocab, mb, temperature, masked = CASES[case]
    rank = dist.get_rank()
    layout = DistillLayout(WORLD, tp_t, tp_s, vocab, mb)
    batch = micro_batch(case, layout.student_batch(rank), mb, masked)
    t_lo, t_hi = layout.teacher_shard(rank)
    p_t = padded_vocab_size(vocab, tp_t)

    def forward(inputs: TeacherBatch) -> torch.Tensor:
        return fake_teacher(inputs, vocab, p_t)[..., t_lo:t_hi]

    piece = teacher_logits_for_student(
        layout, rank, batch, forward, teacher_tp=groups[tp_t], student_tp=groups[tp_s]
    )
    own = TeacherBatch(batch.tokens, batch.position_ids, batch.attention_mask)
    teacher = fake_teacher(own, vocab, p_t)[..., :vocab]
    s_lo, s_hi = layout.student_shard(rank)
    lo, hi = layout.student_interval(rank)
    g = torch.Generator().manual_seed(500 + case * 10 + layout.student_batch(rank))
    student = torch.randn(mb, SEQ, padded_vocab_size(vocab, tp_s), generator=g).double() * 2
    student[..., vocab:] = -1e3 if case % 2 else 1e3
    shard = student[..., s_lo:s_hi].clone().requires_grad_()
    args: dict[str, Any] = {"temperature": temperature, "vocab_size": vocab}
    args |= {"vocab_start": s_lo, "tp_group": groups[tp_s]}
    loss = distill_loss(shard, piece, batch.loss_mask, **args)
    loss.backward()
    kl = distill_kl(shard.detach(), piece, **args)

    whole = student[..., :vocab].clone().requires_grad_()
    log_q = F.log_softmax(whole / temperature, -1)
    log_p = F.log_softmax(teacher / temperature, -1)
    ref_kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    ref = temperature**2 * (ref_kl * batch.loss_mask).sum() / batch.loss_mask.sum()
    ref.backward()
    assert shard.grad is not None and whole.grad is not None
    return {
        "shape": list(piece.shape),
        "width": hi - lo,
        "piece": (piece - teacher[..., lo:hi]).abs().max().item() if hi > lo else 0.0,
        "kl": (kl - ref_kl).abs().max().item(),
        "loss": abs(loss.item() - ref.item()) / max(1.0, abs(ref.item())),
        "grad": (shard.grad[..., : hi - lo] - whole.grad[..., lo:hi]).abs().max().item()
        if hi > lo
        else 0.0,
        "padding_grad": shard.grad[..., hi - lo :].abs().max().item() if s_hi > hi else 0.0,
        "ref_loss": ref.item(),
    }


def worker(out: Path) -> None:
    dist.init_process_group("gloo")
    groups = tp_groups()
    seen = [run_case(case, groups) for case in range(len(CASES))]
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


def test_exchange_and_loss_equal_one_process(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={WORLD}", __file__, str(tmp_path)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, seen in enumerate(ranks):
        for (tp_t, tp_s, vocab, mb, *_), got in zip(CASES, seen, strict=True):
            label = f"rank {rank} teacher TP{tp_t} student TP{tp_s} vocab {vocab} mb {mb}"
            layout = DistillLayout(WORLD, tp_t, tp_s, vocab, mb)
            lo, hi = layout.student_interval(rank)
            assert got["shape"] == [mb, SEQ, hi - lo], label
            for key in ("piece", "kl", "loss", "grad", "padding_grad"):
                assert got[key] <= TOL, f"{label}: {key} off by {got[key]}"
            assert got["ref_loss"] > 0.1, label  # the distributions differ: not vacuous
    # some rank's student shard was all padding and still took part
    assert any(got["width"] == 0 for seen in ranks for got in seen)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
