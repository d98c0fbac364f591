"""Direct preference optimisation: the loss, and the frozen reference's log-probabilities.

A DPO micro-batch holds k preference pairs as 2k rows, the k chosen responses first, then the
k rejected ones (`data.batches`), each row's loss mask on its response tokens. A row's
log-probability is the sum of its response tokens' log-probabilities; the model's per-token
cross-entropy (Megatron's vocab-parallel one, so tensor parallelism never gathers the
vocabulary) is its negative.

The reference is frozen and may have another parallel shape than the policy, on the same ranks
(co-located) or on a slice of its own. Each step it reads the step's pairs in its own
data-parallel layout, scores them without gradients, and the rows of the whole global batch are
summed over its data-parallel group into one `[global_batch, 2]` table (chosen, rejected) that
every reference rank holds: a few floats per pair. Co-located, the policy's ranks read their
pairs' rows from that table in place; on a slice, the table is broadcast from the reference's
first rank over the job's default group, which spans both slices.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kubetron_api.config import DpoSpec, TrainerConfig
from kubetron_trainer.data.batches import Batch, Batches, build_batches
from kubetron_trainer.models.megatron_config import padded_vocab_size
from kubetron_trainer.observe.flops import forward_flops_per_token
from kubetron_trainer.runtime.model_plan import ModelStart
from kubetron_trainer.runtime.multi import FrozenModel
from kubetron_trainer.runtime.step import Objective

# The recipe's own numbers, reported beside the loss (and exported as metrics).
DPO_STATS = ("chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")


def sequence_logps(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Each row's log-probability of its masked tokens, from per-token cross-entropy [rows, s]."""
    return -(per_token_loss.float() * loss_mask.float()).sum(dim=-1)


