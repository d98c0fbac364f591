"""The reconcile loop for one MegatronJob: parse -> plan -> apply -> assess -> status.

Each step is a method of its own: parse and plan the spec (`plan.py`), apply the rendered
children (`render.py`), assess the attempt from its pods, its backend job (a PyTorchJob or a
TrainJob, read through `backends.py`), rank 0's progress and
the scheduler's admission (`lifecycle.py`), then act on the verdict and write the status
(`status.py`). What depends on the job's scheduler (Kueue, Volcano, none) is asked of the one
`Scheduler` the plan carries (`scheduling/`); the reads and writes it describes happen here.

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
from dataclasses import dataclass
from datetime import UTC, datetime

from kubetron_api.parse import SpecError, parse_job
from kubetron_api.v1alpha1 import Backend, MegatronJob, Phase
from kubetron_operator import faults, goodput, lifecycle, progress
from kubetron_operator.backends import BACKENDS, BackendJob, backend_of, ttl_expired
from kubetron_operator.kube import ApiError, Kube, Obj
from kubetron_operator.lifecycle import RESTART_GRACE_SECONDS, Verdict, attempt_of
from kubetron_operator.metrics import OperatorMetrics
from kubetron_operator.plan import Plan, PlanError, plan
from kubetron_operator.render import JOB_NAME_LABEL, drifted, render, replica_types
from kubetron_operator.render_trainjob import refused
from kubetron_operator.scheduling import Scheduler
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


@dataclass(frozen=True)
class _Pass:
    """One reconcile of a valid job: what the steps after parse and plan read."""

    body: Obj
    job: MegatronJob
    plan: Plan
    old_status: Obj
    generation: int
    backend: BackendJob  # the kind of job its pods run under

    @property
    def attempt(self) -> int:
        return int(self.old_status.get("attempt") or 1)


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
        backend: Backend = Backend.PYTORCHJOB,
    ) -> None:
        self.kube, self.metrics, self.may_act = kube, metrics, may_act
        self.backend = backend  # of jobs without spec.backend (--backend)
        self.namespaces = namespaces
        self.progress_period, self.read_metrics, self.clock = progress_period, read_metrics, clock
        self._progress_read_at: dict[tuple[str, str], float] = {}
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        # failed pods seen in watch events, by job: kept until the attempt is assessed, in case
        # the pod is deleted before a reconcile lists it (cleanPodPolicy All, a manual delete)
        self._failed_pods: defaultdict[tuple[str, str], dict[str, Obj]] = defaultdict(dict)
        # the pod that ran global rank 0, seen in a watch event when it ended with its exit
        # report: cleanPodPolicy All may delete it before the reconcile that finds the job done
        self._reports: dict[tuple[str, str], Obj] = {}
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
        self.metrics.forget_job(namespace, name)
        self._failed_pods.pop((namespace, name), None)
        self._reports.pop((namespace, name), None)

    def note_pod(self, pod: Obj) -> str | None:
        """Remember a trainer pod with a failed container, or with an exit report; returns its
        job (to reconcile)."""
        meta = pod.get("metadata", {})
        job = meta.get("labels", {}).get(JOB_NAME_LABEL)
        if not job:
            return None
        if lifecycle.container_exits([pod]):
            self._failed_pods[(meta["namespace"], job)][meta.get("uid") or meta["name"]] = pod
        elif progress.exit_messages(pod):
            self._reports[(meta["namespace"], job)] = pod
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

    def watched_backends(self) -> list[BackendJob]:
        """The backend jobs to watch: the default backend's, and every other whose objects this
        operator may list (a TrainJob only where its backend is on: RBAC and CRD; a watch it
        may not list would end the operator's watcher)."""
        default = BACKENDS[self.backend]
        out = [default]
        for backend in BACKENDS.values():
            if backend is default:
                continue
            try:
                for ns in self.namespaces or (None,):
                    self.kube.list(backend.kind, ns, limit=1)
            except ApiError as err:
                log.info("not watching %ss: %s", backend.kind, err)
                continue
            out.append(backend)
        return out

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
        """parse -> plan -> apply -> assess -> status; a step that leaves nothing for the next
        ends the call (its status written)."""
        body = self.kube.get("MegatronJob", namespace, name)
        if body is None:
            self.forget(namespace, name)
            return "success"
        r = self._parse_and_plan(body)
        if r is None:
            return "invalid"
        if self._is_final(r):
            return "success"
        applied = self._apply(r)
        if applied is None:
            return "success"
        now = utcnow()
        observed, verdict = self._assess(r, *applied, now)
        return self._conclude(r, observed, verdict, now)

    def _parse_and_plan(self, body: Obj) -> _Pass | None:
        """The job parsed and planned; None when its spec cannot run (Valid=False written)."""
        old_status: Obj = body.get("status") or {}
        generation = int(body["metadata"].get("generation", 1))
        try:
            job = parse_job(body)
            job_plan = plan(job)
            if problems := refused(job, job_plan, self.backend):
                raise PlanError(problems)
        except (SpecError, PlanError) as err:
            observed = Observed(generation, old_status, None, [])
            new_status = invalid_status(observed, err.problems, utcnow())
            self._write_status(body, old_status, new_status, "InvalidSpec", "; ".join(err.problems))
            return None
        return _Pass(body, job, job_plan, old_status, generation, backend_of(job, self.backend))

    def _is_final(self, r: _Pass) -> bool:
        """Final: nothing is re-created, whatever happened to the children (the backend's or the
        operator's ttlSecondsAfterFinished, a manual delete); the status stays."""
        phase = r.old_status.get("phase")
        if phase not in _FINAL_PHASES or r.old_status.get("observedGeneration") != r.generation:
            return False
        self.metrics.jobs.set(r.job.namespace, r.job.name, str(phase))
        if not r.backend.runs_ttl and ttl_expired(r.job, r.old_status, utcnow()):
            self.kube.delete(r.backend.kind, r.job.namespace, r.job.name)  # gone already: fine
        return True

    def _apply(self, r: _Pass) -> tuple[Obj | None, list[Obj]] | None:
        """The attempt's children applied: (its backend job as `BackendJob.view` reads it, the
        job's pods); None while what an older attempt left is still going (status Restarting
        written)."""
        namespace, name = r.job.namespace, r.job.name
        backend_job = self.kube.get(r.backend.kind, namespace, name)
        pods = self.kube.list("Pod", namespace, f"{JOB_NAME_LABEL}={name}")
        if self._replace_old_attempt(r, backend_job, pods):
            new_status = waiting_status(r.old_status, r.plan, r.generation, r.attempt, name)
            self._write_status(r.body, r.old_status, new_status, new_status["phase"], "")
            return None
        return r.backend.view(self._apply_children(r, backend_job)), pods

    def _assess(
        self, r: _Pass, backend_job: Obj | None, pods: list[Obj], now: str
    ) -> tuple[Observed, Verdict]:
        """What the cluster shows of the attempt (its pods, with the failed ones seen in watch
        events; rank 0's progress; the scheduler's admission) and the verdict on it."""
        job, scheduler, rp = r.job, r.plan.scheduler, r.job.spec.run_policy
        seen = self._failed_pods.get((job.namespace, job.name), {}).values()
        listed = {p["metadata"]["name"] for p in pods}
        pods = pods + [p for p in seen if p["metadata"]["name"] not in listed]
        live = self._read_progress(r, backend_job, now)
        admission = self._sync_admission(job, scheduler, backend_job)
        held = None
        if not rp.suspend and scheduler.holds(backend_job):
            held = scheduler.waiting(admission, job.name)
        verdict = lifecycle.assess(
            pods=pods,
            pytorch_job=backend_job,
            attempt=r.attempt,
            expected_pods=r.plan.nodes,
            running_since=r.old_status.get("runningSince"),
            progress=live or r.old_status.get("progress"),
            deadline_seconds=rp.progress_deadline_seconds if self.progress_period > 0 else None,
            suspended=rp.suspend,
            now=now,
            held=held,
        )
        if scheduler.queues and held is None and verdict.action in ("restart", "fail"):
            # the queue may have evicted the job between the two reads: its suspend stops the pods
            fresh = r.backend.view(self.kube.get(r.backend.kind, job.namespace, job.name))
            if fresh is not None and scheduler.holds(fresh) and not rp.suspend:
                backend_job, admission = fresh, self._sync_admission(job, scheduler, fresh)
                verdict = Verdict("queue", *scheduler.waiting(admission, job.name))
        if verdict.action in ("succeed", "fail"):
            live = self._final_progress(r, pods, live, now) or live
        observed = Observed(r.generation, r.old_status, backend_job, pods, live, admission)
        return observed, verdict

    def _final_progress(self, r: _Pass, pods: list[Obj], live: Obj | None, now: str) -> Obj | None:
        """The ended attempt's progress from global rank 0's exit report, over the last poll;
        None (the poll stays, and the log says why) when no container left one."""
        names = {p["metadata"]["name"] for p in pods}
        seen = self._reports.get((r.job.namespace, r.job.name))
        listed = pods + ([seen] if seen and seen["metadata"]["name"] not in names else [])
        mine = [p for p in listed if attempt_of(p) == r.attempt]
        last = live or r.old_status.get("progress")
        total = r.job.spec.recipe.train_iters
        final, why = progress.final_progress(mine, last, r.attempt, total, now)
        if final is None:
            log.info("%s/%s: final progress from the last poll: %s", r.job.namespace,
                     r.job.name, why)  # fmt: skip
        return final

    def _conclude(self, r: _Pass, observed: Observed, verdict: Verdict, now: str) -> str:
        """Act on the verdict (restart, stop a failed attempt) and write the status."""
        namespace, name = r.job.namespace, r.job.name
        if verdict.action == "restart":
            return self._restart(r, observed, verdict, now)
        new_status = job_status(observed, r.plan, name, verdict, r.attempt, now)
        if verdict.action == "fail":
            self._stop_attempt(namespace, name, r.attempt, observed.pods, keep_failed=True)
        if verdict.action in ("fail", "suspend", "queue"):
            # Suspended pods exit 143 after their save: not failures of the resumed pods.
            self._failed_pods.pop((namespace, name), None)
        self._write_status(r.body, r.old_status, new_status, verdict.reason or new_status["phase"],
                           verdict.message)  # fmt: skip
        return "success"

    def _replace_old_attempt(self, r: _Pass, backend_job: Obj | None, pods: list[Obj]) -> bool:
        """Remove what an older attempt left (its backend job, its pods); True while any of it
        remains, so the new attempt starts only on a clean slate (same pod names, same Service
        names, no zombie rank joining the new group)."""
        namespace, name, attempt, kind = r.job.namespace, r.job.name, r.attempt, r.backend.kind
        old = [p for p in pods if attempt_of(p) != attempt]
        for pod in old:  # before their backend job (see _restart)
            if not pod["metadata"].get("deletionTimestamp"):
                self.kube.delete("Pod", namespace, pod["metadata"]["name"], RESTART_GRACE_SECONDS)
        stale = backend_job is not None and attempt_of(backend_job) not in (attempt, None)
        if stale and not backend_job["metadata"].get("deletionTimestamp"):  # type: ignore[index]
            log.info("%s/%s: removing the %s of attempt %s", namespace, name, kind,
                     attempt_of(backend_job))  # fmt: skip
            self.kube.delete(kind, namespace, name)
            backend_job = None
        if backend_job is None and self._children_left(r):
            return True
        return bool(old) or (backend_job is not None and attempt_of(backend_job) != attempt)

    def _children_left(self, r: _Pass) -> bool:
        """Whether what a deleted backend job of this name made (`BackendJob.children`) is still
        there, waiting for the garbage collector."""
        namespace, name = r.job.namespace, r.job.name
        for kind in r.backend.children:
            child = self.kube.get(kind, namespace, name)
            owners = (child or {}).get("metadata", {}).get("ownerReferences") or []
            if any(o.get("kind") == r.backend.kind and o.get("controller") for o in owners):
                log.info("%s/%s: waiting for the %s of the last %s to go", namespace, name,
                         kind, r.backend.kind)  # fmt: skip
                return True
        return False

    def _restart(self, r: _Pass, observed: Observed, verdict: Verdict, now: str) -> str:
        """Replace the attempt by the next one, or fail the job when the restarts are used up.
        The status is written first: a crash after it is finished by the next reconcile."""
        namespace, name, attempt = r.job.namespace, r.job.name, r.attempt
        restarts = int(observed.old_status.get("restarts") or 0)
        limit = r.job.spec.run_policy.backoff_limit
        if restarts >= limit:
            message = (
                f"attempt {attempt} ended ({verdict.message}) and all "
                f"spec.runPolicy.backoffLimit={limit} restarts are used"
            )
            verdict = Verdict("fail", "BackoffLimitExceeded", message, verdict.ended)
            new_status = job_status(observed, r.plan, name, verdict, attempt, now)
            self._write_status(r.body, observed.old_status, new_status, "BackoffLimitExceeded",
                               message)  # fmt: skip
            self._stop_attempt(namespace, name, attempt, observed.pods, keep_failed=True)
        else:
            message = (
                f"attempt {attempt} ended: {verdict.message}; restarting every pod as attempt "
                f"{attempt + 1} (restart {restarts + 1} of {limit}), from the latest checkpoint"
            )
            new_status = restart_status(
                observed, r.plan, name, verdict.reason, message, now, ended=verdict
            )
            self._write_status(r.body, observed.old_status, new_status, verdict.reason, message)
            # Pods first, with the short grace period: the garbage collector would delete them
            # with their own (long, for saves) one, and a kubelet that started stopping a
            # container with it does not shorten it later.
            self._stop_attempt(namespace, name, attempt, observed.pods, keep_failed=False)
            self.kube.delete(r.backend.kind, namespace, name)
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

    def _apply_children(self, r: _Pass, live_job: Obj | None) -> Obj | None:
        """Apply every child that is missing, differs from what the spec renders (someone
        deleted or edited it), or belongs to an older generation; returns the backend job.

        What the job's scheduler owns on a live backend job stays (`Scheduler.keep`: a queued
        job's `runPolicy.suspend` and the tolerations Kueue adds when it starts it), and a
        queued job the user suspends before its backend job exists gets none (it asks for no
        quota) until it is resumed (`Scheduler.creates`)."""
        new_generation = r.old_status.get("observedGeneration") != r.generation
        scheduler = r.plan.scheduler
        avoided = faults.avoided_nodes(r.old_status)
        for obj in render(r.job, r.plan, attempt=r.attempt, default_backend=self.backend):
            meta = obj["metadata"]
            faults.keep_off(obj, avoided)  # its pods off the nodes whose fault ended an attempt
            is_job = obj["kind"] == r.backend.kind
            live = live_job if is_job else self.kube.get(obj["kind"], *_where(meta))
            if is_job:
                if live is None and not scheduler.creates(r.job.spec.run_policy.suspend):
                    continue
                if live is not None:
                    self._keep_pod_sets(obj, live, r.attempt)
                    r.backend.keep(scheduler, obj, live)
            if new_generation or live is None or drifted(obj, live):
                if live is not None and not new_generation:
                    log.info("%s %s/%s drifted from its spec: re-applying", obj["kind"],
                             meta["namespace"], meta["name"])  # fmt: skip
                live = self.kube.apply(obj)
            if is_job:
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

    def _sync_admission(
        self, job: MegatronJob, scheduler: Scheduler, backend_job: Obj | None
    ) -> Obj | None:
        """The scheduler's record of the PyTorchJob's admission (Kueue's Workload; None before
        the scheduler made it, or without one), patched to follow the user's
        spec.runPolicy.suspend."""
        query = scheduler.admission_query(backend_job)
        if query is None:
            return None
        kind, selector = query
        try:
            found = self.kube.list(kind, job.namespace, selector)
        except ApiError as err:
            if err.status == 404:  # the scheduler's CRDs are not installed
                return None
            raise
        if not found:
            return None
        record, suspend = found[0], job.spec.run_policy.suspend
        if (patch := scheduler.follow_suspend(record, suspend)) is not None:
            name = record["metadata"]["name"]
            log.info("%s/%s: %s %s %s follows spec.runPolicy.suspend=%s", job.namespace, job.name,
                     scheduler.name, kind, name, suspend)  # fmt: skip
            record = self.kube.patch(kind, job.namespace, name, patch)
        return record

    def _read_progress(self, r: _Pass, backend_job: Obj | None, now: str) -> Obj | None:
        """Rank 0's progress while the job runs, at most once per `progress_period`; None
        when not due, not running, or the endpoint cannot be read (the last reading stays)."""
        job, attempt, old = r.job, r.attempt, r.old_status.get("progress")
        key = (job.namespace, job.name)
        if self.progress_period <= 0 or not _is_running(backend_job):
            return None
        if self.clock() - self._progress_read_at.get(key, -math.inf) < self.progress_period:
            return None
        self._progress_read_at[key] = self.clock()
        ips = [
            p["status"]["podIP"]
            for p in self.kube.list("Pod", job.namespace, r.backend.rank0_selector(job.name))
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
        if saved := goodput.checkpointed_at(old, reading, now):  # a failure's loss starts there
            reading["checkpointedAt"] = saved
        return reading

    def _write_status(
        self, body: Obj, old_status: Obj, new_status: Obj, reason: str, message: str
    ) -> None:
        meta = body["metadata"]
        self._job_metrics(meta["namespace"], meta["name"], old_status, new_status)
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

    def _job_metrics(self, namespace: str, name: str, old_status: Obj, new_status: Obj) -> None:
        """The job's phase, the failure the new status records and the old did not, and its
        goodput now."""
        self.metrics.jobs.set(namespace, name, new_status["phase"])
        if cause := faults.newly_failed(old_status, new_status):
            self.metrics.job_failure(namespace, name, cause)
        if gp := new_status.get("goodput"):
            now = utcnow()
            lost, ratio = goodput.lost_seconds(gp, now), goodput.ratio(gp, now)
            self.metrics.job_goodput_set(namespace, name, lost, ratio)


def _where(meta: Obj) -> tuple[str, str]:
    return meta["namespace"], meta["name"]


def _is_running(backend_job: Obj | None) -> bool:
    conditions = (backend_job or {}).get("status", {}).get("conditions", [])
    return any(c.get("type") == "Running" and c.get("status") == "True" for c in conditions)


def _phase_message(status: Obj) -> str:
    phase = status["phase"]
    for cond in status.get("conditions", []):
        if cond["type"] == phase and cond.get("message"):
            return f"{phase}: {cond['message']}"
    return f"MegatronJob is {phase}"
