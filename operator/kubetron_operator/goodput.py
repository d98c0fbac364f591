"""Goodput: the time a job loses to failures, and the share of its wall time that trained. Pure.

The one definition (status.goodput and docs/operator.md describe it):

- wall time runs from when every pod of the job's first attempt ran (`since`);
- each attempt that ends in failure loses the time from its last checkpoint until every pod of
  the next attempt runs: the steps it must redo, and the restart. Its last checkpoint is when
  the operator first read `progress.lastCheckpointStep` at its value (`checkpointedAt`), or
  when the attempt's pods all ran if it saved none since; a next attempt that fails before it
  runs extends the same loss. The new attempt's start-up (model building, loading the
  checkpoint) is not counted;
- the ratio is (wall time - lost time) / wall time, with three decimals.

The state (`since`, `lostSeconds`, the open `lostSince`) changes only at a restart and when an
attempt first runs; the status's ratio is recomputed then, at each progress reading and when
the job ends, and the metrics' at every reconcile.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from kubetron_operator.lifecycle import timestamp

Obj = dict[str, Any]


def _time(value: str) -> datetime:
    when = timestamp(value)
    assert when is not None
    return when


def _seconds(start: str, end: str) -> float:
    return max((_time(end) - _time(start)).total_seconds(), 0.0)


def checkpointed_at(old: Obj | None, new: Obj, now: str) -> str | None:
    """When `new`'s lastCheckpointStep was first read: the old time while the step is the
    same (a new attempt resumes from it), else now; None before any checkpoint."""
    step = new.get("lastCheckpointStep")
    if step is None:
        return None
    if old and old.get("lastCheckpointStep") == step and old.get("checkpointedAt"):
        return str(old["checkpointedAt"])
    return now


def at_restart(old_status: Obj, now: str) -> Obj | None:
    """The goodput when the current attempt ends in failure: its loss opens (or goes on)."""
    goodput: Obj = dict(old_status.get("goodput") or {})
    if not goodput.get("since"):  # nothing ran yet: no training to lose
        return None
    if not goodput.get("lostSince"):
        running = old_status.get("runningSince")
        start = now
        if running:
            saved = (old_status.get("progress") or {}).get("checkpointedAt")
            start = max((t for t in (running, saved) if t), key=_time)
        goodput["lostSince"] = start
    return with_ratio(goodput, now)


def at_status(old: Obj | None, running_since: str | None, now: str, refresh: bool) -> Obj | None:
    """The goodput in a status written at `now`: once the attempt runs (`running_since`), the
    wall clock starts (first attempt) or the open loss closes at that time. The ratio is
    recomputed then, or with `refresh` (a status written anyway: a progress reading, the end);
    else it stays, so the status does not change every second (each write is an event)."""
    goodput: Obj = dict(old or {})
    changed = False
    if running_since:
        if not goodput.get("since"):
            goodput["since"], changed = running_since, True
        if opened := goodput.get("lostSince"):
            lost = int(goodput.get("lostSeconds") or 0) + _seconds(opened, running_since)
            goodput["lostSeconds"] = round(lost)
            goodput["lostSince"] = None  # the status is a merge patch: None removes it
            changed = True
    if not goodput.get("since"):
        return None
    return with_ratio(goodput, now) if changed or refresh or "ratio" not in goodput else goodput


def lost_seconds(goodput: Obj, now: str) -> float:
    """Lost time so far: the closed losses and the open one."""
    lost = float(goodput.get("lostSeconds") or 0)
    if opened := goodput.get("lostSince"):
        lost += _seconds(opened, now)
    return lost


def ratio(goodput: Obj, now: str) -> float:
    """(wall time - lost time) / wall time; 1 before any wall time passed."""
    wall = _seconds(goodput["since"], now)
    return max(wall - lost_seconds(goodput, now), 0.0) / wall if wall > 0 else 1.0


def with_ratio(goodput: Obj, now: str) -> Obj:
    return {"lostSeconds": 0, **goodput, "ratio": f"{ratio(goodput, now):.3f}"}
