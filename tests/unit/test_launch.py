"""The pod launcher's exit code: what the PyTorchJob ExitCode policy sees."""

from __future__ import annotations

import pytest

from kubetron_trainer.launch import pod_exit_code


@pytest.mark.parametrize(
    ("torchrun", "workers", "signalled", "expected"),
    [
        (0, [0, 0], False, 0),
        (1, [143, 143, 143, 143], True, 143),  # preempted: saved, retryable
        (1, [2, 2], False, 2),  # bad config: permanent
        (1, [2, 134, 134], False, 2),  # the root cause wins over peers that lost it
        (1, [0, 134], False, 134),  # a collective timed out
        (1, [], False, 134),  # a worker died without recording (signal, watchdog abort)
        (-15, [], True, 143),  # torchrun itself terminated before workers recorded
    ],
)
def test_pod_exit_code(torchrun: int, workers: list[int], signalled: bool, expected: int) -> None:
    assert pod_exit_code(torchrun, workers, signalled) == expected
