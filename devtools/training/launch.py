"""Launch trainer processes for tests/distributed: one `python -m kubetron_trainer` per rank.

The processes get torchrun's variables directly (not torchrun itself) so a test sees every
worker's own exit code and can signal one worker; torchrun reports any worker failure, and a
SIGTERM to itself, as exit code 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devtools.ports import free_port
from kubetron_api.parse import parse_job
from kubetron_operator.plan import plan

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "manifests/examples/gpt-tiny-cpu.yaml"


def example_config(**sections: dict[str, Any]) -> dict[str, Any]:
    """The TrainerConfig JSON the operator renders for the CPU example, with sections merged."""
    obj = yaml.safe_load(EXAMPLE.read_text())
    cfg = plan(parse_job(obj, str(EXAMPLE))).trainer_config.model_dump(mode="json", by_alias=True)
    cfg["metrics"]["port"] = free_port()
    for name, values in sections.items():
        if isinstance(cfg.get(name), dict):
            cfg[name].update(values)
        else:
            cfg[name] = values
    return cfg


@dataclass
class Launch:
    procs: list[subprocess.Popen[str]]
    logs: list[Path]
    summary: Path

    def wait(self, timeout: float = 600) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(max(deadline - time.monotonic(), 1)))
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    q.kill()
                raise AssertionError(f"trainer hung; logs:\n{self.output()[-4000:]}") from None
        return codes

    def output(self) -> str:
        return "\n".join(log.read_text() for log in self.logs if log.exists())

    def result(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text())


def launch(
    cfg: dict[str, Any],
    workdir: Path,
    *args: str,
    groups: str = "decentralized",
    extra_env: dict[str, str | None] | None = None,
) -> Launch:
    """Start `cfg["worldSize"]` trainer processes on this host (gloo, one thread each);
    `extra_env` adds variables, or with None removes them."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.json"
    config.write_text(json.dumps(cfg))
    world, port = cfg["worldSize"], free_port()
    summary = workdir / "summary.json"
    env = dict(os.environ)
    paths = [str(ROOT / "trainer"), str(ROOT / "operator"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env |= {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env |= {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(workdir / "metrics")
    for name, value in (extra_env or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    procs, logs = [], []
    for rank in range(world):
        log = workdir / f"rank{rank}.log"
        cmd = [sys.executable, "-m", "kubetron_trainer", "--config", str(config)]
        cmd += ["--summary", str(summary), "--groups", groups, *args]
        with open(log, "w") as out:
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        logs.append(log)
    return Launch(procs, logs, summary)


def run(cfg: dict[str, Any], workdir: Path, *args: str, groups: str = "decentralized") -> Launch:
    """Launch, wait, and require every rank to exit 0."""
    started = launch(cfg, workdir, *args, groups=groups)
    codes = started.wait()
    assert codes == [0] * len(codes), f"exit codes {codes}:\n{started.output()[-6000:]}"
    return started


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def wait_for_line(started: Launch, needle: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in started.logs[0].read_text():
            return
        if any(p.poll() not in (None, 0) for p in started.procs):
            break
        time.sleep(0.2)
    raise AssertionError(f"never saw {needle!r}:\n{started.output()[-4000:]}")
