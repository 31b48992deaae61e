"""The filters rescheduling adds to the dispatch ones (reference §3.3).

Sources and destinations are filtered with the dispatch framework's filters (`policy/filters.py`:
schedulability, staleness, infer type, metric thresholds, failover domains); these three complete
upstream's rescheduling set:

- `AtLeast(filter)` (upstream's inverted wrapper): keeps exactly what a `MetricThreshold` would
  drop, so "load >= threshold" is a source and "load < threshold" a destination.
- `FailoverSources(staleness_s, domain)` (global): runs schedulability and staleness over every
  instance with a status, widens the failed ones to their failure domain and keeps **only** that
  set: the instances whose requests must leave.
- `NotReserved(role)`: drops adaptive PD's reserved prefill or decode instance (it lives with
  the reservations in `policy/adaptive_pd.py`, which dispatch uses too).
"""

from __future__ import annotations

import numpy as np

from prescient.policy.adaptive_pd import NoReservations, NotReserved, Reservations
from prescient.policy.filters import Failover, Fresh, MetricThreshold, Schedulable
from prescient.policy.framework import SchedulingContext

__all__ = ["AtLeast", "FailoverSources", "NoReservations", "NotReserved", "Reservations"]


class AtLeast:
    """Keeps instances whose metric is at or beyond the threshold (inverts `MetricThreshold`)."""

    soft = False

    def __init__(self, inner: MetricThreshold) -> None:
        self.inner = inner

    def keep(self, ctx: SchedulingContext) -> np.ndarray:
        return ~self.inner.keep(ctx)


class FailoverSources:
    """Keeps only instances that need failover, widened to their failure domains."""

    soft = False

    def __init__(self, staleness_s: float, domain: str) -> None:
        self.health = (Schedulable(), Fresh(staleness_s))
        self.domain = Failover(domain)

    def apply(self, ctx: SchedulingContext, keep: np.ndarray) -> np.ndarray:
        for f in self.health:
            f.keep(ctx)  # marks ctx.needs_failover
        candidates = ctx.candidates
        ctx.candidates = ctx.state.has_status  # failures anywhere count, not only candidates'
        failed = ~self.domain.apply(ctx, np.ones(len(ctx.state), bool))
        ctx.candidates = candidates
        return keep & failed
