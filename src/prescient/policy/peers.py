"""Peer routers' load-only policies, reproduced for side-by-side comparison.

Each reads what the peer reads: engine metrics scraped from `/metrics` (every 50 ms in llm-d
and AIBrix, `shared/reference/peers.md` §2.2-§2.3), or the router's own in-flight counts. In the
simulator, a policy with `scrape_interval_s` sees each engine's state as of its last scrape,
with no llumlet push lag. Prefix-cache scorers are left out: these are the load-only baselines.

- `llm-d` (peers.md §2.3, default chart weights): `queue-scorer` (weight 2),
  `(maxQ - q) / (maxQ - minQ)`, 1.0 for all when equal, over `vllm:num_requests_waiting`; plus
  `kv-cache-utilization-scorer` (weight 2), `1 - kv_cache_usage_perc`; `max-score` picker with
  random tie-break.
- `aibrix-least-request` (peers.md §2.2): least `realtime_num_requests_running`, the gateway's
  own in-flight count; random tie-break.
- `aibrix-least-kv-cache` (peers.md §2.2): least KV-cache usage; random tie-break.
- `sglang-power-of-two` (peers.md §2.4): two random workers, the one with the lower cached token
  load from the load monitor (here: KV tokens in use plus waiting prompt tokens, refreshed at
  the scrape interval); request counts while no load is known.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

from prescient.model import InferType
from prescient.policy.dispatcher import Dispatcher
from prescient.policy.framework import Pipeline, SchedulingContext, Selector
from prescient.policy.metrics import ColumnMetric, make_metric

SCRAPE_INTERVAL_S = 0.05  # llm-d --refresh-metrics-interval, AIBrix POD_METRIC_REFRESH_INTERVAL

Score = Callable[[SchedulingContext], np.ndarray]


def _kv_usage(ctx: SchedulingContext) -> np.ndarray:
    total = ctx.state.s("num_total_gpu_tokens")
    return np.where(total > 0, ctx.state.s("num_used_gpu_tokens") / np.maximum(total, 1), 1.0)


def _queue_score(ctx: SchedulingContext, rows: np.ndarray) -> np.ndarray:
    q = ctx.state.s("num_waiting_requests")[rows]
    lo, hi = q.min(), q.max()
    return np.ones(len(rows)) if hi == lo else (hi - q) / (hi - lo)


class WeightedScorePicker:
    """llm-d's shape: weighted sum of [0, 1] scores, the maximum wins, ties at random."""

    def __init__(self, scorers: Sequence[tuple[float, Callable[..., np.ndarray]]]) -> None:
        self.scorers = tuple(scorers)

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        total = sum(w * fn(ctx, rows) for w, fn in self.scorers)
        best = np.flatnonzero(total == np.max(total))
        return int(rows[best[ctx.rng.randrange(len(best))]])


class LeastWithRandomTies:
    """The least `metric`; equal values are broken at random (AIBrix)."""

    def __init__(self, metric: ColumnMetric) -> None:
        self.metric = metric

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        values = ctx.metric(self.metric)[rows]
        best = np.flatnonzero(values == values.min())
        return int(rows[best[ctx.rng.randrange(len(best))]])


class TokenLoadPowerOfTwo:
    """SGLang's power-of-two: lower token load of two random workers, else fewer requests."""

    def __init__(self) -> None:
        self.requests = make_metric("num_requests", full_mode=False)

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        if len(rows) == 1:
            return int(rows[0])
        a, b = (int(rows[i]) for i in ctx.rng.sample(range(len(rows)), 2))
        st = ctx.state
        if st.has_status[a] and st.has_status[b]:
            load = st.s("num_used_gpu_tokens") + st.s("num_uncomputed_tokens_all_waiting_prefills")
        else:
            load = ctx.metric(self.requests)
        return b if load[b] < load[a] else a


def _peer(name: str, selector: Callable[[], Selector], *, needs_status: bool
          ) -> Callable[[object, random.Random], Dispatcher]:
    def factory(settings: object, rng: random.Random) -> Dispatcher:
        pipelines = {t: Pipeline([], selector()) for t in InferType}
        dispatcher = Dispatcher(name, pipelines, rng, full_mode=needs_status)
        dispatcher.scrape_interval_s = SCRAPE_INTERVAL_S
        return dispatcher

    return factory


PEER_POLICIES = {
    "llm-d": _peer("llm-d", lambda: WeightedScorePicker([
        (2.0, _queue_score), (2.0, lambda ctx, rows: 1.0 - _kv_usage(ctx)[rows])]),
        needs_status=True),
    "aibrix-least-request": _peer(
        "aibrix-least-request",
        lambda: LeastWithRandomTies(make_metric("num_requests", full_mode=False)),
        needs_status=False),
    "aibrix-least-kv-cache": _peer(
        "aibrix-least-kv-cache",
        lambda: LeastWithRandomTies(ColumnMetric("kv_cache_usage", _kv_usage)),
        needs_status=True),
    "sglang-power-of-two": _peer("sglang-power-of-two", TokenLoadPowerOfTwo,
                                 needs_status=False),
}
