"""plan(): from a parsed MegatronJob to everything needed to render it. Pure, no I/O.

The plan resolves the preset, derives the parallel degrees, checks every rule the API server's
CEL cannot (preset numbers), and builds the trainer's config; a job of several models
(spec.models) gets each model's grid over its ranks, and the trainer's config lists them. A bad
spec raises `PlanError` listing every broken rule; the operator turns that into `Valid=False`
and creates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetron_api.config import (
    CheckpointSpec,
    ModelArch,
    ModelSpec,
    ParallelismSpec,
    RankSlice,
    TrainerConfig,
    TrainerModel,
)
from kubetron_api.dims import ParallelConfigError, ParallelDims
from kubetron_api.model_rules import ModelCheck, check_models, models_problems
from kubetron_api.rules import ShapeSpec, check_shape
from kubetron_api.v1alpha1 import (
    MegatronJob,
    MegatronJobSpec,
    ModelStatus,
    ResolvedParallelism,
)
from kubetron_operator.scheduling import Scheduler, choose
from kubetron_operator.scheduling.interface import TOPOLOGY_FIELD, PodPlacement


class PlanError(ValueError):
    """The spec passed the schema but cannot run; `problems` names every broken rule."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def resolved(d: ParallelDims) -> ResolvedParallelism:
    """The degrees a grid runs with, data parallel included (status.parallelism)."""
    return ResolvedParallelism(
        tensor=d.tp,
        pipeline=d.pp,
        virtual_pipeline=d.vpp,
        context=d.cp,
        expert=d.ep,
        expert_tensor=d.etp,
        data=d.dp,
    )


