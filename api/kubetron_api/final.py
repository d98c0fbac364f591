"""The trainer's exit report: the run's final numbers, handed to the operator as the container's
termination message.

While a job runs the operator polls rank 0's metrics endpoint, and the last poll before the pods
end is late by up to a poll period. When training completes, global rank 0 records this report
with its exit code; the pod command (`kubetron_trainer.launch`) writes it to the termination log
of its pod, Kubernetes keeps it in `state.terminated.message` (at most
`TERMINATION_MESSAGE_LIMIT` bytes), and the operator reads it back into `status.progress`.
Only a container that exited 0 carries it: a failed one's message stays the error's text, which
the operator shows in the job's conditions. Torch-free, like the rest of the contract.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

# What Kubernetes keeps of a container's termination message.
TERMINATION_MESSAGE_LIMIT = 4096


class _Wire(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


class FinalProgress(_Wire):
    """Where the run ended: the last step trained and its numbers."""

    step: int = Field(ge=0, description="The last optimizer step trained.")
    loss: float | None = Field(default=None, description="The loss of that step.")
    validation_loss: float | None = Field(
        default=None, description="The last evaluation's loss (recipe.eval), if it evaluated."
    )
    tokens_per_second: float | None = Field(
        default=None, description="Throughput over the run's steps, whole job."
    )
    checkpoint_step: int | None = Field(
        default=None, ge=0, description="The step of the last complete checkpoint, if any."
    )

    @field_validator("loss", "validation_loss", "tokens_per_second")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        """JSON has no NaN: a number that is not finite is reported as absent."""
        return value if value is not None and math.isfinite(value) else None


class ExitReport(_Wire):
    """The termination message of the container that ran global rank 0, after a completed run."""

    final: FinalProgress

    def to_message(self) -> str:
        """Compact JSON, camelCase; within what Kubernetes keeps (ValueError otherwise)."""
        text = self.model_dump_json(by_alias=True, exclude_none=True)
        if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
            raise ValueError(f"the exit report is over {TERMINATION_MESSAGE_LIMIT} bytes")
        return text

    @classmethod
    def from_message(cls, text: str) -> ExitReport:
        """The report a termination message holds; ValueError saying why it holds none."""
        if not text.strip():
            raise ValueError("the termination message is empty")
        return cls.model_validate_json(text)  # pydantic's ValidationError is a ValueError
