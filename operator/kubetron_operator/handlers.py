"""kopf wiring: watch events in, `Controller.reconcile` out. Nothing else lives here.

Only event-watching handlers are used: they keep no progress in the object (no `status.kopf`,
no annotations, no finalizers), so the user's status is kubetron's schema alone, and the
controller stays level-based. kopf's own event posting is off; the controller posts its events.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from kubetron_api.v1alpha1 import GROUP, KIND, PLURAL, VERSION
from kubetron_operator.controller import Controller

MANAGED_BY = {"app.kubernetes.io/managed-by": "kubetron-operator"}


def make_registry(controller: Controller, resync_period: float) -> kopf.OperatorRegistry:
    """A registry of its own, so importing this module registers nothing globally."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # kopf's own readers: the client-library piggyback misses token kubeconfigs
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False
        settings.scanning.disabled = True
        settings.watching.server_timeout = 300
        settings.execution.max_workers = 8

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def on_megatronjob(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        meta = body["metadata"]
        if event.get("type") == "DELETED":
            controller.forget(meta["namespace"], meta["name"])
            return
        await asyncio.to_thread(controller.reconcile, meta["namespace"], meta["name"])

    async def on_backend_job(body: kopf.Body, **_: Any) -> None:
        meta = body["metadata"]
        for ref in meta.get("ownerReferences", []):
            if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(GROUP):
                await asyncio.to_thread(controller.reconcile, meta["namespace"], ref["name"])

    # the backend jobs the operator owns (PyTorchJobs; TrainJobs where it may read them)
    for backend in controller.watched_backends():
        kopf.on.event(backend.group, backend.version, backend.plural, labels=MANAGED_BY,
                      registry=registry)(on_backend_job)  # fmt: skip

    @kopf.on.event("", "v1", "pods", labels=MANAGED_BY, registry=registry)
    async def on_pod(body: kopf.Body, **_: Any) -> None:
        job = controller.note_pod(dict(body))
        if job is not None:
            await asyncio.to_thread(controller.reconcile, body["metadata"]["namespace"], job)

    # Kueue's admission decisions (waiting reasons, quota reserved) change the Workload only;
    # without Kueue's CRDs at startup kopf serves nothing here and the resync picks them up.
    @kopf.on.event("kueue.x-k8s.io", "v1beta2", "workloads", registry=registry)
    async def on_workload(body: kopf.Body, **_: Any) -> None:
        job = controller.workload_job(dict(body))
        if job is not None:
            await asyncio.to_thread(controller.reconcile, body["metadata"]["namespace"], job)

    @kopf.on.startup(registry=registry)
    async def start_resync(memo: kopf.Memo, **_: Any) -> None:
        memo["resync"] = asyncio.create_task(_resync_forever(controller, resync_period))

    @kopf.on.cleanup(registry=registry)
    async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
        task = memo.get("resync")
        if task is not None:
            task.cancel()

    return registry


async def _resync_forever(controller: Controller, period: float) -> None:
    log = logging.getLogger("kubetron.resync")
    while True:
        await asyncio.sleep(period)
        try:
            await asyncio.to_thread(controller.resync)
        except Exception:  # keep resyncing whatever one pass hit
            log.exception("resync pass failed")
