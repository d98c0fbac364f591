"""Distillation's rank arithmetic and loss in one process: who runs which rows, which piece of
the teacher's logits goes where, and the vocab-parallel KL against torch's on a whole vocabulary
(tests/distributed/test_distill_exchange.py runs the collectives)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from kubetron_trainer.models.megatron_config import padded_vocab_size
from kubetron_trainer.recipes.distill import (
    DistillLayout,
    DistillShapeError,
    Segment,
    distill_kl,
    distill_loss,
)

SHAPES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (4, 1), (1, 4), (8, 2), (2, 8)]
# 300 pads to 384 / 512 / 512 / 1024 for TP 1 / 2 / 4 / 8; 600 leaves TP4's and TP8's last
# shards all padding; 50257 is GPT-2's.
VOCABS = [300, 600, 50257]
MICRO = [1, 2, 4]


def layouts() -> list[DistillLayout]:
    out = []
    for (tp_t, tp_s), vocab, mb in itertools.product(SHAPES, VOCABS, MICRO):
        world = 2 * max(tp_t, tp_s)
        out.append(DistillLayout(world, tp_t, tp_s, vocab, mb, first_rank=3))
    return out


def label(layout: DistillLayout) -> str:
    return f"t{layout.tp_teacher}s{layout.tp_student}v{layout.vocab_size}m{layout.micro_batch}"


@pytest.fixture(params=layouts(), ids=label)
def layout(request: pytest.FixtureRequest) -> DistillLayout:
    return request.param


def ranks(layout: DistillLayout) -> range:
    return range(layout.first_rank, layout.first_rank + layout.world)


def test_vocab_shards_tile_the_padded_vocabulary(layout: DistillLayout) -> None:
    v = layout.vocab_size
    models = (
        (layout.tp_teacher, layout.teacher_shard, layout.teacher_interval),
        (layout.tp_student, layout.student_shard, layout.student_interval),
    )
    for tp, shard, interval in models:
        width = padded_vocab_size(v, tp) // tp
        for i, rank in enumerate(ranks(layout)):
            assert shard(rank) == (i % tp * width, (i % tp + 1) * width)
        # the real ids of one TP group's shards are [0, V), in order, each once
        first = ranks(layout)[:tp]
        assert [i for r in first for i in range(*interval(r))] == list(range(v))


def test_teacher_groups_run_the_student_batches(layout: DistillLayout) -> None:
    tp_t, tp_s, mb = layout.tp_teacher, layout.tp_student, layout.micro_batch
    rows: Counter[tuple[int, int]] = Counter()
    for first in ranks(layout)[::tp_t]:
        segments = layout.teacher_segments(first)
        # every rank of a teacher TP group runs the same input
        assert all(layout.teacher_segments(first + i) == segments for i in range(tp_t))
        assert layout.teacher_rows(first) == sum(hi - lo for lo, hi in (s.rows for s in segments))
        rows.update((s.batch, row) for s in segments for row in range(*s.rows))
        if tp_t >= tp_s:  # the distinct batches of its student groups, ascending
            d = layout.student_batch(first)
            assert segments == tuple(Segment(d + i, (0, mb)) for i in range(tp_t // tp_s))
        else:
            assert [s.batch for s in segments] == [layout.student_batch(first)]
    per_row = layout.ratio if tp_t < tp_s and not layout.split_rows else 1
    assert layout.split_rows == (tp_t < tp_s and mb % (tp_s // tp_t) == 0)
    assert rows == Counter(
        {(d, row): per_row for d in range(layout.world // tp_s) for row in range(mb)}
    )


def source(layout: DistillLayout, sender: int, row: int) -> tuple[int, int]:
    """(student batch, row) of row `row` of the sender's teacher input."""
    offset = 0
    for seg in layout.teacher_segments(sender):
        lo, hi = seg.rows
        if row < offset + hi - lo:
            return seg.batch, lo + row - offset
        offset += hi - lo
    raise AssertionError(f"row {row} beyond the teacher input of rank {sender}")


def test_every_rank_receives_exactly_its_interval_once(layout: DistillLayout) -> None:
    plan = layout.plan()
    assert len({(p.sender, p.receiver) for p in plan}) == len(plan)  # one piece per pair
    for rank in ranks(layout):
        block = (rank - layout.first_rank) // layout.block
        by_row: dict[int, list[tuple[int, int]]] = {r: [] for r in range(layout.micro_batch)}
        for p in layout.pieces_to(rank):
            assert p.receiver == rank
            assert (p.sender - layout.first_rank) // layout.block == block
            t_lo, t_hi = layout.teacher_interval(p.sender)
            assert t_lo <= p.vocab[0] < p.vocab[1] <= t_hi
            assert p.src_rows[1] - p.src_rows[0] == p.dst_rows[1] - p.dst_rows[0]
            for src, dst in zip(range(*p.src_rows), range(*p.dst_rows), strict=True):
                assert source(layout, p.sender, src) == (layout.student_batch(rank), dst)
                by_row[dst].append(p.vocab)
        lo, hi = layout.student_interval(rank)
        for row, intervals in by_row.items():
            # the row's pieces, in order, tile [lo, hi): no gap, no overlap
            edges = [lo] + [e for iv in sorted(intervals) for e in iv] + [hi]
            assert all(a == b for a, b in zip(edges[::2], edges[1::2], strict=True)), (rank, row)


