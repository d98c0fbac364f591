"""Volcano: a gang of pods through the training-operator's PodGroup. Pure.

A MegatronJob with `spec.scheduling.schedulerName: volcano` has its pods scheduled by Volcano,
and its `spec.scheduling.queue` is a Volcano queue, not a Kueue LocalQueue. The operator only
renders: the pods' `schedulerName`, and the PyTorchJob's `runPolicy.schedulingPolicy`
(minAvailable, queue, priorityClass), which a training-operator started with
`--gang-scheduler-name=volcano` turns into the job's Volcano `PodGroup`. Volcano starts the pods
once the whole gang fits, so nothing is created suspended and there is no admission to read:
until then the pods are Pending, and so is the job. Topology placement is Kueue's, so a
topology is refused.
"""

from __future__ import annotations

from kubetron_operator.scheduling.interface import VOLCANO, Scheduler


class Volcano(Scheduler):
    """Pods scheduled by Volcano, as one PodGroup (the base behaviour: nothing queues)."""

    name = VOLCANO
