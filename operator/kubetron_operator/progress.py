"""Live progress of a running job, read from global rank 0's metrics endpoint.

Trainer pods hold no API credentials, so the operator pulls: in worker 0 (node rank 0, labelled
job-role=master by the training-operator) local rank 0 serves the pod's metrics
(prometheus-client multiprocess mode), and global rank 0, in that pod, writes the job-wide
gauges. `parse` is pure (exposition text -> numbers); `progress` turns them into
`status.progress`; `fetch` is the one HTTP GET, bounded by a short timeout. The controller
calls it at most once per `--progress-period` per job.

The last poll before the pods end lags the run by up to a period, so when the job ends
`final_progress` replaces it with what global rank 0 handed over as its container's termination
message (`kubetron_api.final.ExitReport`): the last step, its loss, the last evaluation's loss,
the run's throughput and the last checkpoint's step.
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kubetron_api import wire
from kubetron_api.final import ExitReport, FinalProgress

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
    out.update(
        _numbers(
            sample.loss, sample.validation_loss, sample.tokens_per_second,
            sample.last_checkpoint_step,
        )
    )  # fmt: skip
    if sample.mfu is not None:
        out["mfu"] = f"{100 * sample.mfu:.1f}%"
    if sample.mean_step_seconds is not None:
        out["etaSeconds"] = round(max(total_steps - step, 0) * sample.mean_step_seconds)
    if sample.engine:
        out["engine"] = sample.engine
    return out


def _numbers(
    loss: float | None,
    validation_loss: float | None,
    tokens_per_second: float | None,
    checkpoint_step: float | None,
) -> Obj:
    """The progress fields both sources report, as `status.progress` shows them."""
    out: Obj = {}
    if loss is not None:
        out["loss"] = f"{loss:.4f}"
    if validation_loss is not None:
        out["validationLoss"] = f"{validation_loss:.4f}"
    if tokens_per_second is not None:
        out["tokensPerSecond"] = round(tokens_per_second)
    if checkpoint_step is not None:
        out["lastCheckpointStep"] = int(checkpoint_step)
    return out


def final_progress(
    pods: list[dict[str, Any]], last: Obj | None, attempt: int, total_steps: int, now: str
) -> tuple[Obj | None, str]:
    """`status.progress` from the exit report in the termination message of the container that
    ran global rank 0 (among `pods`, the attempt's: one that exited 0 with a report), over the
    last poll `last`; (None, why) when no container left one (the last poll stays)."""
    problems: list[str] = []
    for pod in sorted(pods, key=lambda p: str(p.get("metadata", {}).get("name", ""))):
        for container, message in exit_messages(pod):
            try:
                report = ExitReport.from_message(message)
            except ValueError as err:
                where = f"pod {pod['metadata'].get('name')} container {container}"
                problems.append(f"{where}: {' '.join(str(err).split())[:200]}")
                continue
            return final_reading(report.final, last, attempt, total_steps, now), ""
    return None, "; ".join(problems) or "no container that exited 0 left an exit report"


def exit_messages(pod: dict[str, Any]) -> list[tuple[str, str]]:
    """(container, termination message) of each container of `pod` that exited 0 leaving one:
    a failure's message is its error, and the pods of other ranks leave none."""
    out = []
    for cs in pod.get("status", {}).get("containerStatuses", []) or []:
        term = (cs.get("state") or {}).get("terminated") or {}
        message = str(term.get("message") or "")
        if term.get("exitCode") == 0 and message.strip():
            out.append((str(cs.get("name", "?")), message))
    return out


def final_reading(
    final: FinalProgress, last: Obj | None, attempt: int, total_steps: int, now: str
) -> Obj:
    """The last poll with the run's final numbers in place of its own (what the trainer did
    not report keeps the poll's value); the engine and MFU stay the poll's."""
    out: Obj = {**(last or {}), "step": final.step, "totalSteps": total_steps}
    out.update(etaSeconds=0, attempt=attempt, observedAt=now)
    out.update(
        _numbers(final.loss, final.validation_loss, final.tokens_per_second, final.checkpoint_step)
    )
    if (last or {}).get("step") != final.step or not out.get("advancedAt"):
        out["advancedAt"] = now
    return out


def fetch(host: str, port: int, timeout: float = 2.0) -> str:
    """GET http://host:port/metrics (a pod IP on the cluster network)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
        return str(resp.read().decode())
