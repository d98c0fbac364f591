"""goodput.py: the time lost to failed attempts and the share of wall time that trained,
worked by hand on one job's timeline."""

from __future__ import annotations

from kubetron_operator.goodput import at_restart, at_status, checkpointed_at, lost_seconds, ratio


def t(minutes: int) -> str:
    return f"2026-01-01T{minutes // 60:02d}:{minutes % 60:02d}:00Z"


def test_a_failed_attempt_loses_from_its_last_checkpoint_to_the_next_run() -> None:
    # attempt 1 runs at 0:00; no time is lost yet
    gp = at_status(None, t(0), t(10), refresh=False)
    assert gp == {"since": t(0), "lostSeconds": 0, "ratio": "1.000"}
    # it saved at 0:20 and failed at 0:30: the loss opens at the checkpoint
    old = {"goodput": gp, "runningSince": t(0), "progress": {"checkpointedAt": t(20)}}
    gp = at_restart(old, t(30))
    assert gp == {"since": t(0), "lostSeconds": 0, "lostSince": t(20), "ratio": "0.667"}
    assert gp is not None and lost_seconds(gp, t(30)) == 600  # 1200 of 1800 s trained
    # attempt 2's pods wait (no runningSince): the loss stays open
    assert at_status(gp, None, t(33), refresh=True) == {**gp, "ratio": "0.606"}  # 1200 / 1980
    assert at_status(gp, None, t(33), refresh=False) == gp  # no reading: the ratio stays
    # attempt 2 runs at 0:35: 15 min lost (0:20 -> 0:35); at 0:40, 1500 of 2400 s trained
    gp = at_status(gp, t(35), t(40), refresh=False)  # the loss closes: recomputed
    # (lostSince None: the status is a merge patch, and None removes the key)
    assert gp == {"since": t(0), "lostSeconds": 900, "lostSince": None, "ratio": "0.625"}
    assert gp is not None and ratio(gp, t(40)) == 1500 / 2400


def test_an_attempt_that_saved_nothing_loses_all_it_ran_and_one_that_never_ran_extends() -> None:
    gp = {"since": t(0), "lostSeconds": 900}
    # attempt 2 ran at 0:35 and resumed from the checkpoint read at 0:20: nothing saved since
    old = {"goodput": gp, "runningSince": t(35), "progress": {"checkpointedAt": t(20)}}
    gp2 = at_restart(old, t(50))
    assert gp2 is not None and gp2["lostSince"] == t(35)
    # attempt 3 fails before it runs: the same loss goes on
    assert at_restart({"goodput": gp2}, t(55)) == {**gp2, "ratio": f"{(3300 - 2100) / 3300:.3f}"}
    # nothing ran yet: nothing to lose
    assert at_restart({"runningSince": None}, t(5)) is None
    assert at_status(None, None, t(5), refresh=True) is None


def test_checkpointed_at_moves_only_with_the_checkpoint_step() -> None:
    old = {"lastCheckpointStep": 100, "checkpointedAt": t(20)}
    assert checkpointed_at(old, {"lastCheckpointStep": 100}, t(40)) == t(20)
    assert checkpointed_at(old, {"lastCheckpointStep": 200}, t(40)) == t(40)
    assert checkpointed_at(None, {"lastCheckpointStep": 100}, t(40)) == t(40)
    assert checkpointed_at(old, {"step": 5}, t(40)) is None
