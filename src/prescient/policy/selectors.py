"""Selectors: pick one instance among the filtered candidates.

- `MetricSelector`: lexicographic best over metrics (ties fall through to the next metric, then
  to instance id order); with `top_k > 1`, a uniform random pick among the best `top_k`.
- `RandomSelector`: uniform random.
- `RoundRobinSelector`: the next instance id after the last one picked.
- `PowerOfTwoSelector`: two distinct random candidates, the better by one metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prescient.policy.framework import Metric, SchedulingContext
from prescient.policy.view import InstanceView


def _key(
    metrics: Sequence[Metric], ctx: SchedulingContext
) -> Callable[[InstanceView], tuple[float, ...]]:
    def key(inst: InstanceView) -> tuple[float, ...]:
        return tuple(
            ctx.metric(m, inst) if m.lower_is_better else -ctx.metric(m, inst) for m in metrics
        )

    return key


class MetricSelector:
    """Best by `metrics` in order; random among the best `top_k` when `top_k > 1`."""

    def __init__(self, metrics: Sequence[Metric], top_k: int = 1) -> None:
        if not metrics:
            raise ValueError("MetricSelector needs at least one metric")
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        self.metrics = tuple(metrics)
        self.top_k = top_k

    def select(self, candidates: list[InstanceView], ctx: SchedulingContext) -> InstanceView | None:
        if not candidates:
            return None
        key = _key(self.metrics, ctx)
        if self.top_k == 1:
            return min(candidates, key=key)  # first of equals: candidates are in id order
        ranked = sorted(candidates, key=key)[: self.top_k]
        return ranked[ctx.rng.randrange(len(ranked))]


class RandomSelector:
    """Uniform random choice with the policy's seeded rng."""

    def select(self, candidates: list[InstanceView], ctx: SchedulingContext) -> InstanceView | None:
        return candidates[ctx.rng.randrange(len(candidates))] if candidates else None


class RoundRobinSelector:
    """Cycles through candidates in id order, resuming after the last pick."""

    def __init__(self) -> None:
        self._last = ""

    def select(self, candidates: list[InstanceView], ctx: SchedulingContext) -> InstanceView | None:
        if not candidates:
            return None
        chosen = next((c for c in candidates if c.instance_id > self._last), candidates[0])
        self._last = chosen.instance_id
        return chosen


class PowerOfTwoSelector:
    """Samples two distinct candidates and keeps the better by `metric` (first on ties)."""

    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def select(self, candidates: list[InstanceView], ctx: SchedulingContext) -> InstanceView | None:
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        a, b = ctx.rng.sample(candidates, 2)
        key = _key((self.metric,), ctx)
        return b if key(b) < key(a) else a
