"""Pair selectors: which sources migrate to which destinations (reference §7.2, §5.3).

Each gets the filtered source and destination rows (ascending, i.e. instance-id order) and
returns `(src_row, dst_row)` pairs, never a self-pair.

- `MetricBalance(metric, scope, min_gap)`: sources by load, worst first, destinations by load,
  best first (ties by instance id); the i-th source pairs with the i-th destination while the
  destination is strictly less loaded, stopping at the first pair that would not improve. Scope
  `unit` balances within each `unit_id` group separately. Then upstream's
  `acceptLoadImbalancePairs`: with `min_gap > 0` (`--rescheduling-load-balance-threshold`), a
  pair stays only if the source's load exceeds the destination's by at least `min_gap`.
- `RoundRobinPairs`: sources and destinations in id order; source i goes to destination
  `i mod len(destinations)` (a self-pair is skipped). Failover spreads a failed domain's
  requests over the healthy instances.
- `MitigationPair(tpot)`: one pair, the highest predicted TPOT source to the highest predicted
  TPOT destination (bin-packing: the fullest instance that still meets the SLO).
- `ConsolidationPair(tpot, reservations)`: one pair, the lowest predicted TPOT source to the
  reserved decode instance if it is a destination, else to the highest predicted TPOT one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from prescient.policy.framework import Metric, SchedulingContext
from prescient.rescheduler.filters import Reservations

Pairs = list[tuple[int, int]]


class PairSelector(Protocol):
    """Pairs source rows with destination rows."""

    def select(self, ctx: SchedulingContext, src: np.ndarray, dst: np.ndarray) -> Pairs: ...


def _oriented(metric: Metric, ctx: SchedulingContext) -> np.ndarray:
    """The metric with lower always better."""
    values = ctx.metric(metric)
    return values if metric.lower_is_better else -values


class MetricBalance:
    """Most loaded sources to least loaded destinations while that improves the balance."""

    def __init__(self, metric: Metric, scope: str = "cluster", min_gap: float = 0.0) -> None:
        if scope not in ("cluster", "unit"):
            raise ValueError(f"scope must be cluster or unit, got {scope!r}")
        self.metric = metric
        self.scope = scope
        self.min_gap = min_gap

    def select(self, ctx: SchedulingContext, src: np.ndarray, dst: np.ndarray) -> Pairs:
        load = _oriented(self.metric, ctx)
        if self.scope == "cluster":
            return self._balance(load, src, dst)
        unit = ctx.state.unit
        pairs: Pairs = []
        for u in np.unique(unit[src]):
            pairs += self._balance(load, src[unit[src] == u], dst[unit[dst] == u])
        return pairs

    def _balance(self, load: np.ndarray, src: np.ndarray, dst: np.ndarray) -> Pairs:
        sources = src[np.argsort(-load[src], kind="stable")]
        destinations = dst[np.argsort(load[dst], kind="stable")]
        pairs: Pairs = []
        for s, d in zip(sources, destinations, strict=False):
            if not load[d] < load[s]:
                break
            if self.min_gap <= 0 or load[s] - load[d] >= self.min_gap:
                pairs.append((int(s), int(d)))
        return pairs


class RoundRobinPairs:
    """Sources in id order, spread over destinations in id order."""

    def select(self, ctx: SchedulingContext, src: np.ndarray, dst: np.ndarray) -> Pairs:
        if not len(dst):
            return []
        pairs = [(int(s), int(dst[i % len(dst)])) for i, s in enumerate(src)]
        return [(s, d) for s, d in pairs if s != d]


def _highest(values: np.ndarray, rows: np.ndarray) -> int:
    """The row with the highest value (the first in id order among equals)."""
    return int(rows[np.argmax(values[rows])])


class MitigationPair:
    """The hottest source to the fullest destination still under the SLO."""

    def __init__(self, tpot: Metric) -> None:
        self.tpot = tpot

    def select(self, ctx: SchedulingContext, src: np.ndarray, dst: np.ndarray) -> Pairs:
        if not len(src):
            return []
        tpot = ctx.metric(self.tpot)
        s = _highest(tpot, src)
        dst = dst[dst != s]
        return [(s, _highest(tpot, dst))] if len(dst) else []


class ConsolidationPair:
    """The least loaded source to the reserved decode instance, else the fullest destination."""

    def __init__(self, tpot: Metric, reservations: Reservations) -> None:
        self.tpot = tpot
        self.reservations = reservations

    def select(self, ctx: SchedulingContext, src: np.ndarray, dst: np.ndarray) -> Pairs:
        if not len(src):
            return []
        tpot = ctx.metric(self.tpot)
        s = int(src[np.argmin(tpot[src])])
        dst = dst[dst != s]
        if not len(dst):
            return []
        reserved = ctx.state.row(self.reservations.decode or "")
        d = reserved if reserved is not None and reserved in dst else _highest(tpot, dst)
        return [(s, int(d))]
