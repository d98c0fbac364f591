"""Loopback ports for test components come from outside the kernel's ephemeral range."""

from __future__ import annotations

import socket

from devtools.ports import candidate_ports, ephemeral_range, free_port


def test_candidates_avoid_the_ephemeral_range() -> None:
    low, high = ephemeral_range()
    candidates = candidate_ports()
    assert low <= high
    assert candidates.stop <= low or candidates.start > high
    assert len(candidates) >= 1000


def test_ports_are_distinct_bindable_and_not_ephemeral() -> None:
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert not low <= port <= high
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
