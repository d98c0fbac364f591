"""Prometheus metrics of one trainer pod, in prometheus-client's multiprocess mode.

torchrun starts one process per GPU, but Prometheus scrapes one endpoint per pod (the
PodMonitor's `metrics` port). prometheus-client's multiprocess mode lets every rank write its
values to files in `PROMETHEUS_MULTIPROC_DIR`, and local rank 0 serves them all, aggregated, from
one HTTP endpoint. The directory must be set before prometheus-client is first imported (it
picks its value class at import), which is why `MultiprocDir.prepare` runs first and
prometheus-client is imported only inside functions here.

Who writes what, so that a pod's endpoint (and a `sum` over pods) means the right thing:
job-level gauges and histograms are written by local rank 0 only (every rank knows the step's
loss and timing); the tokens counter is incremented by every rank with its share of the step's
tokens, so the pod sums to its share and a sum over pods is the job's total; GPU memory is per
rank (label `rank`). Nothing registers on prometheus-client's global registry. The names and
labels are the wire's (`kubetron_api.wire`): the operator reads some of them back.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetron_api import wire

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# Bucket bounds of each histogram, in seconds.
BUCKETS: dict[str, tuple[float, ...]] = {
    wire.STEP_DURATION.name: (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
    wire.SAVE_DURATION.name: (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
    wire.DATA_WAIT.name: (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
}


@dataclass(frozen=True)
class MultiprocDir:
    """The directory every rank of the pod writes its values to, and whether this run made it
    (no operator set `PROMETHEUS_MULTIPROC_DIR`): then local rank 0 removes it at the end."""

    path: Path
    owned: bool

    @classmethod
    def prepare(cls, local_rank: int, default: str) -> MultiprocDir:
        """Point `PROMETHEUS_MULTIPROC_DIR` at a directory (the operator sets it; else
        `default`).

        Local rank 0 empties it: values left by an earlier run in the same pod must not be
        summed into this run's. Call before anything imports prometheus-client, and barrier
        afterwards so no rank writes before the directory is clean.
        """
        owned = wire.METRICS_DIR_ENV not in os.environ
        path = Path(os.environ.setdefault(wire.METRICS_DIR_ENV, default))
        if local_rank == 0 and path.exists():
            for child in path.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path, owned)

    def remove(self, local_rank: int) -> None:
        """Remove a directory this run made (local rank 0, once every rank is past its last
        write); one the operator mounted stays."""
        if self.owned and local_rank == 0:
            shutil.rmtree(self.path, ignore_errors=True)


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step measured (the same on every rank)."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    duration_s: float
    tokens: int  # tokens in the global batch
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float | None
    extras: dict[str, float] = field(default_factory=dict)  # the recipe's own numbers


class TrainerMetrics:
    """This rank's metric children, labelled for the job; `serve` starts the pod's endpoint."""

    def __init__(
        self,
        job: str,
        rank: int,
        local_rank: int,
        world_size: int,
        multiprocess: bool = True,
        attempt: int = 0,
    ) -> None:
        from prometheus_client import CollectorRegistry

        self.job = job
        self.rank = rank
        self.writer = local_rank == 0  # job-level values are written once per pod
        self.world_size = world_size
        # In multiprocess mode values go to files; a private registry serves them. Without it
        # (unit tests), the metrics live in this private registry.
        self.registry: CollectorRegistry | None = None if multiprocess else CollectorRegistry()
        self.step = self._family(wire.STEP)
        self.loss = self._family(wire.LOSS)
        self.tokens_per_s = self._family(wire.TOKENS_PER_SECOND)
        self.tflops = self._family(wire.MODEL_TFLOPS)
        self.mfu = self._family(wire.MFU)
        self.grad_norm = self._family(wire.GRAD_NORM)
        self.validation_loss = self._family(wire.VALIDATION_LOSS)
        self.lr = self._family(wire.LEARNING_RATE)
        self.last_save = self._family(wire.LAST_CHECKPOINT_STEP)
        self.attempt = self._family(wire.ATTEMPT)
        if self.writer:
            self.attempt.labels(job).set(attempt)
        self.engine = self._family(wire.ENGINE_INFO)
        self.mem_alloc = self._family(wire.GPU_MEMORY_ALLOCATED)
        self.mem_reserved = self._family(wire.GPU_MEMORY_RESERVED)
        self.tokens = self._family(wire.TOKENS).labels(job)
        self.step_duration = self._family(wire.STEP_DURATION).labels(job)
        self.save_duration = self._family(wire.SAVE_DURATION).labels(job)
        self.data_wait = self._family(wire.DATA_WAIT).labels(job)
        self.recipe = {name: self._family(m) for name, m in wire.RECIPE_METRICS.items()}
        self.model_tps = self._family(wire.MODEL_TOKENS_PER_SECOND)
        self.model_bytes = self._family(wire.MODEL_PARAMETER_BYTES)

    def _family(self, metric: wire.Metric) -> Any:
        """One family on this rank's registry; gauges keep the most recent value written in
        the pod (multiprocess mode), histograms their `BUCKETS`."""
        from prometheus_client import Counter, Gauge, Histogram

        args = (metric.name, metric.help, metric.labels)
        if metric.kind == "gauge":
            return Gauge(*args, registry=self.registry, multiprocess_mode="mostrecent")
        if metric.kind == "counter":
            return Counter(*args, registry=self.registry)
        return Histogram(*args, buckets=BUCKETS[metric.name], registry=self.registry)

    def serve(self, port: int) -> CollectorRegistry:
        """Serve the pod's aggregated metrics on `port` (call on local rank 0 only)."""
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = self.registry
        if registry is None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        start_http_server(port, registry=registry)
        return registry

    def record_step(self, s: StepStats) -> None:
        self.tokens.inc(s.tokens / self.world_size)
        if not self.writer:
            return
        self.step.labels(self.job).set(s.step)
        self.loss.labels(self.job).set(s.loss)
        self.grad_norm.labels(self.job).set(s.grad_norm)
        self.lr.labels(self.job).set(s.lr)
        self.tokens_per_s.labels(self.job).set(s.tokens_per_s)
        self.tflops.labels(self.job).set(s.tflops_per_gpu)
        if s.mfu is not None:
            self.mfu.labels(self.job).set(s.mfu)
        for name, value in s.extras.items():
            self.recipe[name].labels(self.job).set(value)
        self.step_duration.observe(s.duration_s)

    def record_validation(self, loss: float) -> None:
        """The loss of an evaluation of the validation split."""
        if self.writer:
            self.validation_loss.labels(self.job).set(loss)

    def record_models(self, tokens: int, seconds: dict[str, float]) -> None:
        """Each model's tokens per second over its share of the last step."""
        if self.writer:
            for model, spent in seconds.items():
                if spent > 0:
                    self.model_tps.labels(self.job, model).set(tokens / spent)

    def record_parameters(self, model: str, nbytes: int) -> None:
        self.model_bytes.labels(self.job, str(self.rank), model).set(nbytes)

    def record_engine(self, engine: str) -> None:
        """`engine`: a `wire.LayerEngine` label."""
        if self.writer:
            self.engine.labels(self.job, engine).set(1)

    def record_memory(self, allocated: int, reserved: int) -> None:
        self.mem_alloc.labels(self.job, str(self.rank)).set(allocated)
        self.mem_reserved.labels(self.job, str(self.rank)).set(reserved)

    def record_data_wait(self, seconds: float) -> None:
        if self.writer:
            self.data_wait.observe(seconds)

    def record_save(self, seconds: float, step: int) -> None:
        if self.writer:
            self.save_duration.observe(seconds)
            self.last_save.labels(self.job).set(step)
