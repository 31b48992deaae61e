"""Filters: which instances may take the request.

Single-instance filters return a keep-mask over rows; global filters see the whole set.

- `MetricThreshold(metric, threshold, soft)`: keeps values below the threshold (above it for
  higher-is-better metrics). Soft thresholds (load-balance) are dropped in the fallback pass,
  so when every instance is over, the least loaded still wins; hard ones (SLO) are not.
- `Schedulable`: keeps instances whose last status says `schedulable`; marks the others as
  needing failover.
- `Fresh(staleness_s)`: keeps instances whose last status is at most `staleness_s` old
  (`--instance-staleness-seconds`); marks the others as needing failover.
- `OfInferType(t)`: keeps instances of one infer type.
- `Failover(domain)` (global): drops every candidate in the failure domain of an instance that
  needs failover: `instance` (itself), `node` (same node id), `instance-unit` (same unit id, when
  data parallelism is on; else as `instance`), `node-unit` (the node's instances, widened to their
  units when data parallelism is on).
- `BalanceGuard(metric, abs, rel)` (global, soft): drops candidates whose load exceeds the least
  loaded candidate's by more than `abs` AND more than `rel` times (SGLang's imbalance rule,
  applied per candidate); cache-aware dispatch uses it so prefix affinity cannot pile requests
  onto one instance.
"""

from __future__ import annotations

import math

import numpy as np

from prescient.errors import ConfigError
from prescient.model import InferType
from prescient.policy.framework import Metric, SchedulingContext
from prescient.policy.state import INFER_CODES

FAILOVER_DOMAINS = ("instance", "node", "instance-unit", "node-unit")


class MetricThreshold:
    """Keeps instances whose metric is better than `threshold`."""

    def __init__(self, metric: Metric, threshold: float, *, soft: bool = True) -> None:
        self.metric = metric
        self.threshold = threshold
        self.soft = soft
        # what `Pipeline` may decide without running this filter (see there)
        self.soft_bound = (metric, threshold) if soft and metric.lower_is_better else None

    def keep(self, ctx: SchedulingContext) -> np.ndarray:
        values = ctx.metric(self.metric)
        if self.metric.lower_is_better:
            return values < self.threshold
        return values > self.threshold


class Schedulable:
    """Keeps schedulable instances; the others need failover."""

    soft = False
    static = True

    def keep(self, ctx: SchedulingContext) -> np.ndarray:
        ok = ctx.state.schedulable
        ctx.needs_failover |= ~ok & ctx.state.has_status
        return ok


class Fresh:
    """Keeps instances whose status is recent enough; stale ones need failover."""

    soft = False
    static = True

    def __init__(self, staleness_s: float) -> None:
        self.staleness_s = staleness_s

    def keep(self, ctx: SchedulingContext) -> np.ndarray:
        age_s = (ctx.now * 1000.0 - ctx.state.s("timestamp_ms")) / 1000.0
        ok = age_s <= self.staleness_s
        ctx.needs_failover |= ~ok & ctx.state.has_status
        return ok

    def valid_until(self, ctx: SchedulingContext) -> float:
        """When the first instance fresh at `ctx.now` turns stale (a new status is a new
        state version anyway)."""
        stamps_s = ctx.state.s("timestamp_ms") / 1000.0
        fresh = stamps_s[(ctx.now - stamps_s) <= self.staleness_s]
        return float(fresh.min()) + self.staleness_s if len(fresh) else math.inf


class OfInferType:
    """Keeps instances of one infer type."""

    soft = False
    static = True

    def __init__(self, infer_type: InferType) -> None:
        self.code = INFER_CODES[infer_type]

    def keep(self, ctx: SchedulingContext) -> np.ndarray:
        return ctx.state.infer_type == self.code


class Failover:
    """Drops the failure domains of candidates that need failover."""

    soft = False
    static = True  # only removes rows, by domains of the static filters' failover marks

    def __init__(self, domain: str) -> None:
        if domain not in FAILOVER_DOMAINS:
            raise ConfigError(f"--failover-domain must be one of {', '.join(FAILOVER_DOMAINS)}, "
                              f"got {domain!r}")
        self.domain = domain

    def apply(self, ctx: SchedulingContext, keep: np.ndarray) -> np.ndarray:
        failed = ctx.needs_failover & ctx.candidates
        if not failed.any():
            return keep
        st = ctx.state
        if self.domain in ("node", "node-unit"):
            failed = np.isin(st.node, st.node[failed])
        if self.domain in ("instance-unit", "node-unit") and st.dp_enabled:
            failed = np.isin(st.unit, st.unit[failed])
        return keep & ~failed


class BalanceGuard:
    """Drops candidates loaded both `abs_threshold` more and `rel_threshold` times more than
    the least loaded one (higher-is-better metrics are not supported)."""

    soft = True

    def __init__(self, metric: Metric, abs_threshold: float, rel_threshold: float) -> None:
        self.metric = metric
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold

    def apply(self, ctx: SchedulingContext, keep: np.ndarray) -> np.ndarray:
        if not keep.any():
            return keep
        load = ctx.metric(self.metric)
        lo = load[keep].min()
        return keep & ((load - lo <= self.abs_threshold) | (load <= self.rel_threshold * lo))
