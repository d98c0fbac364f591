"""Exit codes the PyTorchJob `restartPolicy: ExitCode` acts on, and the errors that map to them.

The Kubeflow training-operator restarts a pod whose container exits with 128 or more and fails
the job for 1-127. So a trainer that cannot ever succeed with its config (a bad field, a shape
that does not fit, an out-of-memory) must exit below 128, and one that failed for a reason a
restart can fix (preemption, a lost peer or a collective timeout) must exit at 128 or above,
after saving a checkpoint when it can.

Torch-free at import (torch is imported inside `classify`), so torch-free tools such as
`ckpt_meta` and the `kubetron` CLI can raise `ConfigError`.
"""

from __future__ import annotations

import enum

# Messages of collective failures that torch raises as a plain RuntimeError (gloo, some NCCL).
_COMM_MARKERS = ("timed out", "connection closed", "connection reset", "nccl error", "gloo")


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
        return self >= 128


class ConfigError(ValueError):
    """An invalid config field; the message names the field and the fix."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"config field {field}: {message}")


class Terminated(Exception):
    """SIGTERM arrived; raised at a step boundary after the checkpoint was written."""


def classify(err: BaseException) -> ExitCode:
    """The exit code for an exception that ended training."""
    import torch
    import torch.distributed as dist

    from kubetron_trainer.dims import ParallelConfigError
    from kubetron_trainer.topology import TopologyError

    if isinstance(err, Terminated):
        return ExitCode.SIGTERM
    if isinstance(err, ConfigError | ParallelConfigError):
        return ExitCode.CONFIG
    if isinstance(err, TopologyError):
        return ExitCode.ENVIRONMENT
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return ExitCode.OUT_OF_MEMORY
    if isinstance(err, dist.DistError | TimeoutError | ConnectionError):
        return ExitCode.COMMUNICATION
    if isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _COMM_MARKERS):
        return ExitCode.COMMUNICATION
    return ExitCode.ERROR
