"""The pod launcher's exit code: what the PyTorchJob ExitCode policy sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetron_trainer.launch import (
    LaunchError,
    node_rank,
    pod_exit_code,
    read_worker_codes,
    termination_message,
    write_termination_message,
)


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


def test_termination_message_is_the_root_cause_workers_error(tmp_path: Path) -> None:
    codes = tmp_path / "codes"
    codes.mkdir()
    (codes / "rank-10").write_text("134\ngloo: connection closed by peer")
    (codes / "rank-2").write_text("2\nconfig field data.paths[0].prefix: /d.bin does not exist")
    (codes / "rank-3").write_text("2\nconfig field data.paths[0].prefix: /d.bin does not exist")
    (codes / "rank-0").write_text("0\n")
    workers = read_worker_codes(codes)
    assert [c for c, _ in workers] == [0, 2, 2, 134]  # by rank number, not by name
    code = pod_exit_code(1, [c for c, _ in workers], signalled=False)
    message = termination_message(code, workers)
    assert message == "rank-2: config field data.paths[0].prefix: /d.bin does not exist"

    log = tmp_path / "termination-log"
    write_termination_message(message, log)
    assert not log.exists()  # only where Kubernetes provides the file
    log.write_text("")
    write_termination_message(message, log)
    assert log.read_text() == message


def test_old_style_code_files_without_a_message_still_count(tmp_path: Path) -> None:
    (tmp_path / "rank-0").write_text("143\n")
    assert read_worker_codes(tmp_path) == [(143, "")]
    assert termination_message(143, [(143, "")]) == ""


def test_node_rank_is_the_operators_order_at_the_pods_replica_index() -> None:
    order = {"KUBETRON_NODE_RANKS": "0,2,1,3"}
    assert [node_rank({**order, "KUBETRON_REPLICA_INDEX": str(i)}) for i in range(4)] == [
        "0", "2", "1", "3"
    ]  # fmt: skip
    assert node_rank({}) is None  # outside a kubetron pod: torchrun's own flags and env


@pytest.mark.parametrize(
    ("index", "ranks", "says"),
    [
        ("x", "0,1", "KUBETRON_REPLICA_INDEX='x' is not a pod index"),
        ("0", "", "KUBETRON_NODE_RANKS='' is not an order of node ranks"),
        ("0", "0,2", "KUBETRON_NODE_RANKS='0,2' is not an order of node ranks"),
        ("2", "0,1", "KUBETRON_REPLICA_INDEX=2 but KUBETRON_NODE_RANKS has 2 pods"),
    ],
)
def test_a_bad_pod_environment_is_named(index: str, ranks: str, says: str) -> None:
    with pytest.raises(LaunchError, match=says):
        node_rank({"KUBETRON_REPLICA_INDEX": index, "KUBETRON_NODE_RANKS": ranks})
