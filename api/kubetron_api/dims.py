"""Parallel degrees shared by the operator and the trainer, torch-free.

One `ParallelDims` object validates that the degrees multiply into the world size, derives the
data-parallel degree (never given by the user) and exposes the degrees Megatron-Core needs. The
operator imports this without torch; the trainer builds its process groups from it.

Every check collects all broken rules and raises one `ParallelConfigError` (a `ValueError`) whose
message names every degree, so a user sees the whole shape and every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetron_api.expr import Rule, broken

# The rules on the degrees alone, checked whenever a ParallelDims is made (kubetron_api.rules
# puts them, with the others, into the CRD).
POSITIVE = Rule(
    "degrees-positive",
    "spec.parallelism",
    "tensor >= 1 && pipeline >= 1 && context >= 1 && expert >= 1 && expertTensor >= 1 "
    "&& virtualPipeline >= 1 && worldSize >= 1",
    "every parallel degree and the world size must be >= 1 (tensor={tensor} "
    "pipeline={pipeline} context={context} expert={expert} expertTensor={expertTensor} "
    "virtualPipeline={virtualPipeline} world size={worldSize})",
    crd=False,  # the schema's minimum: 1 says it
)
# The others divide by the degrees: checked once POSITIVE holds.
DEGREE_RULES: tuple[Rule, ...] = (
    POSITIVE,
    Rule(
        "world-per-model-parallel",
        "spec.parallelism",
        "worldSize % (tensor * context * pipeline) == 0",
        "world size={worldSize} is not divisible by tensor*context*pipeline="
        "{tensor * context * pipeline}; change the degrees or the number of GPUs "
        "(spec.resources.nodes*gpusPerNode)",
    ),
    Rule(
        "world-per-expert-parallel",
        "spec.parallelism.expert",
        "worldSize % (expertTensor * expert * pipeline) == 0",
        "world size={worldSize} is not divisible by expertTensor*expert*pipeline="
        "{expertTensor * expert * pipeline}; change the expert degrees",
    ),
    Rule(
        "virtual-pipeline-needs-pipeline",
        "spec.parallelism.virtualPipeline",
        "virtualPipeline == 1 || pipeline > 1",
        "spec.parallelism.virtualPipeline={virtualPipeline} needs pipeline > 1; set "
        "virtualPipeline to 1 or raise pipeline",
    ),
)


class ParallelConfigError(ValueError):
    """A parallel shape that cannot run; `problems` lists every broken rule."""

    def __init__(self, problems: list[str], shape: str) -> None:
        self.problems = list(problems)
        self.shape = shape
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid parallel shape ({shape}):\n{lines}")


class ParallelGroupsError(ValueError):
    """Groups that cannot be built or seeded on this topology; the message names the fix."""


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of one model's parallel grid over `world_size` ranks.

    Dense grid order is [tp, cp, dp, pp] (tp fastest, so TP stays inside a node); the expert grid
    over the same ranks is [etp, ep, edp, pp].
    """

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int = 1
    dp: int = 1

    @classmethod
    def from_degrees(
        cls,
        world_size: int,
        *,
        tp: int = 1,
        pp: int = 1,
        cp: int = 1,
        ep: int = 1,
        etp: int = 1,
        vpp: int = 1,
    ) -> ParallelDims:
        """Derive dp from the world size; raise one error naming every broken rule."""
        values = degree_values(world_size, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, vpp=vpp)
        degrees = {name: v for name, v in values.items() if name != "worldSize"}
        problems = broken((POSITIVE,), values, {}) or broken(DEGREE_RULES[1:], values, {})
        if problems:
            dp = data_parallel(world_size, tp=tp, cp=cp, pp=pp)
            raise ParallelConfigError(problems, _shape(world_size, degrees, dp=dp))
        return cls.of_checked(world_size, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, vpp=vpp)

    @classmethod
    def of_checked(
        cls, world_size: int, *, tp: int, pp: int, cp: int, ep: int, etp: int, vpp: int
    ) -> ParallelDims:
        """The dims of degrees whose DEGREE_RULES a caller has already checked, among its own
        rules (`kubetron_api.rules.check_shape`): dp derived, nothing checked twice."""
        dp = world_size // (tp * cp * pp)
        return cls(world_size=world_size, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, vpp=vpp, dp=dp)

    @property
    def edp(self) -> int:
        """Expert data-parallel degree: the expert grid's remaining dimension."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def vpp_size(self) -> int | None:
        """Megatron's `virtual_pipeline_model_parallel_size`: None when not interleaved."""
        return self.vpp if self.vpp > 1 else None

    def megatron_sizes(self) -> dict[str, int | None]:
        """The degrees under Megatron-Core's names (TransformerConfig, parallel_state)."""
        return {
            "tensor_model_parallel_size": self.tp,
            "pipeline_model_parallel_size": self.pp,
            "virtual_pipeline_model_parallel_size": self.vpp_size,
            "context_parallel_size": self.cp,
            "expert_model_parallel_size": self.ep,
            "expert_tensor_parallel_size": self.etp,
        }

    def dense_rank(self, tp: int, cp: int, dp: int, pp: int) -> int:
        """The global rank at a point of the dense grid [tp, cp, dp, pp] (tp fastest):
        rank = tp + TP*(cp + CP*(dp + DP*pp))."""
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def model_parallel_ranks(self, dp: int) -> list[int]:
        """The ranks of data-parallel replica `dp`'s model-parallel group: its tensor x context
        x pipeline ranks, ascending. Consecutive when pipeline or data parallel is 1; otherwise
        the stages are DP*TP*CP ranks apart (pipeline is the slowest dimension)."""
        return sorted(
            self.dense_rank(t, c, dp, p)
            for p in range(self.pp)
            for c in range(self.cp)
            for t in range(self.tp)
        )

    def pod_groups(self, procs_per_node: int) -> list[list[int]]:
        """The node ranks (pods) that hold model-parallel groups together: the pods of each
        data-parallel replica's group, merged where two groups share a pod, each set ascending
        and the sets ordered by their first node rank (so node rank 0 comes first)."""
        owner = list(range(self.world_size // procs_per_node))  # union-find over pods

        def root(pod: int) -> int:
            while owner[pod] != pod:
                owner[pod] = owner[owner[pod]]
                pod = owner[pod]
            return pod

        for d in range(self.dp):
            first, *rest = (rank // procs_per_node for rank in self.model_parallel_ranks(d))
            for pod in rest:
                owner[root(pod)] = root(first)
        sets: dict[int, list[int]] = {}
        for pod in range(len(owner)):
            sets.setdefault(root(pod), []).append(pod)
        return sorted(sets.values())

    def pod_order(self, procs_per_node: int) -> list[int]:
        """The node rank of each pod index: the pods of one `pod_groups` set are consecutive, so
        slices of consecutive pods (Kueue's topology slices) each hold whole model-parallel
        groups. The identity unless pipeline and data parallel are both > 1 and a group spans
        pods: TP8 x PP2 x DP2 on 8-GPU pods is [0, 2, 1, 3] (replica 0's stages are pods 0, 2)."""
        return [pod for group in self.pod_groups(procs_per_node) for pod in group]

    def describe(self) -> str:
        return (
            f"world={self.world_size} tensor={self.tp} pipeline={self.pp} "
            f"virtualPipeline={self.vpp} context={self.cp} expert={self.ep} "
            f"expertTensor={self.etp} data={self.dp}"
        )


def degree_values(
    world_size: int, *, tp: int, pp: int, cp: int, ep: int, etp: int, vpp: int
) -> dict[str, int]:
    """The degrees under the names the shape rules read (spec.parallelism's field names)."""
    return {
        "worldSize": world_size, "tensor": tp, "pipeline": pp, "context": cp, "expert": ep,
        "expertTensor": etp, "virtualPipeline": vpp,
    }  # fmt: skip


def data_parallel(world_size: int, *, tp: int, cp: int, pp: int) -> int | None:
    """The data-parallel degree, or None where the degrees do not divide the world (the shape
    an error message shows)."""
    model_parallel = tp * cp * pp
    divisible = model_parallel > 0 and not world_size % model_parallel
    return world_size // model_parallel if divisible else None


def _shape(world_size: int, degrees: dict[str, int], dp: int | None) -> str:
    parts = [f"world={world_size}"] + [f"{k}={v}" for k, v in degrees.items()]
    parts.append(f"data={dp if dp is not None else '?'}")
    return " ".join(parts)
