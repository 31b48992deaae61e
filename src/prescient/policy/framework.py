"""The dispatch framework: per infer type, metrics -> filters -> selector (Llumnix's shape).

Everything works on whole columns of a `ClusterState`: a metric returns one value per instance
row, a filter returns a keep-mask, a selector picks one row among the surviving ones. One
scheduling call builds a `SchedulingContext` (request, state, `now`, the seeded `rng`, a metric
memo, and per-request inputs such as prefix hits), then `Pipeline.pick`:

    1. every single-instance filter runs on every candidate (schedulability and staleness also
       mark instances that need failover, so none may short-circuit);
    2. global filters run on the result (failover drops the failed instances' domains);
    3. if nothing survives, the pass reruns without the soft filters (upstream's fallback);
    4. the selector picks a row.

Each plugin kind is a one-method protocol; `docs/policies.md` shows how to add one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from prescient.cms.view import ProfilingSample
from prescient.model import Request
from prescient.policy.state import ClusterState


class SchedulingContext:
    """Everything one scheduling call may look at. Metric columns are memoised per call.

    The optional per-request columns are filled by features before the pipeline runs:
    `prefix_hit_tokens` (cache-aware), `predicted_computed_tokens` (predictor-enhanced),
    `predicted_ttft_ms` / `predicted_tpot_ms` (SLO-aware). None means the feature is off.
    `prefix_miss_weight` is what one missed prompt token counts in the cache-aware cost.
    `fallback` is True while the pipeline runs its pass without the soft filters (a selector
    may choose differently then, as adaptive PD's decode selector does).
    """

    __slots__ = ("_candidates", "_memo", "_needs_failover", "fallback", "now",
                 "predicted_computed_tokens", "predicted_tpot_ms", "predicted_ttft_ms",
                 "prefix_hit_tokens", "prefix_miss_weight", "request", "rng", "state")

    def __init__(self, request: Request, state: ClusterState, now: float, rng: random.Random):
        self.request = request
        self.state = state
        self.now = now  # seconds
        self.rng = rng
        # made on first use: most decisions never look at them (`Pipeline`'s cached masks)
        self._needs_failover: np.ndarray | None = None
        self._candidates: np.ndarray | None = None
        self.fallback = False
        self.prefix_hit_tokens: np.ndarray | None = None
        self.prefix_miss_weight = 1.0
        self.predicted_computed_tokens: np.ndarray | None = None
        self.predicted_ttft_ms: np.ndarray | None = None
        self.predicted_tpot_ms: np.ndarray | None = None
        self._memo: dict[str, np.ndarray] = {}

    @property
    def needs_failover(self) -> np.ndarray:
        """Rows marked by schedulability/staleness filters as needing failover."""
        if self._needs_failover is None:
            self._needs_failover = np.zeros(len(self.state), bool)
        return self._needs_failover

    @needs_failover.setter
    def needs_failover(self, value: np.ndarray) -> None:
        self._needs_failover = value

    @property
    def candidates(self) -> np.ndarray:
        """The rows the pipeline started from (a mask)."""
        if self._candidates is None:
            self._candidates = np.zeros(len(self.state), bool)
        return self._candidates

    @candidates.setter
    def candidates(self, value: np.ndarray) -> None:
        self._candidates = value

    def metric(self, metric: Metric) -> np.ndarray:
        values = self._memo.get(metric.name)
        if values is None:
            values = self._memo[metric.name] = metric.compute(self)
        return values


class Metric(Protocol):
    """One value per instance row; `lower_is_better` says which way is good."""

    name: str
    lower_is_better: bool

    def compute(self, ctx: SchedulingContext) -> np.ndarray: ...


class Filter(Protocol):
    """A keep-mask over instance rows. Soft filters are skipped in the fallback pass.

    A filter may declare `static = True`: its mask (and the failover marks it sets) depend only
    on the instances' metadata and statuses, and on the clock no sooner than its optional
    `valid_until(ctx)` (seconds; absent: never). A soft filter that keeps exactly the rows
    whose lower-is-better metric `m` is below `t` may say so with `soft_bound = (m, t)`.
    See `Pipeline` for what both buy.
    """

    soft: bool

    def keep(self, ctx: SchedulingContext) -> np.ndarray: ...


class GlobalFilter(Protocol):
    """Looks at the whole candidate set at once (e.g. failover domains).

    `static = True` here also promises `apply(ctx, keep) == keep & apply(ctx, all rows)`: it
    only removes rows, and which ones does not depend on `keep`.
    """

    soft: bool

    def apply(self, ctx: SchedulingContext, keep: np.ndarray) -> np.ndarray: ...


class Selector(Protocol):
    """Picks one of `rows` (ascending instance rows, never empty).

    A selector that picks the first row of least `m` (a lower-is-better metric, NaN first as
    `np.argmin` has it) may say so with `argmin_metric = m`.
    """

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int: ...


class Feature(Protocol):
    """Fills a request's context columns before the pipelines run (prefix hits, predictions).

    `on_statuses` runs after each CMS status poll has been applied (e.g. to learn from the
    profiling samples the poll brought).
    """

    def prepare(self, ctx: SchedulingContext) -> None: ...

    def on_statuses(self, state: ClusterState, samples: Sequence[ProfilingSample], now: float
                    ) -> None: ...


class PlacementObserver(Protocol):
    """Hears each placement the dispatcher makes (after the whole decision is made)."""

    def on_placed(self, request: Request, instance_id: str, state: ClusterState, now: float
                  ) -> None: ...


# a metric's values at a few rows in plain Python, or None (`LinearMetric.values_at`)
ValuesAt = Callable[[SchedulingContext, list[int]], list[float] | None]

# Up to this many rows a `LinearMetric` is read in plain Python: below it numpy's fixed cost
# per call is more than the arithmetic (bench/schedule_release.py --instances N).
PLAIN_ROWS = 16


class _StaticMask(NamedTuple):
    keep: np.ndarray
    needs_failover: np.ndarray
    valid_until: float
    rows: np.ndarray  # np.flatnonzero(keep)
    few_rows: list[int] | None  # `rows` as a list, when there are at most PLAIN_ROWS


def _least(ctx: SchedulingContext, metric: Metric, hit: _StaticMask) -> tuple[int, float]:
    """The first of the static rows with the least `metric`, and its value (NaN is least), on
    the numpy column."""
    rows = hit.rows
    column = ctx.metric(metric)
    if len(rows) != len(column):
        column = column[rows]
    i = int(column.argmin())
    return int(rows[i]), column[i]


class Pipeline:
    """Filters, then global filters, then a selector, for one infer type.

    When every global filter is static, the static filters' part of a pass (health, infer type,
    failover domains: most of its numpy work) is computed once per state version and kept
    until the clock passes the earliest `valid_until`; only the request-dependent filters
    (metric thresholds) run on every call. The result is the same mask either way.

    Load-balance's shape, one soft `soft_bound` filter on metric `m` besides static hard ones
    and an `argmin_metric` selector on the same `m`, is decided without the filter pass: the
    first least `m` among the static rows is the answer whenever it is below the bound (every
    row at that least value passes the bound then, and the selector would pick the same first
    one among the rows that pass); otherwise (all over the bound, or NaN) the full passes run.
    Such a decision leaves `ctx.needs_failover` unset: only filters read it, and the dynamic
    filter here does not.
    """

    __slots__ = ("_argmin", "_cacheable", "_dynamic", "_masks", "_static", "_static_version",
                 "filters", "global_filters", "selector")

    def __init__(
        self,
        filters: Sequence[Filter],
        selector: Selector,
        global_filters: Sequence[GlobalFilter] = (),
    ) -> None:
        self.filters = tuple(filters)
        self.global_filters = tuple(global_filters)
        self.selector = selector
        cacheable = self._cacheable = all(getattr(g, "static", False)
                                          for g in self.global_filters)
        self._static = tuple(f for f in self.filters if cacheable and getattr(f, "static", False))
        self._dynamic = tuple(f for f in self.filters if f not in self._static)
        self._masks: dict[tuple[bool, bytes], _StaticMask] = {}
        self._static_version = -1
        self._argmin = self._argmin_bound()

    def _argmin_bound(self) -> tuple[Metric, float, ValuesAt | None] | None:
        """(m, t, m's `values_at`) when the pipeline has load-balance's shape (see the class
        doc), else None."""
        if not self._cacheable or len(self._dynamic) != 1:
            return None
        bound = getattr(self._dynamic[0], "soft_bound", None)
        if bound is None or getattr(self.selector, "argmin_metric", None) is not bound[0]:
            return None
        if any(f.soft for f in (*self._static, *self.global_filters)):
            return None  # the fallback pass would start from another static mask
        return bound[0], bound[1], getattr(bound[0], "values_at", None)

    @property
    def has_soft_filters(self) -> bool:
        return any(f.soft for f in (*self.filters, *self.global_filters))

    def pick(self, ctx: SchedulingContext, candidates: np.ndarray) -> int | None:
        """The chosen row among `candidates` (a mask), or None when nothing is available."""
        if self._argmin is not None:
            metric, bound, values_at = self._argmin
            hit = self._static_entry(ctx, candidates, False)
            few = hit.few_rows
            values = values_at(ctx, few) if few and values_at is not None else None
            if values is not None:  # the first least in plain Python
                least = min(values)
                if least < bound:
                    return few[values.index(least)]  # type: ignore[index]
            elif len(hit.rows):
                row, value = _least(ctx, metric, hit)
                if value < bound:
                    return row
            else:
                return None  # the fallback pass has the same static rows
        keep = self.filter(ctx, candidates, fallback=False)
        if not keep.any() and candidates.any() and self.has_soft_filters:
            keep = self.filter(ctx, candidates, fallback=True)
        rows = np.flatnonzero(keep)
        return int(self.selector.select(ctx, rows)) if len(rows) else None

    def filter(self, ctx: SchedulingContext, candidates: np.ndarray, *, fallback: bool
               ) -> np.ndarray:
        """One filter pass over `candidates`; the fallback pass skips soft filters."""
        ctx.candidates = candidates
        ctx.fallback = fallback
        if not self._static:
            ctx.needs_failover = np.zeros(len(candidates), bool)
            keep = candidates.copy()
            self._run(ctx, keep, self.filters, fallback)
            for g in self.global_filters:
                if not (fallback and g.soft):
                    keep = g.apply(ctx, keep)
            return keep
        keep = self._static_mask(ctx, candidates, fallback)
        self._run(ctx, keep, self._dynamic, fallback)
        return keep

    @staticmethod
    def _run(ctx: SchedulingContext, keep: np.ndarray, filters: Sequence[Filter],
             fallback: bool) -> None:
        for f in filters:
            if not (fallback and f.soft):
                keep &= f.keep(ctx)

    def _static_mask(self, ctx: SchedulingContext, candidates: np.ndarray, fallback: bool
                     ) -> np.ndarray:
        """The static filters' and global filters' mask (a copy), from the cache if valid;
        leaves their failover marks in `ctx.needs_failover`."""
        hit = self._static_entry(ctx, candidates, fallback)
        ctx.needs_failover = hit.needs_failover.copy()
        return hit.keep.copy()

    def _static_entry(self, ctx: SchedulingContext, candidates: np.ndarray, fallback: bool
                      ) -> _StaticMask:
        """The cached static pass over `candidates` (computed now if missing or expired)."""
        if self._static_version != ctx.state.version:
            self._masks.clear()
            self._static_version = ctx.state.version
        key = (fallback, candidates.tobytes())
        hit = self._masks.get(key)
        if hit is None or ctx.now >= hit.valid_until:
            ctx.candidates = candidates
            ctx.needs_failover = np.zeros(len(candidates), bool)
            keep = candidates.copy()
            self._run(ctx, keep, self._static, fallback)
            for g in self.global_filters:
                if not (fallback and g.soft):
                    keep = g.apply(ctx, keep)
            until = min((f.valid_until(ctx) for f in self._static  # type: ignore[attr-defined]
                         if hasattr(f, "valid_until")), default=math.inf)
            rows = np.flatnonzero(keep)
            hit = self._masks[key] = _StaticMask(
                keep, ctx.needs_failover.copy(), until, rows,
                rows.tolist() if len(rows) <= PLAIN_ROWS else None)
        return hit
