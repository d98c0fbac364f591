"""The dev cluster's processes: start one with its log, recognise it again after `up`, stop it.

A component is identified by its pid and start time, so `down` (another Python process) never
signals a process that merely reused a pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.cluster.waiting import ClusterError, wait_until


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child when the Python process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def proc_start_time(pid: int) -> str | None:
    """Start time of `pid` in clock ticks (field 22 of /proc/<pid>/stat); None if gone/zombie.

    With the pid it identifies a process across `up` and `down`, so `down` never signals a
    process that merely reused a pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in ("Z", "X") else fields[19]


@dataclass
class Component:
    """One started process: argv, log file, and its pid/start time for a later `down`."""

    name: str
    argv: list[str]
    log: Path
    pid: int = 0
    start_time: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def start(self, env: dict[str, str] | None, detached: bool) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=None if detached else _die_with_parent,
            )
        self.pid = self.proc.pid
        self.start_time = proc_start_time(self.pid)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.start_time is not None and proc_start_time(self.pid) == self.start_time

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. Only ever signals our own process."""
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        with contextlib.suppress(ClusterError):
            wait_until(lambda: not self.alive(), timeout=grace, what=f"{self.name} to exit")
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            wait_until(lambda: not self.alive(), timeout=5, what=f"{self.name} to die")
        if self.proc is not None:
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL at once (a fault, not a stop) and reap it."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def to_state(self) -> dict[str, Any]:
        return {"name": self.name, "argv": self.argv, "log": str(self.log), "pid": self.pid,
                "start_time": self.start_time}  # fmt: skip

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Component:
        return cls(data["name"], data["argv"], Path(data["log"]), data["pid"], data["start_time"])


# --------------------------------------------------------------------------- the cluster
