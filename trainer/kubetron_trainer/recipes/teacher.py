"""Distillation in the training loop (recipe distill): the frozen teacher runs on the student's
micro-batches, one at a time, just before the student's forward pass on each.

The two models are co-located (every rank holds a part of both, each in its own shape). For each
student micro-batch the teacher's tensor-parallel group runs the student batches it must cover
and the logits are exchanged so that every rank holds the teacher's logits of its own rows over
its own student vocabulary shard (`recipes.distill`); the student's loss is then computed
vocabulary-parallel without gathering either model's vocabulary. The teacher runs lazily, as the
student's schedule asks for the next micro-batch, so at most one micro-batch of teacher logits
is alive at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from kubetron_api.config import DistillSpec, TrainerConfig
from kubetron_trainer.data.batches import Batch
from kubetron_trainer.models.megatron_config import padded_vocab_size
from kubetron_trainer.observe.flops import forward_flops_per_token
from kubetron_trainer.recipes.distill import (
    DistillLayout,
    TeacherBatch,
    distill_loss,
    teacher_logits_for_student,
)
from kubetron_trainer.runtime.model_plan import ModelStart
from kubetron_trainer.runtime.multi import FrozenModel
from kubetron_trainer.runtime.step import Objective, Stats, masked_mean

DISTILL_STATS = ("distill_kl", "distill_lm_loss")


class DistillObjective:
    """klWeight x T^2 KL(teacher || student) + (1 - klWeight) x the language-model loss."""

    logits = True  # the student returns its vocabulary shard of the logits

    def __init__(
        self, spec: DistillSpec, vocab_size: int, vocab_start: int, tp: ProcessGroupCollection
    ) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self.vocab_start = vocab_start  # the first id of this rank's student shard
        self.tp_group = tp.tp

    def __call__(self, output: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, Stats]:
        teacher = batch.extra.get("teacher")
        if teacher is None:
            raise RuntimeError("a distillation micro-batch reached the loss without teacher logits")
        kl = distill_loss(
            output, teacher, batch.loss_mask, temperature=self.spec.temperature,
            vocab_size=self.vocab_size, vocab_start=self.vocab_start, tp_group=self.tp_group,
        )  # fmt: skip
        logits = output.float().clone()  # Megatron's cross-entropy works in place
        per_token = vocab_parallel_cross_entropy(logits, batch.labels, tp_group=self.tp_group)
        lm = masked_mean(per_token, batch.loss_mask)
        w = self.spec.kl_weight
        loss = w * kl + (1 - w) * lm
        return loss, {"distill_kl": kl.detach(), "distill_lm_loss": lm.detach()}


class LazyMicroBatches(Sequence[Batch | None]):
    """The student's micro-batches, each with the teacher's logits attached when the schedule
    reaches it (collective over the teacher's and the student's tensor-parallel groups: every
    rank walks its micro-batches in order)."""

    def __init__(self, micro: Sequence[Batch | None], attach: object) -> None:
        self.micro = list(micro)
        self.attach = attach

    def __len__(self) -> int:
        return len(self.micro)

    def __getitem__(self, i: int) -> Batch | None:  # type: ignore[override]
        raise TypeError("teacher logits are attached in order: iterate instead")

    def __iter__(self) -> Iterator[Batch | None]:
        for batch in self.micro:
            yield None if batch is None else self.attach(batch)  # type: ignore[operator]


class DistillRecipe:
    """A trainable student and a frozen teacher on the same ranks: the loop's `Recipe` for
    `kind: distill`."""

    stats: tuple[str, ...] = DISTILL_STATS

    def __init__(
        self,
        cfg: TrainerConfig,
        teacher: FrozenModel,
        teacher_start: ModelStart,
        student: ModelStart,
        student_pg: ProcessGroupCollection,
        rank: int,
    ) -> None:
        self.cfg = cfg
        self.teacher = teacher
        self.teacher_start = teacher_start
        self.student = student
        self.student_pg = student_pg
        self.rank = rank
        ranks = student.spec.ranks
        self.layout = DistillLayout(
            ranks.count, teacher_start.dims.tp, student.dims.tp, student.cfg.model.vocab_size,
            cfg.recipe.micro_batch_size, ranks.first,
        )  # fmt: skip
        start = self.layout.student_shard(rank)[0]
        self.objective: Objective = DistillObjective(
            cfg.recipe.distill, student.cfg.model.vocab_size, start, student_pg
        )

    def begin(self, start_step: int, start_sample: int, resumed: bool) -> tuple[int, int, bool]:
        return start_step, start_sample, resumed

    def _teacher_forward(self, batch: TeacherBatch) -> torch.Tensor:
        rows = Batch(batch.tokens, batch.tokens, batch.tokens, batch.position_ids,
                     batch.attention_mask)  # fmt: skip
        return self.teacher.forward(rows, logits=True)

    def attach(self, batch: Batch) -> Batch:
        logits = teacher_logits_for_student(
            self.layout, self.rank, batch, self._teacher_forward,
            teacher_tp=self.teacher.pg.tp, student_tp=self.student_pg.tp,
        )  # fmt: skip
        return replace(batch, extra={**batch.extra, "teacher": logits})

    def feed(self, step: int, micro: Sequence[Batch | None]) -> Sequence[Batch | None]:
        return LazyMicroBatches(micro, self.attach)

    def serve(self, step: int) -> None:
        raise RuntimeError("distillation runs both models on every rank: no rank only serves")

    def frozen_flops_per_token(self) -> float:
        start = self.teacher_start
        vocab = padded_vocab_size(start.cfg.model.vocab_size, start.dims.tp)
        return forward_flops_per_token(start.cfg.model, self.cfg.recipe.seq_length, vocab)

    def spent(self, step_seconds: float) -> dict[str, float]:
        seconds, self.teacher.seconds = self.teacher.seconds, 0.0
        return {self.teacher.name: seconds, self.student.name: step_seconds - seconds}
