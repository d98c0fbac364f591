"""Which exit code ends the trainer: its exceptions mapped onto the contract's `ExitCode`."""

from __future__ import annotations

import torch
import torch.distributed as dist

from kubetron_api.dims import ParallelConfigError
from kubetron_api.exitcodes import ConfigError, ExitCode, Terminated
from kubetron_trainer.runtime.topology import TopologyError

# Messages of collective failures that torch raises as a plain RuntimeError (gloo, some NCCL).
_COMM_MARKERS = ("timed out", "connection closed", "connection reset", "nccl error", "gloo")
# CUDA's and NVML's words for a GPU that failed in hardware: the node's fault, not the job's.
_GPU_FAULT_MARKERS = ("uncorrectable ecc", "fallen off the bus", "gpu is lost")


def classify(err: BaseException) -> ExitCode:
    """The exit code for an exception that ended training."""
    if isinstance(err, Terminated):
        return ExitCode.SIGTERM
    if isinstance(err, ConfigError | ParallelConfigError):
        return ExitCode.CONFIG
    if isinstance(err, TopologyError):
        return ExitCode.ENVIRONMENT
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return ExitCode.OUT_OF_MEMORY
    if isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _GPU_FAULT_MARKERS):
        return ExitCode.GPU_FAULT  # before the collectives: NCCL reports it as its own error
    if isinstance(err, dist.DistError | TimeoutError | ConnectionError):
        return ExitCode.COMMUNICATION
    if isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _COMM_MARKERS):
        return ExitCode.COMMUNICATION
    return ExitCode.ERROR