def test_senders_and_receivers_agree(layout: DistillLayout) -> None:
    plan = layout.plan()
    by_sender = [p for r in ranks(layout) for p in layout.pieces_from(r)]
    assert sorted(by_sender, key=repr) == sorted(plan, key=repr)
    for rank in ranks(layout):
        assert all(p.sender == rank for p in layout.pieces_from(rank))


def test_redundant_teacher_groups_serve_their_own_ranks() -> None:
    layout = DistillLayout(4, 1, 4, 600, 2)  # 2 rows, 4 teacher groups: no even split
    assert not layout.split_rows
    assert all(p.sender == p.receiver for p in layout.plan())
    split = DistillLayout(4, 1, 4, 600, 4)
    assert split.split_rows and split.teacher_rows(0) == 1
    assert {p.sender for p in split.pieces_to(1)} == {0, 1, 2, 3}


def test_shapes_that_cannot_share_ranks() -> None:
    for args in ((6, 2, 3, 100, 1), (4, 8, 1, 100, 1), (6, 4, 2, 100, 1), (4, 2, 2, 0, 1)):
        with pytest.raises(DistillShapeError):
            DistillLayout(*args)
    with pytest.raises(DistillShapeError, match="outside"):
        DistillLayout(4, 2, 2, 100, 1, first_rank=2).student_batch(1)


def reference(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """torch's KL(p_teacher || p_student) per token over whole-vocabulary logits."""
    log_q, log_p = F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_loss_and_gradient_equal_torch_over_the_real_vocabulary(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    vocab, padded = 300, padded_vocab_size(300, 1)
    student = torch.randn(2, 5, padded, generator=g, dtype=torch.float64) * 3
    student[..., vocab:] = 50.0  # padding: would dominate any softmax it entered
    teacher = torch.randn(2, 5, vocab, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float64)
    ours = student.clone().requires_grad_()
    args = {"temperature": temperature, "vocab_size": vocab, "vocab_start": 0, "tp_group": None}
    loss = distill_loss(ours, teacher, mask, **args)  # type: ignore[arg-type]
    loss.backward()
    theirs = student[..., :vocab].clone().requires_grad_()
    ref = temperature**2 * (reference(theirs, teacher, temperature) * mask).sum() / mask.sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert ours.grad is not None and theirs.grad is not None
    torch.testing.assert_close(ours.grad[..., :vocab], theirs.grad, rtol=1e-6, atol=1e-9)
    assert not ours.grad[..., vocab:].any()
    kl = distill_kl(ours, teacher, **args)  # type: ignore[arg-type]
    torch.testing.assert_close(kl, reference(student[..., :vocab], teacher, temperature))


def test_kl_is_zero_for_equal_distributions_and_gradchecks() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 7, generator=g, dtype=torch.float64)
    args = {"temperature": 1.5, "vocab_size": 7, "vocab_start": 0, "tp_group": None}
    assert distill_kl(logits, logits + 4.0, **args).abs().max() < 1e-12  # type: ignore[arg-type]
    teacher = torch.randn(1, 3, 7, generator=g, dtype=torch.float64)
    student = torch.randn(1, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s: distill_kl(s, teacher, **args),  # type: ignore[arg-type]
        (student,),
    )


def test_mismatched_teacher_piece_is_refused() -> None:
    with pytest.raises(DistillShapeError, match="do not match"):
        distill_kl(
            torch.zeros(1, 2, 128),
            torch.zeros(1, 2, 128),
            temperature=1.0,
            vocab_size=300,
            vocab_start=256,  # 44 real ids in this shard
            tp_group=None,
        )


def test_bf16_logits_reduce_in_fp32_and_get_bf16_gradients() -> None:
    g = torch.Generator().manual_seed(2)
    student = torch.randn(1, 4, 256, generator=g).bfloat16().requires_grad_()
    teacher = torch.randn(1, 4, 200, generator=g).bfloat16()
    args = {"temperature": 2.0, "vocab_size": 200, "vocab_start": 0, "tp_group": None}
    kl = distill_kl(student, teacher, **args)  # type: ignore[arg-type]
    assert kl.dtype == torch.float32
    distill_loss(student, teacher, torch.ones(1, 4), **args).backward()  # type: ignore[arg-type]
    assert student.grad is not None and student.grad.dtype == torch.bfloat16
    expected = reference(student.detach()[..., :200].double(), teacher.double(), 2.0)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)
