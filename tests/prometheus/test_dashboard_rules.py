"""The dashboard's trainer queries on a 2-pod job, evaluated by Prometheus's own engine
(`promtool test rules`, Debian's prometheus package, as tests/prometheus installs it).

Each pod's endpoint aggregates only its own ranks: `kubetron_train_tokens_total` is that pod's
share of the tokens (so the job's total is the sum over pods), while the job-wide gauges hold
the same job-wide value wherever they are exported (here only the master pod has them). A
panel that takes `max` of the counter shows half the tokens of a 2-pod job; this test fails on
it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.cluster import REPO_ROOT

DASHBOARD = REPO_ROOT / "charts" / "kubetron" / "files" / "dashboards" / "kubetron.json"


def panel_queries() -> dict[str, str]:
    """Panel title -> its first query, with the dashboard variables matching everything."""
    out: dict[str, str] = {}

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            targets = panel.get("targets") or []
            if targets and panel.get("title") not in out:
                expr = targets[0]["expr"]
                out[panel["title"]] = expr.replace("$namespace", ".*").replace("$job", ".*")

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def _series(name: str, pod: str, values: str) -> dict[str, str]:
    labels = f'namespace="ml", pod="{pod}", job="llama"'
    return {"series": f"{name}{{{labels}}}", "values": values}


def test_dashboard_totals_a_two_pod_job(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing: hack/install-prometheus.sh installs Debian's prometheus")
    queries = panel_queries()
    pods = ("llama-master-0", "llama-worker-0")
    series = [
        # 8 ranks per pod, 4096 tokens a step each: a pod adds 32768 tokens a step.
        *(_series("kubetron_train_tokens_total", pod, "0+32768x10") for pod in pods),
        # job-wide gauges, written by global rank 0 (in the master pod) only
        _series("kubetron_train_tokens_per_second", pods[0], "65536x10"),
        _series("kubetron_train_step", pods[0], "0+1x10"),
    ]
    expected = {
        "Tokens trained": 10 * 2 * 32768,
        "Throughput": 65536,
        "Step": 10,
    }
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"panel:{i}", "expr": queries[title]} for i, title in enumerate(expected)
    ]}]}  # fmt: skip
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                {"expr": f"panel:{i}", "eval_time": "10m",
                 "exp_samples": [{"labels": f'panel:{i}{{job="llama"}}', "value": value}]}
                for i, value in enumerate(expected.values())
            ],
        }],
    }  # fmt: skip
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    proc = subprocess.run([promtool, "test", "rules", "test.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, f"{dict(enumerate(expected))}\n{proc.stdout}{proc.stderr}"
