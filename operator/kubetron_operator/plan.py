"""plan(): from a parsed MegatronJob to everything needed to render it. Pure, no I/O.

The plan resolves the preset, derives the parallel degrees, checks every rule the API server's
CEL cannot (preset numbers), and builds the trainer's config. A bad spec raises `PlanError`
listing every broken rule; the operator turns that into `Valid=False` and creates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetron_api.config import (
    CheckpointSpec,
    ModelArch,
    TrainerConfig,
)
from kubetron_api.dims import ParallelConfigError, ParallelDims
from kubetron_api.rules import ShapeSpec, check_shape
from kubetron_api.v1alpha1 import MegatronJob, MegatronJobSpec, ResolvedParallelism
from kubetron_operator.scheduling import Scheduler, choose
from kubetron_operator.scheduling.interface import PodPlacement


class PlanError(ValueError):
    """The spec passed the schema but cannot run; `problems` names every broken rule."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Plan:
    """The resolved job: architecture, degrees, world size and the trainer config."""

    arch: ModelArch
    dims: ParallelDims
    nodes: int
    procs_per_node: int
    requirements: tuple[str, ...]
    trainer_config: TrainerConfig
    scheduler: Scheduler  # the job's scheduler, chosen once from spec.scheduling
    placement: PodPlacement | None = None  # pod annotations of the scheduler's placement

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    def resolved_parallelism(self) -> ResolvedParallelism:
        d = self.dims
        return ResolvedParallelism(
            tensor=d.tp,
            pipeline=d.pp,
            virtual_pipeline=d.vpp,
            context=d.cp,
            expert=d.ep,
            expert_tensor=d.etp,
            data=d.dp,
        )


def plan(job: MegatronJob) -> Plan:
    """Resolve and validate a MegatronJob; raise `PlanError` naming every broken rule."""
    spec = job.spec
    problems = _volume_rules(spec)
    wanted = ShapeSpec.of_job(spec)  # the preset resolved once; the shape checked once
    arch, res = wanted.arch, spec.resources
    try:
        shape = check_shape(wanted)
    except ParallelConfigError as err:
        raise PlanError([*err.problems, *problems]) from err
    scheduler = choose(spec.scheduling)
    where, topology_problems = scheduler.placement(shape.dims, res.gpus_per_node)
    problems += topology_problems
    if problems:
        raise PlanError(problems)
    config = TrainerConfig(
        job_name=job.name or "local",
        model=arch,
        preset=spec.model.preset,
        weights=spec.model.weights,
        recipe=spec.recipe,
        parallelism=spec.parallelism,
        data=spec.data,
        checkpoint=CheckpointSpec.model_validate(spec.checkpoint.model_dump(exclude={"volume"})),
        metrics=spec.metrics,
        world_size=res.world_size,
        gpus_per_node=res.gpus_per_node,
        collective_timeout_seconds=spec.run_policy.collective_timeout_seconds,
    )
    return Plan(
        arch=arch,
        dims=shape.dims,
        nodes=res.nodes,
        procs_per_node=res.gpus_per_node,
        requirements=shape.requirements,
        trainer_config=config,
        scheduler=scheduler,
        placement=where,
    )


def _volume_rules(spec: MegatronJobSpec) -> list[str]:
    if spec.checkpoint.volume is not None and not spec.checkpoint.path:
        return ["spec.checkpoint.volume needs spec.checkpoint.path (the mount point)"]
    return []
