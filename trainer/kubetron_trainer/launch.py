"""The pod's entry point: run torchrun, then exit with the workers' own exit code.

torchrun exits 1 whenever any worker fails and also when it is sent SIGTERM itself, so as the
container's main process it would turn a preemption (a retryable 143) into a permanent failure
under the PyTorchJob's `ExitCode` restart policy. This launcher gives each worker a directory
to record its code in (`KUBETRON_EXIT_CODE_DIR`), forwards SIGTERM/SIGINT to the workers
themselves (torchrun would kill them 30 s after passing it on, cutting a checkpoint short), and
exits with the code that describes the pod: a permanent worker error wins (the same config
would fail again), then the largest retryable code. Torch-free: it only starts processes.

In a kubetron pod it also gives torchrun the pod's node rank: the operator renders every pod
from one template, with the pod's replica index (`KUBETRON_REPLICA_INDEX`, from the
training-operator's label) and the node rank of every index (`KUBETRON_NODE_RANKS`, which puts
each model-parallel group on consecutive pods for Kueue's topology slices), and the launcher sets
`PET_NODE_RANK` from the two.

    python -m kubetron_trainer.launch [torchrun arguments] -m kubetron_trainer --config FILE
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kubetron_api.exitcodes import ExitCode
from kubetron_api.wire import NODE_RANKS_ENV, REPLICA_INDEX_ENV

log = logging.getLogger("kubetron.launch")

# A worker that died without recording a code was killed by a signal (NCCL's watchdog abort,
# the kernel): a restart may well succeed, and backoffLimit bounds the retries.
LOST_WORKER_CODE = ExitCode.COMMUNICATION


def pod_exit_code(torchrun_code: int, worker_codes: Sequence[int], signalled: bool) -> int:
    """The pod's exit code from torchrun's code and the codes the workers recorded."""
    permanent = [c for c in worker_codes if 0 < c < 128]
    if permanent:
        return max(permanent)
    retryable = [c for c in worker_codes if c >= 128]
    if retryable:
        return max(retryable)
    if torchrun_code == 0:
        return 0
    return int(ExitCode.SIGTERM if signalled else LOST_WORKER_CODE)


class LaunchError(ValueError):
    """The pod's environment cannot give torchrun a node rank."""


def node_rank(env: dict[str, str]) -> str | None:
    """PET_NODE_RANK for torchrun: the node rank `KUBETRON_NODE_RANKS` gives this pod's
    `KUBETRON_REPLICA_INDEX`; None when the launcher runs outside a kubetron pod (no index)."""
    index = env.get(REPLICA_INDEX_ENV, "").strip()
    if not index:
        return None
    ranks = [r.strip() for r in env.get(NODE_RANKS_ENV, "").split(",") if r.strip()]
    if not index.isdigit():
        raise LaunchError(f"{REPLICA_INDEX_ENV}={index!r} is not a pod index (the "
                          "training.kubeflow.org/replica-index label of the pod)")  # fmt: skip
    if (
        not ranks
        or not all(r.isdigit() for r in ranks)
        or sorted(map(int, ranks)) != list(range(len(ranks)))
    ):
        raise LaunchError(f"{NODE_RANKS_ENV}={env.get(NODE_RANKS_ENV, '')!r} is not an order of "
                          "node ranks 0..nodes-1; the operator renders it")  # fmt: skip
    if int(index) >= len(ranks):
        raise LaunchError(
            f"{REPLICA_INDEX_ENV}={index} but {NODE_RANKS_ENV} has {len(ranks)} pods: the "
            "PyTorchJob has more workers than the MegatronJob's nodes"
        )
    return ranks[int(index)]


# Kubernetes reads a container's termination message from here (terminationMessagePath) and
# shows it in the pod status, where the operator picks it up; at most 4096 bytes are kept.
TERMINATION_LOG = Path("/dev/termination-log")
MESSAGE_LIMIT = 1024


def read_worker_codes(directory: Path) -> list[tuple[int, str]]:
    """(code, message) of every worker that recorded one, by rank. A failure's message names
    its rank; a success's (global rank 0's exit report, `kubetron_api.final`) is passed on
    as written, for the operator to parse."""
    codes: list[tuple[int, str]] = []
    for path in sorted(directory.glob("rank-*"), key=lambda p: int(p.name.split("-")[1])):
        first, _, message = path.read_text().partition("\n")
        if first.strip().lstrip("-").isdigit():
            code, text = int(first), message.strip()
            codes.append((code, f"{path.name}: {text}" if text and code != 0 else text))
    return codes


def termination_message(code: int, workers: Sequence[tuple[int, str]]) -> str:
    """The message of the first worker that exited with the pod's code: the root cause of a
    failure (cut to MESSAGE_LIMIT), or the exit report of a success (whole, bounded by
    `ExitReport.to_message`: a cut one would not parse)."""
    for worker_code, message in workers:
        if worker_code == code and message:
            return message if code == 0 else message[:MESSAGE_LIMIT]
    return ""


def write_termination_message(message: str, path: Path = TERMINATION_LOG) -> None:
    """Best effort: outside Kubernetes the file does not exist, and that is fine."""
    if message and path.exists():
        with contextlib.suppress(OSError):
            path.write_text(message)


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (torchrun's workers), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        rank = node_rank(dict(os.environ))
    except LaunchError as err:
        log.error("%s", err)
        write_termination_message(str(err)[:MESSAGE_LIMIT])
        return int(ExitCode.ENVIRONMENT)  # the same pod would fail again
    with tempfile.TemporaryDirectory(prefix="kubetron-exit-") as codes_dir:
        env = {**os.environ, "KUBETRON_EXIT_CODE_DIR": codes_dir}
        if rank is not None:
            env["PET_NODE_RANK"] = rank
            log.info("pod %s of %s: node rank %s", env[REPLICA_INDEX_ENV],
                     env[NODE_RANKS_ENV], rank)  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=env)
        signalled = False

        def forward(signum: int, _frame: object) -> None:
            nonlocal signalled
            signalled = True
            # To the trainers themselves, not to torchrun: torchrun would pass the signal on
            # and SIGKILL them 30 s later, mid-checkpoint. They save, exit 143, and torchrun
            # follows; the pod's terminationGracePeriodSeconds bounds the whole.
            workers = children(proc.pid)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            if not workers:  # not started yet: torchrun stops what it is starting
                proc.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        torchrun_code = proc.wait()
        workers = read_worker_codes(Path(codes_dir))
    codes = [c for c, _ in workers]
    code = pod_exit_code(torchrun_code, codes, signalled)
    if code != torchrun_code:
        log.info("torchrun exited %d, workers %s: exiting %d", torchrun_code, codes, code)
    write_termination_message(termination_message(code, workers))
    return code


if __name__ == "__main__":
    sys.exit(main())
