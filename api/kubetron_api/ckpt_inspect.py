"""`python -m kubetron_api.ckpt_inspect DIR` (`kubetron checkpoints DIR`): what a checkpoint
directory holds.

Lists every saved step, whether its save finished, and the model, parallel shape and data
position it was written with, and where `latest` points; for a job of several models (one
directory per trained model, `DIR/<name>/`) each model's. Reads only `latest` and the steps'
`kubetron.json` (and checks that Megatron's metadata files exist); imports no torch, so it runs
anywhere the `kubetron` command does, against a mounted volume.

Exit code: 0 when `latest` points to a complete checkpoint or there is no `latest` (a run
starts from step 0), for every model; 1 when a resume would be refused (`latest` unreadable or
pointing to an incomplete or newer-format save); 2 when DIR is not a directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetron_api.ckpt_meta import (
    LATEST,
    StepStatus,
    describe_shape,
    list_steps,
    model_dirs,
    read_latest,
    step_status,
)
from kubetron_api.exitcodes import ConfigError

SUMMARY = (
    "list a checkpoint directory's steps: complete or not, model, shape (each model's, for a job "
    "of several models)"
)


@dataclass(frozen=True)
class DirReport:
    root: Path
    latest: int | None  # the step `latest` points to
    latest_problem: str | None  # why a resume from `latest` would be refused
    steps: list[StepStatus]

    @property
    def resumable(self) -> bool:
        return self.latest_problem is None


def inspect(root: Path) -> DirReport:
    """Every step under `root` and the state of `latest` (reads JSON files only)."""
    steps = list_steps(root)
    try:
        latest = read_latest(root)
    except ConfigError as err:
        return DirReport(root, None, str(err).removeprefix("config field checkpoint.path: "), steps)
    problem = None
    if latest is not None:
        status = next((s for s in steps if s.step == latest), None) or step_status(root, latest)
        if not status.complete:
            problem = f"points to an incomplete save: {status.problem}"
        elif status.newer_format is not None:
            problem = f"points to a save of a newer kubetron: {status.problem}"
    return DirReport(root, latest, problem, steps)


def _state(s: StepStatus) -> str:
    if s.newer_format is not None:
        return f"newer format {s.newer_format}"
    if not s.complete:
        return "incomplete"
    return "complete (legacy)" if s.legacy else "complete"


def to_text(report: DirReport) -> str:
    lines = [f"checkpoint directory {report.root}"]
    if report.latest_problem is not None:
        target = f"step {report.latest}" if report.latest is not None else "?"
        lines.append(f"{LATEST}: {target}: NOT RESUMABLE, {report.latest_problem}")
    elif report.latest is None:
        lines.append(f"{LATEST}: none (a run starts from step 0)")
    else:
        lines.append(f"{LATEST}: step {report.latest} (a run resumes from it)")
    if not report.steps:
        lines.append("no saved steps (iter_NNNNNNN directories)")
        return "\n".join(lines) + "\n"
    rows = [("STEP", "STATE", "MODEL", "SHAPE", "SAMPLES", "SAVED")]
    for s in report.steps:
        m = s.meta
        rows.append(
            (
                str(s.step) + (" *" if s.step == report.latest else ""),
                _state(s),
                m.model.describe() if m else "?",
                describe_shape(m.shape) if m else "?",
                str(m.consumed_samples) if m else "?",
                m.saved_at if m else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    notes = [f"  step {s.step}: {s.problem}" for s in report.steps if s.problem]
    notes += [
        f"  step {s.step}: no kubetron.json (written before checkpoint format 1); model "
        "and shape unknown"
        for s in report.steps
        if s.legacy
    ]
    if notes:
        lines += ["notes:", *notes]
    return "\n".join(lines) + "\n"


def to_json(report: DirReport) -> dict[str, Any]:
    return {
        "path": str(report.root),
        "latest": report.latest,
        "resumable": report.resumable,
        "latestProblem": report.latest_problem,
        "steps": [
            {
                "step": s.step,
                "path": str(s.path),
                "complete": s.complete,
                "legacy": s.legacy,
                "problem": s.problem,
                "metadata": s.meta.to_json() if s.meta else None,
            }
            for s in report.steps
        ],
    }


def models_to_text(root: Path, reports: dict[str, DirReport]) -> str:
    """Each model's report, indented under its name."""
    lines = [f"checkpoint directory {root}: one directory per trained model"]
    for name, report in reports.items():
        lines += ["", f"model {name}"]
        lines += [f"  {line}" for line in to_text(report).splitlines()]
    return "\n".join(lines) + "\n"


def models_to_json(root: Path, reports: dict[str, DirReport]) -> dict[str, Any]:
    return {
        "path": str(root),
        "resumable": all(r.resumable for r in reports.values()),
        "models": {name: to_json(report) for name, report in reports.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kubetron checkpoints",
        description=SUMMARY,
    )
    p.add_argument("dir", type=Path, help="a job's checkpoint.path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if not args.dir.is_dir():
        print(f"{args.dir} is not a directory", file=sys.stderr)
        return 2
    if models := model_dirs(args.dir):
        reports = {name: inspect(path) for name, path in models.items()}
        doc, text = models_to_json(args.dir, reports), models_to_text(args.dir, reports)
        resumable = all(r.resumable for r in reports.values())
    else:
        report = inspect(args.dir)
        doc, text, resumable = to_json(report), to_text(report), report.resumable
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        sys.stdout.write(text)
    return 0 if resumable else 1


if __name__ == "__main__":
    sys.exit(main())
