"""Selectors: pick one row among the instances that survived the filters.

Rows arrive in ascending order, which is instance-id order, so "the first of equals" is the
documented deterministic tie-break everywhere (upstream breaks ties by Go map order).

- `MetricSelector(metrics, top_k)`: lexicographic best over `metrics` in order (a tie on one
  metric falls through to the next, then to instance id); with `top_k > 1`, a uniform random
  pick among the best `top_k` (`--dispatch-top-k`).
- `RandomSelector`: uniform random.
- `RoundRobinSelector`: the first instance whose id sorts after the last one picked.
- `PowerOfTwoSelector(metric)`: two distinct random candidates, the better by `metric`.
- `FixedPreferenceSelector` (flood): the last instance picked while it is still a candidate,
  otherwise the first candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prescient.policy.framework import Metric, SchedulingContext


def _oriented(metric: Metric, ctx: SchedulingContext, rows: np.ndarray) -> np.ndarray:
    values = ctx.metric(metric)[rows]
    return values if metric.lower_is_better else -values


class MetricSelector:
    """Best by `metrics` in order; random among the best `top_k` when `top_k > 1`."""

    def __init__(self, metrics: Sequence[Metric], top_k: int = 1) -> None:
        if not metrics:
            raise ValueError("MetricSelector needs at least one metric")
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        self.metrics = tuple(metrics)
        self.top_k = top_k
        # the first least value of one lower-is-better metric: `Pipeline` may shortcut it
        single = len(self.metrics) == 1 and top_k == 1 and self.metrics[0].lower_is_better
        self.argmin_metric = self.metrics[0] if single else None

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        if len(self.metrics) == 1 and self.top_k == 1:
            return int(rows[np.argmin(_oriented(self.metrics[0], ctx, rows))])
        if self.top_k == 1:
            return self._best(ctx, rows)
        keys = [_oriented(m, ctx, rows) for m in reversed(self.metrics)]
        order = np.lexsort([np.arange(len(rows)), *keys])  # last key sorts first
        if self.top_k == 1:
            return int(rows[order[0]])
        best = order[: self.top_k]
        return int(rows[best[ctx.rng.randrange(len(best))]])

    def _best(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        """The lexicographic best, as the full sort would pick it (NaN last), by narrowing
        the ties metric by metric: a later metric is read only over the earlier one's ties,
        and a sort of thousands of rows costs more than the rest of a decision."""
        for metric in self.metrics:
            values = _oriented(metric, ctx, rows)
            known = ~np.isnan(values)
            if known.any():
                rows = rows[values == values[known].min()]
            if len(rows) == 1:
                break
        return int(rows[0])


class RandomSelector:
    """Uniform random choice with the policy's seeded rng."""

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        return int(rows[ctx.rng.randrange(len(rows))])


class RoundRobinSelector:
    """Cycles through candidates in id order, resuming after the last pick."""

    def __init__(self) -> None:
        self._last: str | None = None

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        pos = 0
        if self._last is not None:
            pos = int(np.searchsorted(rows, ctx.state.first_row_after(self._last)))
        row = int(rows[pos if pos < len(rows) else 0])
        self._last = ctx.state.ids[row]
        return row


class PowerOfTwoSelector:
    """Two distinct random candidates; the better by `metric` (the first drawn on ties)."""

    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        if len(rows) == 1:
            return int(rows[0])
        a, b = ctx.rng.sample(range(len(rows)), 2)
        values = _oriented(self.metric, ctx, rows)
        return int(rows[b] if values[b] < values[a] else rows[a])


class FixedPreferenceSelector:
    """Floods one instance: keep the last pick while it remains a candidate."""

    def __init__(self) -> None:
        self._preferred: str | None = None

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        row = None if self._preferred is None else ctx.state.row(self._preferred)
        if row is None or row not in rows:
            row = int(rows[0])
            self._preferred = ctx.state.ids[row]
        return row
