"""Exit codes of the trainer, what each means to a restart, and the errors that map to them.

The operator renders pods with `restartPolicy: Never` and decides restarts itself, the way the
Kubeflow training-operator's `ExitCode` policy reads codes: a container that exits with 1-127
failed for good (a bad field, a shape that does not fit, an out-of-memory: the job fails), one
that exits with 128 or more failed for a reason a restart of the whole group can fix
(preemption, a lost peer or a collective timeout), after saving a checkpoint when it can.

The operator reads more than the code (`FailureCause`): a container the kernel OOM-killed at
its memory limit exits 137 like any SIGKILL, but its reason `OOMKilled` says a restart would
repeat it, so the job fails; `COMMUNICATION` is the cause `CollectiveTimeout` (retryable);
`GPU_FAULT` is `GPUFault`: retryable, on another node (the next attempts avoid this one).

The codes are the contract: the trainer exits with them
(`kubetron_trainer.runtime.failures` maps its exceptions to them) and the operator reads
them from the pod status (`kubetron_operator.lifecycle`).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1  # an unexpected exception: a bug, not fixed by restarting
    CONFIG = 2  # the config file, a field in it, or the shape it asks for is invalid
    ENVIRONMENT = 3  # the rank environment (torchrun's variables) contradicts itself
    OUT_OF_MEMORY = 4  # the same shape would run out of memory again
    COMMUNICATION = 134  # a collective timed out or a peer vanished (also NCCL's watchdog abort)
    GPU_FAULT = 135  # the GPU itself failed (uncorrectable ECC, off the bus): 128 + SIGBUS
    SIGTERM = 143  # preempted or deleted: saved a checkpoint, then exited (128 + SIGTERM)

    @property
    def retryable(self) -> bool:
        return retryable(self)


def retryable(code: int) -> bool:
    """Whether a restart can fix what made a trainer exit with `code` (128 + a signal, or
    kubetron's retryable codes); 1-127 are permanent."""
    return code >= 128


class ConfigError(ValueError):
    """An invalid config field; the message names the field and the fix."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"config field {field}: {message}")


class Terminated(Exception):
    """SIGTERM arrived; raised at a step boundary after the checkpoint was written."""
