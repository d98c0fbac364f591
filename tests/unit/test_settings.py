"""Operator settings: flags override env, env overrides defaults, bad values are refused."""

from __future__ import annotations

import pytest

from kubetron_operator.settings import parse_settings


def test_defaults() -> None:
    s = parse_settings([], env={})
    assert (s.leader_elect, s.metrics_port, s.health_port, s.all_namespaces) == (
        True,
        8080,
        8081,
        True,
    )


def test_env_then_flags() -> None:
    env = {"KUBETRON_NAMESPACES": "a, b", "KUBETRON_LEADER_ELECT": "false", "POD_NAME": "op-1"}
    s = parse_settings([], env=env)
    assert (s.namespaces, s.leader_elect, s.identity) == (("a", "b"), False, "op-1")
    s = parse_settings(["--namespaces", "c", "--leader-elect", "--metrics-port", "9999"], env=env)
    assert (s.namespaces, s.leader_elect, s.metrics_port) == (("c",), True, 9999)


def test_inconsistent_lease_timing_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--lease-duration", "5", "--renew-deadline", "10"], env={})
    assert "--renew-deadline must be shorter than --lease-duration" in capsys.readouterr().err


def test_bad_boolean_env_is_refused() -> None:
    with pytest.raises(Exception, match="expected true or false"):
        parse_settings([], env={"KUBETRON_LEADER_ELECT": "maybe"})
