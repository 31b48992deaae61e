"""The scheduling core: cluster columns, metrics, filters, selectors, policies, accounts.

No I/O and no wall clock: time comes in as `now`, randomness as a seeded `random.Random`.
"""

from prescient.policy.dispatcher import Dispatcher, SchedulingMode
from prescient.policy.framework import (
    Feature,
    Filter,
    GlobalFilter,
    Metric,
    Pipeline,
    PlacementObserver,
    SchedulingContext,
    Selector,
)
from prescient.policy.metrics import METRIC_NAMES, make_metric
from prescient.policy.registry import POLICIES, DispatchSettings, make_dispatcher
from prescient.policy.state import ClusterState

__all__ = [
    "METRIC_NAMES",
    "POLICIES",
    "ClusterState",
    "DispatchSettings",
    "Dispatcher",
    "Feature",
    "Filter",
    "GlobalFilter",
    "Metric",
    "Pipeline",
    "PlacementObserver",
    "SchedulingContext",
    "SchedulingMode",
    "Selector",
    "make_dispatcher",
    "make_metric",
]
