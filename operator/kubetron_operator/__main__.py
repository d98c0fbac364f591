"""`kubetron-operator` / `python -m kubetron_operator`: the operator process.

Starts the metrics and health endpoints, waits for the Lease when leader election is on, then
runs kopf until a signal or the loss of leadership. A replica that loses the lease stops kopf at
once and exits 1, so its Deployment restarts it as a standby (what controller-runtime does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

import kopf
from kopf._core.engines.peering import Identity

from kubetron_operator.controller import Controller
from kubetron_operator.handlers import make_registry
from kubetron_operator.kube import Kube, load_api_client
from kubetron_operator.leader import LeaderElector, LeaseConfig, LeaseNamespaceMissing
from kubetron_operator.metrics import Health, OperatorMetrics, health_routes, metrics_routes, serve
from kubetron_operator.settings import Settings, parse_settings

log = logging.getLogger("kubetron.operator")
EXIT_CONFIG = 2  # a setting is wrong (like argparse's usage errors); restarting will not help


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": self.formatTime(record),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    level = logging.getLevelName(settings.log_level)
    logging.getLogger("kopf").setLevel(max(logging.INFO, level))
    # one line per handled watch event is noise; kubetron logs what it does itself
    logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, level))


def run(settings: Settings) -> int:
    """Run until stopped; 0 on a signal, 1 when leadership was lost, 2 on a wrong setting."""
    if settings.kubeconfig:
        os.environ["KUBECONFIG"] = settings.kubeconfig  # kopf's login reads it too
    metrics, health = OperatorMetrics(), Health()
    serve(settings.bind_address, settings.metrics_port, metrics_routes(metrics))
    serve(settings.bind_address, settings.health_port, health_routes(health))
    kube = Kube(load_api_client(settings.kubeconfig), on_error=metrics.api_error)
    stop = threading.Event()  # a signal: stop everything
    kopf_stop = threading.Event()  # stop kopf: a signal or lost leadership

    def on_signal(*_: object) -> None:
        stop.set()
        kopf_stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    elector: LeaderElector | None = None
    lost = threading.Event()
    fatal = threading.Event()  # a setting no retry can fix
    if settings.leader_elect:
        cfg = LeaseConfig(
            settings.lease_name,
            settings.lease_namespace,
            settings.identity,
            settings.lease_duration,
            settings.renew_deadline,
            settings.retry_period,
        )
        elector = LeaderElector(
            kube, cfg, on_started=lambda: metrics.leader.set(1), on_stopped=kopf_stop.set
        )

        def elect() -> None:
            try:
                if elector is not None and elector.run(stop):
                    lost.set()
            except LeaseNamespaceMissing as err:
                log.error("cannot elect a leader: %s", err)
                fatal.set()
                stop.set()
            except Exception:  # a dead election thread must not leave kopf leading unrenewed
                log.exception("leader election failed: stepping down")
                lost.set()
            finally:
                metrics.leader.set(0)
                kopf_stop.set()

        threading.Thread(target=elect, name="leader-election", daemon=True).start()
        health.ready.set()  # a standby is healthy and ready
        log.info("waiting for lease %s/%s as %s", cfg.namespace, cfg.name, cfg.identity)
        while not stop.is_set() and not elector.is_leader and not kopf_stop.is_set():
            stop.wait(0.2)
        if fatal.is_set():
            return EXIT_CONFIG
        if stop.is_set() or not elector.is_leader:
            return 1 if lost.is_set() else 0
    else:
        metrics.leader.set(1)

    may_act = (lambda: elector.is_leader) if elector is not None else (lambda: True)
    controller = Controller(
        kube,
        metrics,
        may_act=may_act,
        namespaces=settings.namespaces,
        progress_period=settings.progress_period,
        backend=settings.backend,
    )
    registry = make_registry(controller, settings.resync_period)
    health.ready.set()
    log.info("reconciling MegatronJobs in %s", ",".join(settings.namespaces) or "all namespaces")
    asyncio.run(_run_kopf(registry, settings, health, kopf_stop, stop))
    if lost.is_set():
        log.error("leadership lost: exiting so that a standby can lead")
        return 1
    return 0


async def _heartbeat(health: Health) -> None:
    """Beat every second while the event loop runs; /healthz fails when the beats stop."""
    while True:
        health.beat()
        await asyncio.sleep(1.0)


async def _run_kopf(
    registry: kopf.OperatorRegistry,
    settings: Settings,
    health: Health,
    kopf_stop: threading.Event,
    stop: threading.Event,
) -> None:
    heartbeat = asyncio.create_task(_heartbeat(health))
    try:
        await kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=settings.all_namespaces,
            namespaces=list(settings.namespaces),
            stop_flag=kopf_stop,
            # Our identity (pod name), not kopf's guess: that calls getpass.getuser(), which
            # fails for a UID with no passwd entry (the image's 65532) and no $USER.
            identity=Identity(settings.identity),
        )
    finally:
        heartbeat.cancel()
        # kopf may stop on its own signal handling; release the thread waiting on the flag,
        # or the event loop's executor never shuts down.
        kopf_stop.set()
        stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
