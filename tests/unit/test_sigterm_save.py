"""Which SIGTERM boundaries save: never a step this run already saved or resumed from."""

from __future__ import annotations

import pytest

from kubetron_trainer.runtime.loop import sigterm_needs_save


@pytest.mark.parametrize(
    ("step", "start", "resumed", "interval", "needed"),
    [
        (3, 0, False, 2, True),  # between saves: save it
        (4, 0, False, 2, False),  # saved on schedule (perhaps still in the background)
        (10, 10, True, 4, False),  # the checkpoint this run resumed from
        (10, 10, True, 5, False),
        (0, 0, False, 2, True),  # a fresh run stopped before its first step (as before)
        (11, 10, True, 5, True),
    ],
)
def test_sigterm_needs_save(
    step: int, start: int, resumed: bool, interval: int, needed: bool
) -> None:
    assert sigterm_needs_save(step, start, resumed, interval) is needed
