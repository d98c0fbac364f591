"""Exit codes the PyTorchJob `restartPolicy: ExitCode` acts on, and the errors that map to them.

The Kubeflow training-operator restarts a pod whose container exits with 128 or more and fails
the job for 1-127. So a trainer that cannot ever succeed with its config (a bad field, a shape
that does not fit, an out-of-memory) must exit below 128, and one that failed for a reason a
restart can fix (preemption, a lost peer or a collective timeout) must exit at 128 or above,
after saving a checkpoint when it can.

The codes are the contract: the trainer exits with them
(`kubetron_trainer.runtime.failures` maps its exceptions to them) and the operator reads
them from the pod status.
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