@dataclass(frozen=True)
class DpoTerms:
    """The loss of a batch of pairs and what it is made of (each a scalar tensor)."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, spec: DpoSpec) -> DpoTerms:
    """DPO's sigmoid loss over k pairs, mean over pairs.

    `policy` and `reference` are the rows' log-probabilities [2k]: chosen first, then rejected.
    With label smoothing e (conservative DPO): -(1-e) log s(b m) - e log s(-b m), where m is the
    difference of the chosen and rejected log-ratios and b is beta. The rewards are
    b * (policy - reference) log-ratios; accuracy counts pairs whose chosen reward is higher.
    """
    k = policy.shape[0] // 2
    ratios = policy.float() - reference.float()
    chosen, rejected = spec.beta * ratios[:k], spec.beta * ratios[k:]
    margin = chosen - rejected
    e = spec.label_smoothing
    per_pair = -(1 - e) * F.logsigmoid(margin) - e * F.logsigmoid(-margin)
    stats = {
        "chosen_reward": chosen.detach().mean(),
        "rejected_reward": rejected.detach().mean(),
        "reward_margin": margin.detach().mean(),
        "reward_accuracy": (margin.detach() > 0).float().mean(),
    }
    return DpoTerms(per_pair.mean(), stats)


class DpoObjective:
    """The policy's loss on one micro-batch: its per-token losses and the reference's rows."""

    logits = False  # the model returns per-token cross-entropy (labels given)

    def __init__(self, spec: DpoSpec) -> None:
        self.spec = spec

    def __call__(
        self, output: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        reference = batch.extra.get("ref_logps")
        if reference is None:
            raise RuntimeError("a DPO micro-batch reached the loss without reference log-probs")
        terms = dpo_loss(sequence_logps(output, batch.loss_mask), reference, self.spec)
        return terms.loss, terms.stats


def reference_table(
    rows: Iterable[tuple[torch.Tensor, torch.Tensor]],
    first_sample: int,
    global_batch: int,
    dp_group: dist.ProcessGroup,
    device: torch.device,
) -> torch.Tensor:
    """The step's `[global_batch, 2]` (chosen, rejected) reference log-probabilities on every
    rank of the reference's grid. `rows` are this rank's (pair indices [k], logps [2k]) per
    micro-batch; every pair is scored by exactly one data-parallel rank (the tensor-parallel
    peers of a rank score the same pairs and sum over their own dp group)."""
    table = torch.zeros(global_batch, 2, dtype=torch.float32, device=device)
    for index, logps in rows:
        k = index.numel()
        at = (index.to(device) - first_sample).long()
        table[at, 0] = logps[:k].float()
        table[at, 1] = logps[k:].float()
    if dist.get_world_size(dp_group) > 1:
        dist.all_reduce(table, group=dp_group)
    return table


def with_reference(
    micro_batches: list[Batch | None], table: torch.Tensor, first_sample: int
) -> Iterator[Batch | None]:
    """The policy's micro-batches, each carrying its pairs' reference rows as `ref_logps` [2k]
    (chosen rows, then rejected, as the batch lays them out)."""
    for batch in micro_batches:
        if batch is None or batch.index is None:
            yield batch
            continue
        rows = table[(batch.index.to(table.device) - first_sample).long()]
        ref = torch.cat([rows[:, 0], rows[:, 1]]).to(batch.tokens.device)
        yield replace(batch, extra={**batch.extra, "ref_logps": ref})


class DpoRecipe:
    """A trainable policy against a frozen reference: the loop's `Recipe` for `kind: dpo`.

    `reference` is None on ranks outside the reference's ranks (a slice of its own);
    `broadcast_from` is the reference's first rank when the two models are on disjoint slices
    (the table then crosses over the job's default group), None when co-located.
    """

    stats: tuple[str, ...] = DPO_STATS

    def __init__(
        self,
        cfg: TrainerConfig,
        reference: FrozenModel | None,
        reference_start: ModelStart,
        trained_name: str,
        device: torch.device,
        broadcast_from: int | None,
    ) -> None:
        self.cfg = cfg
        self.trained_name = trained_name
        self.reference = reference
        self.reference_start = reference_start
        self.device = device
        self.broadcast_from = broadcast_from
        self.objective: Objective = DpoObjective(cfg.recipe.dpo)
        self.batches: Batches | None = None
        self.start_step = self.start_sample = 0

    def begin(self, start_step: int, start_sample: int, resumed: bool) -> tuple[int, int, bool]:
        if self.broadcast_from is not None:  # rank 0 holds the policy (the slices' rule)
            values = torch.tensor([start_step, start_sample, int(resumed)], device=self.device)
            dist.broadcast(values, src=0)
            start_step, start_sample, flag = (int(v) for v in values.tolist())
            resumed = bool(flag)
        self.start_step, self.start_sample = start_step, start_sample
        if self.reference is not None:  # the reference reads the step's pairs in its layout
            pg = self.reference.pg
            self.batches = build_batches(
                self.reference_start.cfg, reads_data=True, dp_rank=pg.dp.rank(),
                dp_size=pg.dp.size(), device=self.device, start_step=start_step,
                start_sample=start_sample,
            )  # fmt: skip
        return start_step, start_sample, resumed

    def first_sample(self, step: int) -> int:
        return self.start_sample + (step - self.start_step) * self.cfg.recipe.global_batch_size

    def table(self, step: int) -> torch.Tensor:
        """The step's reference table, on every rank that needs it."""
        gbs = self.cfg.recipe.global_batch_size
        if self.reference is not None:
            assert self.batches is not None, "begin() comes first"
            ref = self.reference
            rows = (
                (b.index, sequence_logps(ref.forward(b, logits=False), b.loss_mask))
                for b in self.batches.step(step)
                if b is not None and b.index is not None
            )
            table = reference_table(rows, self.first_sample(step), gbs, ref.pg.dp, self.device)
        else:
            table = torch.empty(gbs, 2, dtype=torch.float32, device=self.device)
        if self.broadcast_from is not None:
            dist.broadcast(table, src=self.broadcast_from)
        return table

    def feed(self, step: int, micro: Sequence[Batch | None]) -> Sequence[Batch | None]:
        return list(with_reference(list(micro), self.table(step), self.first_sample(step)))

    def serve(self, step: int) -> None:
        self.table(step)

    def frozen_flops_per_token(self) -> float:
        start = self.reference_start
        vocab = padded_vocab_size(start.cfg.model.vocab_size, start.dims.tp)
        return forward_flops_per_token(start.cfg.model, self.cfg.recipe.seq_length, vocab)

    def spent(self, step_seconds: float) -> dict[str, float]:
        if self.reference is None:
            return {}
        seconds, self.reference.seconds = self.reference.seconds, 0.0
        return {self.reference.name: seconds, self.trained_name: step_seconds - seconds}
