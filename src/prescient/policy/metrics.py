"""The metric catalogue, with upstream Llumnix names and formulas (reference §3.2).

`S.x` is the instance's last polled `InstanceStatus.x`, `LA.x` its local-account aggregate
(what was dispatched there and is not yet visible in a status), `ctx.x` a per-request input.
Lower is better unless a metric says otherwise.

- `kv_cache_usage_ratio_projected` = (S.used + S.waiting prefills + S.unallocated running
  prefills + S.unallocated hybrid waiting decodes + LA.decode tokens) / S.total; inf if no total
- `decode_batch_size` = S.hybrid waiting-to-decode + S.loading + S.waiting-to-decode
  + S.running-to-decode requests + LA.decode requests
- `num_waiting_requests` = S.num_waiting_requests + LA.requests
- `all_prefills_tokens_num` = S.waiting prefill tokens + S.running prefill tokens
  + LA.prefill tokens - ctx.predicted computed tokens
- `kv_cache_hit_len` = ctx.prefix hit tokens; **higher is better**
- `cache_aware_all_prefills_tokens_num` = ctx.prefix miss weight x ctx.prefix miss tokens +
  `all_prefills_tokens_num`, where the miss is the whole prompt on an instance with no hit
  (upstream counted 0 there) and the weight is 1 upstream (here it grows with the cluster's
  prefill backlog: see `policy/cache_aware.py`)
- `num_requests` = full: S.waiting + S.loading + S.running + LA.prefill + LA.decode requests;
  lite: router-local requests
- `all_decodes_tokens_num` = S.hybrid waiting-to-decode + S.waiting-to-decode
  + S.running-to-decode + S.loading tokens + LA.decode tokens
- `num_tokens` = lite: router-local prompt tokens
- `predicted_ttft`, `predicted_tpot` = ctx predictions in ms; inf without a predictor
- `predicted_decode_tokens` (beyond upstream; full and lite) = predicted output tokens of the
  requests this router has in flight on the instance (0 without an output-length predictor)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from prescient.errors import ConfigError
from prescient.policy.framework import SchedulingContext
from prescient.policy.state import ClusterState

LITE_METRICS = ("num_requests", "num_tokens", "predicted_decode_tokens")


class ColumnMetric:
    """A metric given by a function of the context; the shape of every metric here."""

    __slots__ = ("_fn", "lower_is_better", "name")

    def __init__(self, name: str, fn: Callable[[SchedulingContext], np.ndarray],
                 lower_is_better: bool = True) -> None:
        self.name = name
        self._fn = fn
        self.lower_is_better = lower_is_better

    def compute(self, ctx: SchedulingContext) -> np.ndarray:
        return self._fn(ctx)

    def __repr__(self) -> str:
        return f"ColumnMetric({self.name!r})"


def _kv_usage_projected(ctx: SchedulingContext) -> np.ndarray:
    st = ctx.state
    projected = (st.s("num_used_gpu_tokens") + st.s("num_uncomputed_tokens_all_waiting_prefills")
                 + st.s("num_unallocated_tokens_scheduler_running_prefills")
                 + st.s("num_unallocated_tokens_hybrid_scheduler_waiting_decodes")
                 + st.a("num_tokens_inflight_dispatch_decode_requests"))
    total = st.s("num_total_gpu_tokens")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, projected / np.where(total > 0, total, 1.0), np.inf)


def _decode_batch_size(ctx: SchedulingContext) -> np.ndarray:
    st = ctx.state
    return (st.s("hybrid_scheduler_waiting_to_decode_requests_num")
            + st.s("num_loading_requests") + st.s("scheduler_waiting_to_decode_requests_num")
            + st.s("scheduler_running_to_decode_requests_num")
            + st.a("num_inflight_dispatch_decode_requests"))


def _num_waiting_requests(ctx: SchedulingContext) -> np.ndarray:
    st = ctx.state
    return st.s("num_waiting_requests") + st.a("num_inflight_dispatch_requests")


def queued_prefill_tokens(st: ClusterState) -> np.ndarray:
    """`all_prefills_tokens_num` before any prediction: the status's and the account's part."""
    return (st.status_sum("num_uncomputed_tokens_all_waiting_prefills",
                          "num_uncomputed_tokens_scheduler_running_prefills")
            + st.a("num_uncomputed_tokens_inflight_dispatch_prefill_requests"))


def _all_prefills_tokens(ctx: SchedulingContext) -> np.ndarray:
    tokens = queued_prefill_tokens(ctx.state)
    if ctx.predicted_computed_tokens is not None:
        tokens = tokens - ctx.predicted_computed_tokens
    return tokens


def _prefix_hit(ctx: SchedulingContext) -> np.ndarray:
    if ctx.prefix_hit_tokens is None:
        return np.zeros(len(ctx.state))
    return ctx.prefix_hit_tokens


def _cache_aware_prefills(ctx: SchedulingContext) -> np.ndarray:
    miss = ctx.request.prompt_len - _prefix_hit(ctx)
    return ctx.prefix_miss_weight * miss + _all_prefills_tokens(ctx)


def _num_requests_full(ctx: SchedulingContext) -> np.ndarray:
    st = ctx.state
    return (st.s("num_waiting_requests") + st.s("num_loading_requests")
            + st.s("num_running_requests") + st.a("num_inflight_dispatch_prefill_requests")
            + st.a("num_inflight_dispatch_decode_requests"))


def _all_decodes_tokens(ctx: SchedulingContext) -> np.ndarray:
    st = ctx.state
    return (st.s("hybrid_scheduler_waiting_to_decode_tokens_num")
            + st.s("scheduler_waiting_to_decode_tokens_num")
            + st.s("scheduler_running_to_decode_tokens_num")
            + st.s("num_tokens_loading_requests")
            + st.a("num_tokens_inflight_dispatch_decode_requests"))


def _predicted(field: str) -> Callable[[SchedulingContext], np.ndarray]:
    def compute(ctx: SchedulingContext) -> np.ndarray:
        values = getattr(ctx, field)
        return np.full(len(ctx.state), np.inf) if values is None else values

    return compute


_FULL: dict[str, tuple[Callable[[SchedulingContext], np.ndarray], bool]] = {
    "kv_cache_usage_ratio_projected": (_kv_usage_projected, True),
    "decode_batch_size": (_decode_batch_size, True),
    "num_waiting_requests": (_num_waiting_requests, True),
    "all_prefills_tokens_num": (_all_prefills_tokens, True),
    "kv_cache_hit_len": (_prefix_hit, False),
    "cache_aware_all_prefills_tokens_num": (_cache_aware_prefills, True),
    "num_requests": (_num_requests_full, True),
    "all_decodes_tokens_num": (_all_decodes_tokens, True),
    "predicted_ttft": (_predicted("predicted_ttft_ms"), True),
    "predicted_tpot": (_predicted("predicted_tpot_ms"), True),
    "predicted_decode_tokens": (lambda ctx: ctx.state.predicted_output, True),
}
_LITE: dict[str, tuple[Callable[[SchedulingContext], np.ndarray], bool]] = {
    "num_requests": (lambda ctx: ctx.state.lite[:, 0], True),
    "num_tokens": (lambda ctx: ctx.state.lite[:, 1], True),
    "predicted_decode_tokens": (lambda ctx: ctx.state.predicted_output, True),
}
METRIC_NAMES = tuple(sorted({*_FULL, *_LITE}))


def make_metric(name: str, *, full_mode: bool = True) -> ColumnMetric:
    """The metric called `name` in full mode (CMS data) or lite mode (router-local counts)."""
    table = _FULL if full_mode else _LITE
    if name not in table:
        mode = "full" if full_mode else "lite"
        raise ConfigError(f"metric {name!r} is not available in {mode} mode; "
                          f"available: {', '.join(sorted(table))}")
    fn, lower = table[name]
    return ColumnMetric(name, fn, lower)
