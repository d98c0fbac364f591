"""The reconcile loop for one MegatronJob: parse, plan, render, apply, mirror status.

Level-based and idempotent: each call reads the current state and converges, so a crash at any
point is repaired by the next call (from a watch event or the periodic resync). kopf only
delivers the events; nothing here depends on kopf's handler-progress storage.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

from kubetron_api.parse import SpecError, parse_job
from kubetron_api.v1alpha1 import MegatronJob, Phase
from kubetron_operator import kueue, lifecycle, progress
from kubetron_operator.kube import ApiError, Kube, Obj
from kubetron_operator.lifecycle import RESTART_GRACE_SECONDS, Verdict, attempt_of
from kubetron_operator.metrics import OperatorMetrics
from kubetron_operator.plan import Plan, PlanError, plan
from kubetron_operator.render import (
    JOB_NAME_LABEL,
    JOB_ROLE_LABEL,
    drifted,
    render,
    replica_types,
)
from kubetron_operator.status import (
    Observed,
    invalid_status,
    job_status,
    phase_changed,
    restart_status,
    status_differs,
    waiting_status,
)

log = logging.getLogger("kubetron.controller")

_WARNING_PHASES = {Phase.FAILED.value, Phase.RESTARTING.value}
_FINAL_PHASES = {Phase.SUCCEEDED.value, Phase.FAILED.value}


def utcnow() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Controller:
    """Reconciles MegatronJobs; only while `may_act()` says this replica leads."""

    def __init__(
        self,
        kube: Kube,
        metrics: OperatorMetrics,
        may_act: Callable[[], bool] = lambda: True,
        namespaces: tuple[str, ...] = (),
        progress_period: float = 15.0,
        read_metrics: Callable[[str, int], str] = progress.fetch,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube, self.metrics, self.may_act = kube, metrics, may_act
        self.namespaces = namespaces
        self.progress_period, self.read_metrics, self.clock = progress_period, read_metrics, clock
        self._progress_read_at: dict[tuple[str, str], float] = {}
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        # failed pods seen in watch events, by job: kept until the attempt is assessed, in case
        # the pod is deleted before a reconcile lists it (cleanPodPolicy All, a manual delete)
        self._failed_pods: defaultdict[tuple[str, str], dict[str, Obj]] = defaultdict(dict)
        self._kept_layout: set[tuple[str, str, int]] = set()  # logged once per attempt

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(namespace, name)]

    def reconcile(self, namespace: str, name: str) -> str:
        """Converge one job; returns the result label counted in the metrics."""
        if not self.may_act():
            self.metrics.reconciles.labels("skipped").inc()
            return "skipped"
        start = time.perf_counter()
        with self._lock(namespace, name):
            try:
                result = self._reconcile(namespace, name)
            except ApiError as err:
                log.warning("reconcile %s/%s failed: %s", namespace, name, err)
                result = "error"
        self.metrics.reconcile_duration.observe(time.perf_counter() - start)
        self.metrics.reconciles.labels(result).inc()
        return result

    def forget(self, namespace: str, name: str) -> None:
        self.metrics.jobs.forget(namespace, name)
        self._failed_pods.pop((namespace, name), None)

    def note_pod(self, pod: Obj) -> str | None:
        """Remember a trainer pod with a failed container; returns its job (to reconcile)."""
        meta = pod.get("metadata", {})
        job = meta.get("labels", {}).get(JOB_NAME_LABEL)
        if not job:
            return None
        if lifecycle.container_exits([pod]):
            self._failed_pods[(meta["namespace"], job)][meta.get("uid") or meta["name"]] = pod
        return str(job)

    @staticmethod
    def workload_job(workload: Obj) -> str | None:
        """The MegatronJob a Kueue Workload queues: the job-name label on its pod sets'
        templates, which Kueue copies from the PyTorchJob (render puts it on every template).
        None for the Workloads of other jobs."""
        for pod_set in workload.get("spec", {}).get("podSets") or []:
            labels = (pod_set.get("template") or {}).get("metadata", {}).get("labels") or {}
            if labels.get(JOB_NAME_LABEL):
                return str(labels[JOB_NAME_LABEL])
        return None

    def resync(self) -> None:
        """Reconcile every job in the watched namespaces (retries, missed events)."""
        for ns in self.namespaces or (None,):
            try:
                jobs = self.kube.list("MegatronJob", ns)
            except ApiError as err:
                log.warning("resync list failed: %s", err)
                continue
            for body in jobs:
                meta = body["metadata"]
                self.reconcile(meta["namespace"], meta["name"])

    def _reconcile(self, namespace: str, name: str) -> str:
        body = self.kube.get("MegatronJob", namespace, name)
        if body is None:
            self.forget(namespace, name)
            return "success"
        old_status: Obj = body.get("status") or {}
        generation = int(body["metadata"].get("generation", 1))
        try:
            job = parse_job(body)
            job_plan = plan(job)
        except (SpecError, PlanError) as err:
            observed = Observed(generation, old_status, None, [])
            new_status = invalid_status(observed, err.problems, utcnow())
            self._write_status(body, old_status, new_status, "InvalidSpec", "; ".join(err.problems))
            return "invalid"
        pytorch_job = self.kube.get("PyTorchJob", namespace, name)
        finished = old_status.get("phase") in _FINAL_PHASES
        if finished and old_status.get("observedGeneration") == generation:
            # Final: nothing is re-created, whatever happened to the children (the
            # training-operator's ttlSecondsAfterFinished, a manual delete); the status stays.
            self.metrics.jobs.set(namespace, name, old_status["phase"])
            return "success"
        attempt = int(old_status.get("attempt") or 1)
        pods = self.kube.list("Pod", namespace, f"{JOB_NAME_LABEL}={name}")
        if self._replace_old_attempt(namespace, name, attempt, pytorch_job, pods):
            new_status = waiting_status(old_status, job_plan, generation, attempt, name)
            self._write_status(body, old_status, new_status, new_status["phase"], "")
            return "success"
        pytorch_job = self._apply_children(job, job_plan, generation, old_status, pytorch_job,
                                           attempt)  # fmt: skip
        seen = list(self._failed_pods.get((namespace, name), {}).values())
        pods += [
            p for p in seen if p["metadata"]["name"] not in {q["metadata"]["name"] for q in pods}
        ]
        now = utcnow()
        live = self._read_progress(job, pytorch_job, attempt, old_status.get("progress"), now)
        progress_now = live or old_status.get("progress")
        rp = job.spec.run_policy
        queue = kueue.local_queue(job.spec.scheduling)
        workload = self._sync_workload(job, pytorch_job) if queue else None
        held = None
        if queue and not rp.suspend and (pytorch_job is None or kueue.suspended(pytorch_job)):
            held = kueue.waiting(workload, queue, name)
        verdict = lifecycle.assess(
            pods=pods,
            pytorch_job=pytorch_job,
            attempt=attempt,
            expected_pods=job_plan.nodes,
            running_since=old_status.get("runningSince"),
            progress=progress_now,
            deadline_seconds=rp.progress_deadline_seconds if self.progress_period > 0 else None,
            suspended=rp.suspend,
            now=now,
            held=held,
        )
        if queue and held is None and verdict.action in ("restart", "fail"):
            # Kueue may have evicted the job between the two reads: its suspend stops the pods
            fresh = self.kube.get("PyTorchJob", namespace, name)
            if kueue.suspended(fresh) and not rp.suspend:
                pytorch_job, workload = fresh, self._sync_workload(job, fresh)
                verdict = Verdict("queue", *kueue.waiting(workload, queue, name))
        observed = Observed(generation, old_status, pytorch_job, pods, live, bool(queue), workload)
        if verdict.action == "restart":
            return self._restart(body, job, observed, job_plan, verdict, attempt, now)
        new_status = job_status(observed, job_plan, name, verdict, attempt, now)
        if verdict.action == "fail":
            self._stop_attempt(namespace, name, attempt, pods, keep_failed=True)
        if verdict.action in ("fail", "suspend", "queue"):
            # Suspended pods exit 143 after their save: not failures of the resumed pods.
            self._failed_pods.pop((namespace, name), None)
        self._write_status(body, old_status, new_status, verdict.reason or new_status["phase"],
                           verdict.message)  # fmt: skip
        return "success"

    def _replace_old_attempt(
        self, namespace: str, name: str, attempt: int, pytorch_job: Obj | None, pods: list[Obj]
    ) -> bool:
        """Remove what an older attempt left (its PyTorchJob, its pods); True while any of it
        remains, so the new attempt starts only on a clean slate (same pod names, same Service
        names, no zombie rank joining the new group)."""
        old = [p for p in pods if attempt_of(p) != attempt]
        for pod in old:  # before their PyTorchJob (see _restart)
            if not pod["metadata"].get("deletionTimestamp"):
                self.kube.delete("Pod", namespace, pod["metadata"]["name"], RESTART_GRACE_SECONDS)
        if pytorch_job is not None and attempt_of(pytorch_job) not in (attempt, None):
            log.info("%s/%s: removing the PyTorchJob of attempt %s", namespace, name,
                     attempt_of(pytorch_job))  # fmt: skip
            self.kube.delete("PyTorchJob", namespace, name)
            pytorch_job = None
        return bool(old) or (pytorch_job is not None and attempt_of(pytorch_job) != attempt)

    def _restart(
        self,
        body: Obj,
        job: MegatronJob,
        observed: Observed,
        job_plan: Plan,
        verdict: Verdict,
        attempt: int,
        now: str,
    ) -> str:
        """Replace the attempt by the next one, or fail the job when the restarts are used up.
        The status is written first: a crash after it is finished by the next reconcile."""
        namespace, name = job.namespace, job.name
        restarts = int(observed.old_status.get("restarts") or 0)
        limit = job.spec.run_policy.backoff_limit
        if restarts >= limit:
            message = (
                f"attempt {attempt} ended ({verdict.message}) and all "
                f"spec.runPolicy.backoffLimit={limit} restarts are used"
            )
            verdict = Verdict("fail", "BackoffLimitExceeded", message)
            new_status = job_status(observed, job_plan, name, verdict, attempt, now)
            self._write_status(body, observed.old_status, new_status, "BackoffLimitExceeded",
                               message)  # fmt: skip
            self._stop_attempt(namespace, name, attempt, observed.pods, keep_failed=True)
        else:
            message = (
                f"attempt {attempt} ended: {verdict.message}; restarting every pod as attempt "
                f"{attempt + 1} (restart {restarts + 1} of {limit}), from the latest checkpoint"
            )
            new_status = restart_status(observed, job_plan, name, verdict.reason, message, now)
            self._write_status(body, observed.old_status, new_status, verdict.reason, message)
            # Pods first, with the short grace period: the garbage collector would delete them
            # with their own (long, for saves) one, and a kubelet that started stopping a
            # container with it does not shorten it later.
            self._stop_attempt(namespace, name, attempt, observed.pods, keep_failed=False)
            self.kube.delete("PyTorchJob", namespace, name)
        self._failed_pods.pop((namespace, name), None)
        return "restarted"

    def _stop_attempt(
        self, namespace: str, name: str, attempt: int, pods: list[Obj], keep_failed: bool
    ) -> None:
        """Delete the attempt's pods (a broken group's ranks block in collectives); with
        `keep_failed`, the pods that ended stay for `kubectl logs`."""
        for pod in pods:
            meta = pod["metadata"]
            ended = pod.get("status", {}).get("phase") in ("Failed", "Succeeded")
            if attempt_of(pod) != attempt or meta.get("deletionTimestamp"):
                continue
            if keep_failed and ended:
                continue
            self.kube.delete("Pod", namespace, meta["name"], RESTART_GRACE_SECONDS)

    def _apply_children(
        self,
        job: MegatronJob,
        job_plan: Plan,
        generation: int,
        old_status: Obj,
        live_job: Obj | None,
        attempt: int,
    ) -> Obj | None:
        """Apply every child that is missing, differs from what the spec renders (someone
        deleted or edited it), or belongs to an older generation; returns the PyTorchJob.

        A queued job's PyTorchJob is created suspended and its `runPolicy.suspend` (and the
        tolerations Kueue adds when it starts it) are Kueue's from then on: re-applies carry the
        live values (kueue.keep_admission). A queued job the user suspends before
        its PyTorchJob exists gets none (it asks for no quota) until it is resumed."""
        new_generation = old_status.get("observedGeneration") != generation
        queued = bool(kueue.local_queue(job.spec.scheduling))
        for obj in render(job, job_plan, attempt=attempt):
            meta = obj["metadata"]
            live = live_job if obj["kind"] == "PyTorchJob" else None
            if live is None and obj["kind"] != "PyTorchJob":
                live = self.kube.get(obj["kind"], meta["namespace"], meta["name"])
            if obj["kind"] == "PyTorchJob" and live is not None:
                self._keep_pod_sets(obj, live, attempt)
            if obj["kind"] == "PyTorchJob" and queued:
                if live is None and job.spec.run_policy.suspend:
                    continue
                if live is not None:
                    kueue.keep_admission(obj, live)
            if new_generation or live is None or drifted(obj, live):
                if live is not None and not new_generation:
                    log.info("%s %s/%s drifted from its spec: re-applying", obj["kind"],
                             meta["namespace"], meta["name"])  # fmt: skip
                live = self.kube.apply(obj)
            if obj["kind"] == "PyTorchJob":
                live_job = live
        return live_job

    def _keep_pod_sets(self, desired: Obj, live: Obj, attempt: int) -> None:
        """A live PyTorchJob made by an earlier operator (a Master pod set) keeps its pod sets
        for its attempt: applying the new layout over running pods would add a worker that
        meets nobody and orphan the master. The rest (runPolicy among it) follows the spec; the
        next attempt has the new layout."""
        have, want = replica_types(live), replica_types(desired)
        if have == want:
            return
        desired["spec"]["pytorchReplicaSpecs"] = live["spec"]["pytorchReplicaSpecs"]
        meta = desired["metadata"]
        if (key := (meta["namespace"], meta["name"], attempt)) not in self._kept_layout:
            self._kept_layout.add(key)
            log.info("%s/%s: the PyTorchJob of attempt %d keeps its pod sets %s (not %s) "
                     "until the next attempt", *key, have, want)  # fmt: skip

    def _sync_workload(self, job: MegatronJob, pytorch_job: Obj | None) -> Obj | None:
        """Kueue's Workload for the PyTorchJob (None before Kueue made it, or without Kueue),
        made active or inactive to follow the user's spec.runPolicy.suspend."""
        uid = (pytorch_job or {}).get("metadata", {}).get("uid")
        if not uid:
            return None
        try:
            found = self.kube.list("Workload", job.namespace, f"{kueue.JOB_UID_LABEL}={uid}")
        except ApiError as err:
            if err.status == 404:  # Kueue's CRDs are not installed
                return None
            raise
        if not found:
            return None
        workload = found[0]
        active = not job.spec.run_policy.suspend
        if kueue.is_active(workload) != active:
            log.info("%s/%s: %s Kueue Workload %s", job.namespace, job.name,
                     "activating" if active else "deactivating",
                     workload["metadata"]["name"])  # fmt: skip
            workload = self.kube.patch(
                "Workload",
                job.namespace,
                workload["metadata"]["name"],
                {"spec": {"active": active}},
            )
        return workload

    def _read_progress(
        self, job: MegatronJob, pytorch_job: Obj | None, attempt: int, old: Obj | None, now: str
    ) -> Obj | None:
        """Rank 0's progress while the job runs, at most once per `progress_period`; None
        when not due, not running, or the endpoint cannot be read (the last reading stays)."""
        key = (job.namespace, job.name)
        if self.progress_period <= 0 or not _is_running(pytorch_job):
            return None
        if self.clock() - self._progress_read_at.get(key, -math.inf) < self.progress_period:
            return None
        self._progress_read_at[key] = self.clock()
        selector = f"{JOB_NAME_LABEL}={job.name},{JOB_ROLE_LABEL}=master"  # worker 0: rank 0
        ips = [
            p["status"]["podIP"]
            for p in self.kube.list("Pod", job.namespace, selector)
            if p.get("status", {}).get("phase") == "Running"
            and p["status"].get("podIP")
            and attempt_of(p) == attempt
        ]
        if not ips:
            return None
        try:
            text = self.read_metrics(ips[0], job.spec.metrics.port)
        except OSError as err:  # not serving yet, or gone: keep the last reading
            log.debug("progress of %s/%s: %s", job.namespace, job.name, err)
            return None
        sample = progress.parse(text, job.name)
        reading = progress.progress(sample, job.spec.recipe.train_iters, now)
        if reading is None:
            return None
        reading["attempt"] = int(sample.attempt) if sample.attempt is not None else attempt
        reading["advancedAt"] = lifecycle.advanced_at(old, reading, attempt, now)
        return reading

    def _write_status(
        self, body: Obj, old_status: Obj, new_status: Obj, reason: str, message: str
    ) -> None:
        meta = body["metadata"]
        self.metrics.jobs.set(meta["namespace"], meta["name"], new_status["phase"])
        if not status_differs(old_status, new_status):
            return
        if not self.may_act():  # lost the lease meanwhile: write nothing
            return
        self.kube.patch_status("MegatronJob", meta["namespace"], meta["name"], new_status)
        if phase_changed(old_status, new_status):
            phase = new_status["phase"]
            kind = "Warning" if phase in _WARNING_PHASES else "Normal"
            text = message or _phase_message(new_status)
            log.info("%s/%s: phase %s (%s)", meta["namespace"], meta["name"], phase, text)
            self.kube.event(body, kind, reason, text)


def _is_running(pytorch_job: Obj | None) -> bool:
    conditions = (pytorch_job or {}).get("status", {}).get("conditions", [])
    return any(c.get("type") == "Running" and c.get("status") == "True" for c in conditions)


def _phase_message(status: Obj) -> str:
    phase = status["phase"]
    for cond in status.get("conditions", []):
        if cond["type"] == phase and cond.get("message"):
            return f"{phase}: {cond['message']}"
    return f"MegatronJob is {phase}"
