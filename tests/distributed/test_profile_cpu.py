"""`--profile-steps` on the CPU example (4 processes, TP2 x DP2): each rank profiles the asked
steps and writes its report (no GPU kernels here: the plumbing, not the numbers; the GPU
profile is benchmarks/profile_8b.py's)."""

from __future__ import annotations

import json
from pathlib import Path

from devtools.training.launch import example_config, run


def test_profile_steps_writes_one_report_per_rank(tmp_path: Path) -> None:
    cfg = example_config(recipe={"trainIters": 5, "logInterval": 1}, metrics={"enabled": False})
    cfg["checkpoint"]["path"] = None  # the example's path may hold another run's checkpoints
    out = tmp_path / "prof"
    started = run(cfg, tmp_path / "run", "--profile-steps", "2:2", "--profile-out", str(out))
    assert len(started.result()["steps"]) == 5
    reports = sorted(out.glob("profile_rank*.json"))
    assert [p.name for p in reports] == [f"profile_rank{r}.json" for r in range(4)]
    first = json.loads(reports[0].read_text())
    assert first["steps"] == [3, 4]
    assert (first["tp"], first["dp"], first["pp"]) == (2, 2, 1)
    assert len(first["step_s"]) == 2
    assert first["wall_ms_per_step"] > 0
