"""The real node's host setup turns IPv4 forwarding on and its teardown puts back the host's
own value (devtools/cluster/host.py), through files standing in for the sysctl."""

from __future__ import annotations

from pathlib import Path

from devtools.cluster.host import forwarding_on, forwarding_restored


def test_teardown_restores_the_hosts_forwarding_value(tmp_path: Path) -> None:
    sysctl, saved = tmp_path / "ip_forward", tmp_path / "saved"
    sysctl.write_text("0\n")
    forwarding_on(sysctl, saved)
    assert sysctl.read_text() == "1\n"
    forwarding_on(sysctl, saved)  # a setup after an interrupted one keeps the host's value
    forwarding_restored(sysctl, saved)
    assert sysctl.read_text() == "0\n" and not saved.exists()
    forwarding_restored(sysctl, saved)  # nothing set up: nothing changed
    assert sysctl.read_text() == "0\n"
