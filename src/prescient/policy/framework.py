"""The dispatch framework: per infer type, metrics -> filters -> selector (Llumnix's shape).

A `PipelinePolicy` holds one `Pipeline` per infer type. Scheduling a request builds a
`SchedulingContext` (request, view, `now`, the seeded `rng`, and a per-call metric memo), keeps
the instances of the wanted infer type, runs every filter, and asks the selector for one
instance. If the filters leave nothing, a fallback pass reruns them without the soft ones, as
upstream does. Each plugin kind is a one-method protocol; see `docs/policies.md` to add one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from prescient.model import Decision, InferType, Placement, Request
from prescient.policy.view import ClusterView, InstanceView


class SchedulingContext:
    """Everything one scheduling call may look at. Metric values are memoised per call."""

    __slots__ = ("_memo", "now", "request", "rng", "view")

    def __init__(self, request: Request, view: ClusterView, now: float, rng: random.Random):
        self.request = request
        self.view = view
        self.now = now  # seconds
        self.rng = rng
        self._memo: dict[tuple[str, str], float] = {}

    def metric(self, metric: Metric, instance: InstanceView) -> float:
        key = (metric.name, instance.instance_id)
        value = self._memo.get(key)
        if value is None:
            value = self._memo[key] = metric.value(instance, self)
        return value


class Metric(Protocol):
    """A number per instance; `lower_is_better` says which way is good."""

    name: str
    lower_is_better: bool

    def value(self, instance: InstanceView, ctx: SchedulingContext) -> float: ...


class Filter(Protocol):
    """Drops candidates. A soft filter (`soft = True`) is skipped in the fallback pass."""

    soft: bool

    def filter(self, candidates: list[InstanceView], ctx: SchedulingContext) -> list[InstanceView]:
        ...


class Selector(Protocol):
    """Picks one candidate (or None)."""

    def select(self, candidates: list[InstanceView], ctx: SchedulingContext) -> InstanceView | None:
        ...


class Pipeline:
    """Filters then a selector, for one infer type."""

    __slots__ = ("filters", "selector")

    def __init__(self, filters: Sequence[Filter], selector: Selector) -> None:
        self.filters = tuple(filters)
        self.selector = selector

    def pick(self, candidates: list[InstanceView], ctx: SchedulingContext) -> InstanceView | None:
        survivors = self._filter(candidates, ctx, fallback=False)
        if not survivors and any(f.soft for f in self.filters):
            survivors = self._filter(candidates, ctx, fallback=True)
        return self.selector.select(survivors, ctx) if survivors else None

    def _filter(
        self, candidates: list[InstanceView], ctx: SchedulingContext, *, fallback: bool
    ) -> list[InstanceView]:
        for f in self.filters:
            if fallback and f.soft:
                continue
            candidates = f.filter(candidates, ctx)
        return candidates


class DispatchPolicy(Protocol):
    """Chooses where a request runs. `on_*` hooks tell it what became of its choices."""

    name: str

    def schedule(self, request: Request, view: ClusterView, now: float) -> Decision: ...

    def on_dispatched(self, decision: Decision, request: Request, now: float) -> None: ...

    def on_finished(self, request_id: str, now: float) -> None: ...


class PipelinePolicy:
    """A dispatch policy made of one pipeline per infer type (neutral scheduling mode)."""

    def __init__(
        self, name: str, pipelines: dict[InferType, Pipeline], rng: random.Random
    ) -> None:
        self.name = name
        self.pipelines = pipelines
        self.rng = rng

    def schedule(self, request: Request, view: ClusterView, now: float) -> Decision:
        ctx = SchedulingContext(request, view, now, self.rng)
        pipeline = self.pipelines[InferType.NEUTRAL]
        chosen = pipeline.pick(view.of_type(InferType.NEUTRAL), ctx)
        if chosen is None:
            return Decision(request.request_id)
        return Decision(request.request_id, (Placement(chosen.instance_id),))

    def on_dispatched(self, decision: Decision, request: Request, now: float) -> None:
        """No-op: stateless policies learn nothing from dispatches."""

    def on_finished(self, request_id: str, now: float) -> None:
        """No-op: stateless policies learn nothing from completions."""