@dataclass(frozen=True)
class ModelPlan:
    """One model of a job of several: where it runs and its resolved grid over its ranks."""

    name: str
    trainable: bool
    ranks: RankSlice  # resolved: every rank of the job when the model sets none
    dims: ParallelDims  # over ranks.count ranks

    def rank_range(self) -> str:
        return f"{self.ranks.first}-{self.ranks.end - 1}"

    def describe(self) -> str:
        role = "trainable" if self.trainable else "frozen"
        return f"{self.name}: ranks {self.rank_range()}, {self.dims.describe()}, {role}"

    def status(self) -> ModelStatus:
        return ModelStatus(
            name=self.name,
            trainable=self.trainable,
            ranks=self.rank_range(),
            parallelism=resolved(self.dims),
        )

    def groups_inside_pods(self, procs_per_node: int) -> bool:
        """Whether each model-parallel group of the model lies inside one pod."""
        first = self.ranks.first
        return all(
            len({(first + r) // procs_per_node for r in self.dims.model_parallel_ranks(d)}) == 1
            for d in range(self.dims.dp)
        )


@dataclass(frozen=True)
class Plan:
    """The resolved job: architecture, degrees, world size and the trainer config. A job of
    several models lists them in `models`; `arch` and `dims` are then the trainable one's."""

    arch: ModelArch
    dims: ParallelDims
    nodes: int
    procs_per_node: int
    requirements: tuple[str, ...]
    trainer_config: TrainerConfig
    scheduler: Scheduler  # the job's scheduler, chosen once from spec.scheduling
    placement: PodPlacement | None = None  # pod annotations of the scheduler's placement
    models: tuple[ModelPlan, ...] = ()  # spec.models resolved, in spec order; () for one model

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def resolved_parallelism(self) -> ResolvedParallelism:
        return resolved(self.dims)

    def pod_order(self) -> list[int]:
        """The node rank of each pod index: each model-parallel group on consecutive pods
        (ParallelDims.pod_order); with several models the identity (their ranks are fixed)."""
        if self.models:
            return list(range(self.nodes))
        return self.dims.pod_order(self.procs_per_node)


def plan(job: MegatronJob) -> Plan:
    """Resolve and validate a MegatronJob; raise `PlanError` naming every broken rule."""
    spec = job.spec
    problems = [*_volume_rules(spec), *models_problems(spec)]
    if spec.models is not None:
        return _plan_models(job, problems)
    if spec.model is None:  # models_problems names the missing model
        raise PlanError(problems)
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
    return Plan(
        arch=arch,
        dims=shape.dims,
        nodes=res.nodes,
        procs_per_node=res.gpus_per_node,
        requirements=shape.requirements,
        trainer_config=_trainer_config(job, spec.model, arch, spec.parallelism),
        scheduler=scheduler,
        placement=where,
    )


def _plan_models(job: MegatronJob, problems: list[str]) -> Plan:
    """plan() of a job of several models: each model's grid over its ranks."""
    spec, res = job.spec, job.spec.resources
    checks, shape_problems = check_models(spec)
    problems = [*shape_problems, *problems]
    models = tuple(
        ModelPlan(c.model.name, c.model.trainable, c.ranks, c.check.dims) for c in checks
    )
    scheduler = choose(spec.scheduling)
    where, topology_problems = _models_placement(job, scheduler, models)
    problems += topology_problems
    if problems:
        raise PlanError(problems)
    trained = next(c for c in checks if c.model.trainable)
    config = _trainer_config(
        job, trained.model, trained.arch, trained.model.parallelism, models=checks
    )
    requirements = sorted({r for c in checks for r in c.check.requirements})
    return Plan(
        arch=trained.arch,
        dims=trained.check.dims,
        nodes=res.nodes,
        procs_per_node=res.gpus_per_node,
        requirements=tuple(requirements),
        trainer_config=config,
        scheduler=scheduler,
        placement=where,
        models=models,
    )


def _models_placement(
    job: MegatronJob, scheduler: Scheduler, models: tuple[ModelPlan, ...]
) -> tuple[PodPlacement | None, list[str]]:
    """Kueue's modelParallelLevel slices consecutive pods for the groups of one grid; the
    grids of several models are placed only where each of their groups lies inside one pod,
    where the level asks nothing (jobLevel still places the whole job)."""
    res, topology = job.spec.resources, job.spec.scheduling.topology
    spanning = [m.name for m in models if not m.groups_inside_pods(res.gpus_per_node)]
    if spanning and topology is not None and topology.model_parallel_level:
        return None, [
            f"{TOPOLOGY_FIELD}.modelParallelLevel places the model-parallel groups of one "
            f"model; those of {spanning} span several pods, and several models' groups cannot "
            "share the pods' order: remove modelParallelLevel (jobLevel places the whole job)"
        ]
    every_rank_alone = ParallelDims.from_degrees(res.world_size)  # every group inside a pod
    return scheduler.placement(every_rank_alone, res.gpus_per_node)


def _trainer_model(c: ModelCheck) -> TrainerModel:
    m = c.model
    return TrainerModel(
        name=m.name, model=c.arch, preset=m.preset, weights=m.weights,
        trainable=m.trainable, parallelism=m.parallelism, ranks=c.ranks,
    )  # fmt: skip


def _trainer_config(
    job: MegatronJob,
    model: ModelSpec,
    arch: ModelArch,
    parallelism: ParallelismSpec,
    models: list[ModelCheck] | None = None,
) -> TrainerConfig:
    """The trainer's config of the job, `model` (spec.model, or the trainable one of
    spec.models) as its model, every one of `models` in its list."""
    spec, res = job.spec, job.spec.resources
    return TrainerConfig(
        job_name=job.name or "local",
        model=arch,
        preset=model.preset,
        weights=model.weights,
        recipe=spec.recipe,
        parallelism=parallelism,
        data=spec.data,
        checkpoint=CheckpointSpec.model_validate(spec.checkpoint.model_dump(exclude={"volume"})),
        metrics=spec.metrics,
        observability=spec.observability,
        world_size=res.world_size,
        gpus_per_node=res.gpus_per_node,
        collective_timeout_seconds=spec.run_policy.collective_timeout_seconds,
        models=[_trainer_model(c) for c in models or []],
    )


def _volume_rules(spec: MegatronJobSpec) -> list[str]:
    if spec.checkpoint.volume is not None and not spec.checkpoint.path:
        return ["spec.checkpoint.volume needs spec.checkpoint.path (the mount point)"]
    return _tensorboard_rules(spec)


def _tensorboard_rules(spec: MegatronJobSpec) -> list[str]:
    """The event files must outlive the pods, so their directory must be on a mounted volume:
    the checkpoint volume's mount point or a mountPath of spec.resources.volumeMounts."""
    board = spec.observability.tensorboard
    if board is None:
        return []
    mounts = [str(m.get("mountPath", "")) for m in spec.resources.volume_mounts]
    if spec.checkpoint.volume is not None and spec.checkpoint.path:
        mounts.append(spec.checkpoint.path)
    path = board.path.rstrip("/")
    if any(m and (path + "/").startswith(m.rstrip("/") + "/") for m in mounts):
        return []
    return [
        f"spec.observability.tensorboard.path={board.path} is on no volume the pods mount (its "
        "event files would be lost with the pod): put it under spec.checkpoint.path with "
        "spec.checkpoint.volume set, or under a mountPath of spec.resources.volumeMounts"
    ]
