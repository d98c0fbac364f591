"""Knowledge distillation between two co-located models of different tensor-parallel shapes.

The student (trained) and the teacher (frozen) run on the same W ranks, each in its own grid
(pipeline and context parallelism 1, tensor parallelism fastest): rank r is teacher TP rank
r % tp_t and student TP rank r % tp_s, and trains on the micro-batch of student data-parallel
rank r // tp_s. One of tp_t, tp_s divides the other. Megatron's vocab-parallel output layer
gives each rank the logits of its shard [i*P/tp, (i+1)*P/tp) of the padded vocabulary
P = padded_vocab_size(V, tp); P differs between the two shapes, and ids >= V are padding that
belongs to no distribution.

What moves, and why. A row's logits are seq x vocab numbers (8192 x 152k in fp32 is 5 GB), so
no rank ever holds the whole vocabulary of a row, let alone of several rows:
- The ranks are cut into blocks of B = max(tp_t, tp_s) consecutive ranks: one TP group of the
  model with the wider TP, whole TP groups of the other. Nothing leaves a block.
- tp_t >= tp_s: the block is one teacher TP group over k = tp_t / tp_s student TP groups, each
  with its own micro-batch. The teacher runs the k micro-batches as one batch of k * mb rows, in
  ascending student data-parallel rank. Each teacher rank then holds [k*mb, seq, P_t/tp_t]
  logits: as many numbers as a student rank's own [mb, seq, P_s/tp_s] (up to padding).
- tp_t < tp_s: the block is one student TP group (one micro-batch) over k teacher TP groups.
  Where k divides the micro-batch they split its rows (teacher group h runs rows
  [h*mb/k, (h+1)*mb/k)); otherwise each runs all of it, redundantly, and serves only the ranks
  of its own group, so no rows travel between teacher groups.
- Each piece (rows one teacher group computed for a micro-batch, times the intersection of a
  teacher rank's vocab shard with a student rank's, clipped to [0, V)) goes point-to-point from
  the one teacher rank that holds it to the one student rank that needs it. Every rank ends with
  [mb, seq, n] teacher logits: its own micro-batch's rows and the n real ids of its student
  shard, as large as its own student logits.
The loss then reduces a few numbers per token over the student's TP group (maxima, partition
sums, the per-token KL), as Megatron's vocab-parallel cross-entropy does.

`DistillLayout` is the rank arithmetic alone. The collectives take the models' own TP groups
explicitly (never Megatron's parallel_state) and run on gloo (CPU) and NCCL alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist

from kubetron_trainer.data.batches import Batch
from kubetron_trainer.models.megatron_config import padded_vocab_size
from kubetron_trainer.runtime.step import masked_mean

Interval = tuple[int, int]  # [start, end) of rows or of global vocabulary ids


class DistillShapeError(ValueError):
    """The teacher's and the student's shapes cannot share their ranks as distillation needs."""


def _shard(vocab_size: int, tp: int, tp_rank: int) -> Interval:
    width = padded_vocab_size(vocab_size, tp) // tp
    return tp_rank * width, (tp_rank + 1) * width


def _meet(a: Interval, b: Interval) -> Interval | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


@dataclass(frozen=True)
class Segment:
    """Rows `rows` of the micro-batch of student data-parallel rank `batch`."""

    batch: int
    rows: Interval


@dataclass(frozen=True)
class Piece:
    """Teacher logits one rank sends another: rows `src_rows` of the sender's teacher batch (its
    segments, concatenated) are rows `dst_rows` of the receiver's micro-batch; `vocab` is the
    global ids, inside both ranks' shards and below V. The sender may be the receiver."""

    sender: int
    receiver: int
    src_rows: Interval
    dst_rows: Interval
    vocab: Interval


