"""Waiting and probing helpers of the dev cluster: poll until ready, GET a health endpoint.

Startup polls readiness and never sleeps blindly; every wait names what it waited for, so a
timeout says which component did not come up.
"""

from __future__ import annotations

import ssl
import time
import urllib.request
from collections.abc import Callable
from typing import Any


class ClusterError(RuntimeError):
    """The control plane failed to start, stopped unexpectedly, or a wait timed out."""


def wait_until[T](
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    check: Callable[[], None] | None = None,
) -> T:
    """Poll `predicate` until it returns a truthy value (returned) or `timeout` seconds pass.

    Exceptions from the predicate count as "not yet"; the last one is reported on timeout.
    `check` runs before each poll and may raise to abort early (e.g. a process died).
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        if check is not None:
            check()
        try:
            result = predicate()
            if result:
                return result
        except Exception as err:  # the thing polled is not up yet
            last_error = err
        if time.monotonic() >= deadline:
            detail = f": last error: {last_error!r}" if last_error else ""
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def http_get(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> str:
    """GET `url`; return the body on HTTP 200, raise otherwise."""
    with urllib.request.urlopen(url, context=context, timeout=timeout) as resp:
        return str(resp.read().decode())


def healthz_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    """True when a health endpoint answers 200 "ok"."""
    return http_get(url, context) == "ok"


def insecure_tls() -> ssl.SSLContext:
    """For health endpoints served with self-signed certificates."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def crd_established(crd: dict[str, Any] | None) -> bool:
    """True when a CustomResourceDefinition (as a dict) has condition Established=True."""
    conditions = (crd or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)
