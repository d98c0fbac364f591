"""What a job reports about its training beside the checkpoints: Prometheus metrics served by
each pod (`metrics`) and TensorBoard event files written to a volume (`observability`)."""

from __future__ import annotations

from pydantic import Field

from kubetron_api.base import ApiModel


class MetricsSpec(ApiModel):
    """Prometheus metrics served by each trainer pod."""

    enabled: bool = Field(default=True, description="Serve /metrics from local rank 0.")
    port: int = Field(default=9400, ge=1024, le=65535, description="Metrics port (named metrics).")


class TensorBoardSpec(ApiModel):
    """TensorBoard event files of the run, written by global rank 0."""

    path: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^/",
        description="Directory of the event files, on a volume the pods mount (under "
        "spec.checkpoint.path with spec.checkpoint.volume, or under a mountPath of "
        "spec.resources.volumeMounts): every step's loss, learning rate, gradient norm, "
        "throughput and the recipe's numbers, the validation loss and the attempt. A restart "
        "appends to the same directory, its steps continuing from the checkpoint's.",
    )


class ObservabilitySpec(ApiModel):
    """Records of the run kept beside the checkpoints (opt-in)."""

    tensorboard: TensorBoardSpec | None = Field(
        default=None, description="Write TensorBoard event files; unset writes none."
    )
