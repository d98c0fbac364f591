"""Free loopback ports for test processes.

A port taken from the kernel with `bind(0)` comes from the ephemeral range, which is also where
the kernel picks the source port of every outgoing connection. Between picking such a port and
the component binding it, any client connection (an etcd health probe, a pytest run beside this
one) may take it, and the component then exits with "address already in use". Picking below the
ephemeral range avoids that race: only another listener could take the port.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000
_rng = random.SystemRandom()  # independent of the seeds tests set on `random`
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing source ports (Linux default 32768-60999)."""
    try:
        low, high = (int(v) for v in _PORT_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def candidate_ports() -> range:
    """Ports outside the ephemeral range: below it when there is room, else above it."""
    low, high = ephemeral_range()
    if low - _LOWEST >= 1000:
        return range(_LOWEST, low)
    return range(high + 1, 65536)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, outside the ephemeral range, and not handed
    out before by this process."""
    candidates = candidate_ports()
    for _ in range(500):
        port = _rng.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {candidates.start}-{candidates.stop - 1}")