@dataclass(frozen=True)
class DistillLayout:
    """Where the teacher's rows and both models' vocab shards live. Ranks are global.

    world: the ranks both grids span, from `first_rank`. tp_teacher, tp_student: the two TP
    degrees. vocab_size: the real vocabulary V, the same for both models. micro_batch: rows of
    one student micro-batch (every data-parallel rank's is the same size).
    """

    world: int
    tp_teacher: int
    tp_student: int
    vocab_size: int
    micro_batch: int
    first_rank: int = 0

    def __post_init__(self) -> None:
        small, big = sorted((self.tp_teacher, self.tp_student))
        if small < 1 or big % small or self.world < 1 or self.world % big:
            raise DistillShapeError(
                f"teacher tensor={self.tp_teacher} and student tensor={self.tp_student} over "
                f"{self.world} ranks: one degree must divide the other and both the world; "
                "choose tensor degrees such as 1, 2, 4, 8 that divide the ranks"
            )
        if self.vocab_size < 1 or self.micro_batch < 1:
            raise DistillShapeError(
                f"vocab_size={self.vocab_size} and micro_batch={self.micro_batch} must be >= 1"
            )

    @property
    def block(self) -> int:
        """Consecutive ranks that exchange only among themselves: the wider TP group."""
        return max(self.tp_teacher, self.tp_student)

    @property
    def ratio(self) -> int:
        """TP groups of the narrower model in one block."""
        return self.block // min(self.tp_teacher, self.tp_student)

    @property
    def split_rows(self) -> bool:
        """The teacher groups of one student TP group each run a share of its rows."""
        return self.tp_teacher < self.tp_student and self.micro_batch % self.ratio == 0

    def _local(self, rank: int) -> int:
        local = rank - self.first_rank
        if not 0 <= local < self.world:
            raise DistillShapeError(
                f"rank {rank} is outside the ranks [{self.first_rank}, "
                f"{self.first_rank + self.world}) of the teacher and the student"
            )
        return local

    def student_batch(self, rank: int) -> int:
        """The student data-parallel rank whose micro-batch `rank` trains on."""
        return self._local(rank) // self.tp_student

    def teacher_shard(self, rank: int) -> Interval:
        """The teacher's padded vocab ids on `rank` (its output's last dimension)."""
        return _shard(self.vocab_size, self.tp_teacher, self._local(rank) % self.tp_teacher)

    def student_shard(self, rank: int) -> Interval:
        """The student's padded vocab ids on `rank`; its start is `distill_loss`'s vocab_start."""
        return _shard(self.vocab_size, self.tp_student, self._local(rank) % self.tp_student)

    def teacher_interval(self, rank: int) -> Interval:
        """The real ids (below V) of the teacher's shard; empty where it is all padding."""
        return self._real(self.teacher_shard(rank))

    def student_interval(self, rank: int) -> Interval:
        """The real ids of the student's shard: the teacher logits `rank` receives."""
        return self._real(self.student_shard(rank))

    def _real(self, shard: Interval) -> Interval:
        return min(shard[0], self.vocab_size), min(shard[1], self.vocab_size)

    def teacher_segments(self, rank: int) -> tuple[Segment, ...]:
        """What the teacher TP group of `rank` runs, in the order of its input's rows."""
        local, mb = self._local(rank), self.micro_batch
        if self.tp_teacher >= self.tp_student:
            start = local - local % self.tp_teacher
            batches = range(start // self.tp_student, (start + self.tp_teacher) // self.tp_student)
            return tuple(Segment(d, (0, mb)) for d in batches)
        batch = self.student_batch(rank)
        if not self.split_rows:
            return (Segment(batch, (0, mb)),)
        share, h = mb // self.ratio, local % self.tp_student // self.tp_teacher
        return (Segment(batch, (h * share, (h + 1) * share)),)

    def teacher_rows(self, rank: int) -> int:
        """Rows of the teacher's input (and output) on `rank`."""
        return sum(hi - lo for lo, hi in (s.rows for s in self.teacher_segments(rank)))

    def _row_sources(self, rank: int) -> list[tuple[int, Interval, Interval]]:
        """(first rank of a teacher group, rows of its output, rows of `rank`'s micro-batch):
        one source for each row `rank` needs, its own teacher group where that computed it."""
        local, batch = self._local(rank), self.student_batch(rank)
        start = self.first_rank + local - local % self.block
        own = self.first_rank + local - local % self.tp_teacher
        groups = sorted(range(start, start + self.block, self.tp_teacher), key=lambda g: g != own)
        owner: dict[int, tuple[int, int]] = {}  # row -> (teacher group, row of its output)
        for group in groups:
            offset = 0
            for seg in self.teacher_segments(group):
                lo, hi = seg.rows
                if seg.batch == batch:
                    for row in range(lo, hi):
                        owner.setdefault(row, (group, offset + row - lo))
                offset += hi - lo
        runs: list[tuple[int, Interval, Interval]] = []
        for row in range(self.micro_batch):
            group, src = owner[row]
            if runs and runs[-1][0] == group and runs[-1][1][1] == src:
                _, (src_lo, _), (dst_lo, _) = runs.pop()
                runs.append((group, (src_lo, src + 1), (dst_lo, row + 1)))
            else:
                runs.append((group, (src, src + 1), (row, row + 1)))
        return runs

    def pieces_to(self, rank: int) -> tuple[Piece, ...]:
        """What `rank` receives: together exactly its micro-batch's rows times its student
        interval, each (row, id) once. The order is fixed (by source rows, then sender)."""
        want = self.student_interval(rank)
        if want[0] == want[1]:
            return ()
        pieces = []
        for first, src, dst in self._row_sources(rank):
            for sender in range(first, first + self.tp_teacher):
                vocab = _meet(self.teacher_interval(sender), want)
                if vocab is not None:
                    pieces.append(Piece(sender, rank, src, dst, vocab))
        return tuple(pieces)

    def pieces_from(self, rank: int) -> tuple[Piece, ...]:
        """What `rank` sends (to itself too), by receiver, each in `pieces_to`'s order."""
        local = self._local(rank)
        start = self.first_rank + local - local % self.block
        receivers = range(start, start + self.block)
        return tuple(p for r in receivers for p in self.pieces_to(r) if p.sender == rank)

    def plan(self) -> tuple[Piece, ...]:
        """Every piece of the job."""
        ranks = range(self.first_rank, self.first_rank + self.world)
        return tuple(p for r in ranks for p in self.pieces_to(r))


# --------------------------------------------------------------------------- the teacher's side


@dataclass(frozen=True)
class TeacherBatch:
    """The teacher's input on one rank: its segments' rows, concatenated."""

    tokens: torch.Tensor  # [rows, seq]
    position_ids: torch.Tensor  # [rows, seq]
    attention_mask: torch.Tensor | None = None  # [rows, 1, seq, seq], True = masked


def teacher_batch(
    layout: DistillLayout, rank: int, batch: Batch, teacher_tp: dist.ProcessGroup
) -> TeacherBatch:
    """The input the teacher runs on `rank`, from each rank's student micro-batch `batch`.

    Collective over `teacher_tp` (this rank's teacher TP group) when tp_t > tp_s: the first rank
    of each student TP group in it broadcasts its micro-batch (tokens, position ids and the
    attention mask, which every rank has or none has). Otherwise purely local.
    """

    segments = layout.teacher_segments(rank)

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        by_batch = {layout.student_batch(rank): tensor}
        if layout.tp_teacher > layout.tp_student:  # the other student groups' micro-batches
            for seg in segments:
                src = layout.first_rank + seg.batch * layout.tp_student
                buf = tensor.contiguous() if src == rank else torch.empty_like(tensor)
                dist.broadcast(buf, src=src, group=teacher_tp)
                by_batch.setdefault(seg.batch, buf)
        return torch.cat([by_batch[s.batch][s.rows[0] : s.rows[1]] for s in segments])

    mask = batch.attention_mask
    return TeacherBatch(
        rows(batch.tokens), rows(batch.position_ids), mask if mask is None else rows(mask)
    )


def exchange_teacher_logits(
    layout: DistillLayout,
    rank: int,
    teacher_logits: torch.Tensor,
    teacher_tp: dist.ProcessGroup,
    student_tp: dist.ProcessGroup,
) -> torch.Tensor:
    """Each rank's teacher logits for its own rows and student vocab interval.

    teacher_logits: this rank's teacher output for `teacher_batch`'s input,
    [teacher_rows, seq, P_t/tp_t] (GPTModel's output without labels). Returns
    [micro_batch, seq, n] in its dtype and device, column j the logit of id
    `layout.student_interval(rank)[0] + j`. Point-to-point within the block, over the TP group of
    the model with the wider TP (`teacher_tp` or `student_tp`); every rank of the job calls it.
    Under NCCL the group's communicator must exist before its first point-to-point call (the
    trainer's groups are created eagerly: its default group is bound to the rank's GPU).
    """
    group = teacher_tp if layout.tp_teacher >= layout.tp_student else student_tp
    t_lo, t_hi = layout.teacher_shard(rank)
    expected = (layout.teacher_rows(rank), t_hi - t_lo)
    if teacher_logits.dim() != 3 or (teacher_logits.shape[0], teacher_logits.shape[2]) != expected:
        raise DistillShapeError(
            f"rank {rank}: teacher logits {tuple(teacher_logits.shape)}, expected "
            f"[{expected[0]}, seq, {expected[1]}] (its teacher rows, seq, its vocab shard)"
        )
    want = layout.student_interval(rank)
    out = teacher_logits.new_empty((layout.micro_batch, teacher_logits.shape[1], want[1] - want[0]))

    def view(p: Piece) -> torch.Tensor:
        return out[p.dst_rows[0] : p.dst_rows[1], :, p.vocab[0] - want[0] : p.vocab[1] - want[0]]

    ops: list[dist.P2POp] = []
    for p in layout.pieces_from(rank):
        src = teacher_logits[
            p.src_rows[0] : p.src_rows[1], :, p.vocab[0] - t_lo : p.vocab[1] - t_lo
        ]
        if p.receiver == rank:
            view(p).copy_(src)
        else:
            ops.append(dist.P2POp(dist.isend, src.contiguous(), p.receiver, group))
    landing: list[tuple[torch.Tensor, torch.Tensor]] = []
    for p in layout.pieces_to(rank):
        if p.sender != rank:
            dst = view(p)
            # A piece narrower than the interval is a strided view; it lands in a buffer first.
            buf = (
                dst
                if dst.is_contiguous()
                else torch.empty(dst.shape, dtype=out.dtype, device=out.device)
            )
            ops.append(dist.P2POp(dist.irecv, buf, p.sender, group))
            landing.append((dst, buf))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for dst, buf in landing:
        if buf is not dst:
            dst.copy_(buf)
    return out


def teacher_logits_for_student(
    layout: DistillLayout,
    rank: int,
    batch: Batch,
    forward: Callable[[TeacherBatch], torch.Tensor],
    *,
    teacher_tp: dist.ProcessGroup,
    student_tp: dist.ProcessGroup,
) -> torch.Tensor:
    """`teacher_batch`, the teacher's `forward` on it, then `exchange_teacher_logits`, without
    gradients: [micro_batch, seq, n] teacher logits for `rank`'s student shard."""
    with torch.no_grad():
        logits = forward(teacher_batch(layout, rank, batch, teacher_tp))
        return exchange_teacher_logits(layout, rank, logits, teacher_tp, student_tp)


# --------------------------------------------------------------------------- the loss


def _all_reduce(
    t: torch.Tensor, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None
) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


def _log_partitions(
    zs: torch.Tensor, zt: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log sum exp over the whole (real) vocabulary of both, `[..., 1]` each: two all-reduces."""
    m = zs.new_full((*zs.shape[:-1], 2), float("-inf"))
    if zs.shape[-1]:  # a shard of padding only has no maximum
        m[..., 0], m[..., 1] = zs.amax(-1), zt.amax(-1)
    _all_reduce(m, dist.ReduceOp.MAX, group)
    sums = torch.stack([(zs - m[..., :1]).exp().sum(-1), (zt - m[..., 1:]).exp().sum(-1)], -1)
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    log_z = m + sums.log()
    return log_z[..., :1], log_z[..., 1:]


class _VocabParallelKL(torch.autograd.Function):
    """Per-token KL(p || q) of vocab-sharded logits; the gradient goes to the student only.

    d KL / d z_s = q - p for z_s = student logits / T, so the backward needs that difference
    alone, kept from the forward: one shard-sized tensor, no re-reduction.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        temperature: float,
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        dtype = torch.promote_types(student.dtype, torch.float32)
        zs, zt = student.to(dtype) / temperature, teacher.to(dtype) / temperature
        log_zs, log_zt = _log_partitions(zs, zt, group)
        log_q, log_p = zs.sub_(log_zs), zt.sub_(log_zt)
        p = log_p.exp()
        kl = log_p.sub_(log_q).mul_(p).sum(-1)
        _all_reduce(kl, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(log_q.exp_().sub_(p))
        ctx.temperature, ctx.dtype = temperature, student.dtype  # type: ignore[attr-defined]
        return kl

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_kl: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:
        (diff,) = ctx.saved_tensors  # type: ignore[attr-defined]
        grad = diff * (grad_kl.unsqueeze(-1) / ctx.temperature)  # type: ignore[attr-defined]
        return grad.to(ctx.dtype), None, None, None  # type: ignore[attr-defined]


def distill_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    vocab_size: int,
    vocab_start: int,
    tp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Per-token KL(p_teacher || p_student), `[b, s]`, the same on every rank of `tp_group`.

    p = softmax(logits / temperature) over the real ids [0, vocab_size) (no T^2 factor: the
    number to report). student_logits: this rank's shard `[b, s, P_s/tp_s]` (GPTModel's output
    without labels) of ids [vocab_start, vocab_start + P_s/tp_s); columns of ids >= vocab_size
    are padding, ignored, and get zero gradient. teacher_logits: `[b, s, n]`, n the shard's real
    ids (`exchange_teacher_logits`); frozen, no gradient. In fp32 (fp64 for fp64 logits).
    tp_group: the student's TP group; None (or a group of one): the shard is the whole
    vocabulary and nothing is reduced.
    """
    n = max(0, min(student_logits.shape[-1], vocab_size - vocab_start))
    if teacher_logits.shape != (*student_logits.shape[:-1], n):
        raise DistillShapeError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match student logits "
            f"{tuple(student_logits.shape)} of ids from {vocab_start} with {n} below "
            f"vocab_size={vocab_size}"
        )
    kl = _VocabParallelKL.apply(
        student_logits[..., :n], teacher_logits.detach(), temperature, tp_group
    )
    return cast(torch.Tensor, kl)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    temperature: float,
    vocab_size: int,
    vocab_start: int,
    tp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """T^2 * the mean of `distill_kl` over the tokens `loss_mask` ([b, s]) keeps: a scalar,
    the same on every rank of `tp_group`, differentiable in `student_logits` only.

    The soft targets' gradient shrinks as 1/T^2 (Hinton et al.), so the T^2 factor keeps its size
    independent of the temperature, and comparable with the hard-label loss it is mixed with.
    """
    kl = distill_kl(
        student_logits,
        teacher_logits,
        temperature=temperature,
        vocab_size=vocab_size,
        vocab_start=vocab_start,
        tp_group=tp_group,
    )
    return temperature**2 * masked_mean(kl, loss_mask)
