"""Prometheus metrics of one trainer pod, in prometheus-client's multiprocess mode.

torchrun starts one process per GPU, but Prometheus scrapes one endpoint per pod (the
PodMonitor's `metrics` port). prometheus-client's multiprocess mode lets every rank write its
values to files in `PROMETHEUS_MULTIPROC_DIR`, and local rank 0 serves them all, aggregated, from
one HTTP endpoint. The directory must be set before prometheus-client is first imported (it
picks its value class at import), which is why `prepare_multiproc_dir` runs first and
prometheus-client is imported only inside functions here.

Who writes what, so that a pod's endpoint (and a `sum` over pods) means the right thing:
job-level gauges and histograms are written by local rank 0 only (every rank knows the step's
loss and timing); the tokens counter is incremented by every rank with its share of the step's
tokens, so the pod sums to its share and a sum over pods is the job's total; GPU memory is per
rank (label `rank`). Nothing registers on prometheus-client's global registry.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
SAVE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
WAIT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)


def prepare_multiproc_dir(local_rank: int, default: str) -> Path:
    """Point `PROMETHEUS_MULTIPROC_DIR` at a directory (the operator sets it; else `default`).

    Local rank 0 empties it: values left by an earlier run in the same pod must not be summed
    into this run's. Call before anything imports prometheus-client, and barrier afterwards so no
    rank writes before the directory is clean.
    """
    path = Path(os.environ.setdefault(MULTIPROC_ENV, default))
    if local_rank == 0 and path.exists():
        for child in path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


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
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.job = job
        self.rank = rank
        self.writer = local_rank == 0  # job-level values are written once per pod
        self.world_size = world_size
        # In multiprocess mode values go to files; a private registry serves them. Without it
        # (unit tests), the metrics live in this private registry.
        self.registry: CollectorRegistry | None = None if multiprocess else CollectorRegistry()
        reg = self.registry
        recent: dict[str, Any] = {"multiprocess_mode": "mostrecent"}

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("job",)) -> Any:
            return Gauge(name, doc, labels, registry=reg, **recent)

        self.step = gauge("kubetron_train_step", "Last completed optimizer step.")
        self.loss = gauge("kubetron_train_loss", "Language-model loss of the last step.")
        self.tokens_per_s = gauge(
            "kubetron_train_tokens_per_second", "Throughput of the last step, whole job."
        )
        self.tflops = gauge(
            "kubetron_train_model_tflops_per_gpu", "Model TFLOP/s per GPU (Megatron's formula)."
        )
        self.mfu = gauge("kubetron_train_mfu_ratio", "Model FLOPs utilisation against peak.")
        self.grad_norm = gauge("kubetron_train_grad_norm", "Gradient norm before clipping.")
        self.lr = gauge("kubetron_train_learning_rate", "Learning rate of the last step.")
        self.last_save = gauge(
            "kubetron_checkpoint_last_step", "Step of the last complete checkpoint."
        )
        self.attempt = gauge(
            "kubetron_train_attempt",
            "The operator's attempt these pods belong to (0 outside the operator); a "
            "whole-group restart starts the next.",
        )
        if self.writer:
            self.attempt.labels(job).set(attempt)
        self.engine = gauge(
            "kubetron_train_engine_info",
            "1, labelled with what runs the layers: transformer-engine, fast path (pieces) or "
            "local spec.",
            ("job", "engine"),
        )
        self.mem_alloc = gauge(
            "kubetron_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated", ("job", "rank")
        )
        self.mem_reserved = gauge(
            "kubetron_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved", ("job", "rank")
        )
        self.tokens = Counter(
            "kubetron_train_tokens", "Tokens trained on.", ["job"], registry=reg
        ).labels(job)
        self.step_duration = Histogram(
            "kubetron_train_step_duration_seconds",
            "Wall time of one optimizer step.",
            ["job"],
            buckets=STEP_BUCKETS,
            registry=reg,
        ).labels(job)
        self.save_duration = Histogram(
            "kubetron_checkpoint_save_duration_seconds",
            "Time to save one checkpoint.",
            ["job"],
            buckets=SAVE_BUCKETS,
            registry=reg,
        ).labels(job)
        self.data_wait = Histogram(
            "kubetron_data_wait_seconds",
            "Time waiting for the next batch.",
            ["job"],
            buckets=WAIT_BUCKETS,
            registry=reg,
        ).labels(job)

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
        self.step_duration.observe(s.duration_s)

    def record_engine(self, engine: str) -> None:
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
