"""No queue: the pods go straight to the scheduler their `schedulerName` names. Pure.

A MegatronJob without `spec.scheduling.queue` (and not for Volcano) is created running, and the
pods wait for nodes like any others; `spec.scheduling.schedulerName` (a custom scheduler) and
`minAvailable` (the training-operator's PodGroup, when it runs with a gang scheduler such as
scheduler-plugins) are rendered as they are. Topology placement is Kueue's, so a topology is
refused.
"""

from __future__ import annotations

from kubetron_operator.scheduling.interface import Scheduler


class Default(Scheduler):
    """The cluster's scheduler, or the one `schedulerName` names (the base behaviour)."""

    name = "default"
