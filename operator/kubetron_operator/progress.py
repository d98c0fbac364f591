"""Live progress of a running job, read from global rank 0's metrics endpoint.

Trainer pods hold no API credentials, so the operator pulls: in worker 0 (node rank 0, labelled
job-role=master by the training-operator) local rank 0 serves the pod's metrics
(prometheus-client multiprocess mode), and global rank 0, in that pod, writes the job-wide
gauges. `parse` is pure (exposition text -> numbers); `progress` turns them into
`status.progress`; `fetch` is the one HTTP GET, bounded by a short timeout. The controller
calls it at most once per `--progress-period` per job.
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from kubetron_api import wire

Obj = dict[str, object]

# metric family (as the parser names it) -> field of `Sample`
_GAUGES = {
    wire.STEP.name: "step",
    wire.LOSS.name: "loss",
    wire.VALIDATION_LOSS.name: "validation_loss",
    wire.TOKENS_PER_SECOND.name: "tokens_per_second",
    wire.MFU.name: "mfu",
    wire.LAST_CHECKPOINT_STEP.name: "last_checkpoint_step",
    wire.ATTEMPT.name: "attempt",
}
_DURATION_SUM = wire.STEP_DURATION.sample("_sum")
_DURATION_COUNT = wire.STEP_DURATION.sample("_count")


@dataclass(frozen=True)
class Sample:
    """What rank 0 reported; None where it has not yet (before the first step or save)."""

    step: float | None = None
    loss: float | None = None
    validation_loss: float | None = None  # the last evaluation's (recipe.eval)
    tokens_per_second: float | None = None
    mfu: float | None = None
    last_checkpoint_step: float | None = None
    attempt: float | None = None
    mean_step_seconds: float | None = None
    engine: str | None = None  # what runs the layers (`wire.LayerEngine`'s label)


def parse(text: str, job: str) -> Sample:
    """The job's progress numbers from a trainer pod's /metrics text."""
    values: dict[str, float] = {}
    duration_sum = duration_count = None
    engine = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get(wire.JOB_LABEL) != job or math.isnan(s.value):
                continue
            if s.name in _GAUGES:
                values[_GAUGES[s.name]] = s.value
            elif s.name == _DURATION_SUM:
                duration_sum = s.value
            elif s.name == _DURATION_COUNT:
                duration_count = s.value
            elif s.name == wire.ENGINE_INFO.name and s.value == 1:
                engine = engine_label(s.labels.get(wire.ENGINE_LABEL, ""))
    mean = duration_sum / duration_count if duration_sum and duration_count else None
    return Sample(**values, mean_step_seconds=mean, engine=engine)  # type: ignore[arg-type]


def engine_label(label: str) -> str | None:
    """The engine a trainer reported, as status.progress.engine shows it; None for a label
    that names no engine."""
    try:
        return wire.LayerEngine.from_label(label).to_label()
    except ValueError:
        return None


def progress(sample: Sample, total_steps: int, now: str) -> Obj | None:
    """`status.progress` from a sample; None when the trainer has reported no step yet."""
    if sample.step is None:
        return None
    step = int(sample.step)
    out: Obj = {"step": step, "totalSteps": total_steps, "observedAt": now}
    if sample.loss is not None:
        out["loss"] = f"{sample.loss:.4f}"
    if sample.validation_loss is not None:
        out["validationLoss"] = f"{sample.validation_loss:.4f}"
    if sample.tokens_per_second is not None:
        out["tokensPerSecond"] = round(sample.tokens_per_second)
    if sample.mfu is not None:
        out["mfu"] = f"{100 * sample.mfu:.1f}%"
    if sample.mean_step_seconds is not None:
        out["etaSeconds"] = round(max(total_steps - step, 0) * sample.mean_step_seconds)
    if sample.last_checkpoint_step is not None:
        out["lastCheckpointStep"] = int(sample.last_checkpoint_step)
    if sample.engine:
        out["engine"] = sample.engine
    return out


def fetch(host: str, port: int, timeout: float = 2.0) -> str:
    """GET http://host:port/metrics (a pod IP on the cluster network)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
        return str(resp.read().decode())
