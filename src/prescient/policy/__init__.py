"""The scheduling core: dispatch framework, plugins and policies. No I/O, no wall clock."""

from prescient.policy.framework import (
    DispatchPolicy,
    Filter,
    Metric,
    Pipeline,
    PipelinePolicy,
    SchedulingContext,
    Selector,
)
from prescient.policy.registry import POLICIES, make_policy
from prescient.policy.view import ClusterView, InstanceView

__all__ = [
    "POLICIES",
    "ClusterView",
    "DispatchPolicy",
    "Filter",
    "InstanceView",
    "Metric",
    "Pipeline",
    "PipelinePolicy",
    "SchedulingContext",
    "Selector",
    "make_policy",
]
