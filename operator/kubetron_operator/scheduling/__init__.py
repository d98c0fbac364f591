"""Scheduling: the one seam through which Kueue, Volcano or no queue reach a job.

`choose` picks the job's `Scheduler` once, from its `spec.scheduling` (the operator has no
setting of its own for it: a cluster without Kueue leaves a queued job waiting for its Workload,
with that reason in the Queued condition). The plan carries the choice (`Plan.scheduler`), so
render, the controller's apply and assessment, and the status all ask the same object
(`interface.py` says what each step asks).
"""

from __future__ import annotations

from kubetron_api.v1alpha1 import SchedulingSpec
from kubetron_operator.scheduling.default import Default
from kubetron_operator.scheduling.interface import QUEUED, VOLCANO, Scheduler
from kubetron_operator.scheduling.kueue import Kueue, local_queue
from kubetron_operator.scheduling.volcano import Volcano

__all__ = ["QUEUED", "Default", "Kueue", "Scheduler", "Volcano", "choose"]


def choose(spec: SchedulingSpec) -> Scheduler:
    """Kueue when the job names a LocalQueue, Volcano when its pods go to Volcano (whose queue
    `spec.scheduling.queue` then is), else the default."""
    if local_queue(spec):
        return Kueue(spec)
    if spec.scheduler_name == VOLCANO:
        return Volcano(spec)
    return Default(spec)
