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
from prescient.policy.state import A, ClusterState

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


class LinearMetric(ColumnMetric):
    """A sum of status columns and dispatch-count columns (local account, or lite counts),
    less an optional per-request column of the context (`minus`, when a feature set it).

    Besides the numpy column it gives the values of a few rows in plain Python (`values_at`):
    at a handful of instances numpy's per-call cost is most of a decision. Every term is an
    integer count, so both ways sum exactly and agree.
    """

    __slots__ = ("_account", "_lite", "_minus", "_status")

    def __init__(self, name: str, *, status: tuple[str, ...] = (),
                 account: tuple[str, ...] = (), lite: tuple[int, ...] = (),
                 minus: str | None = None) -> None:
        if not (status or account or lite):
            raise ValueError(f"metric {name!r} sums no column")
        super().__init__(name, self._column)
        self._status = status
        self._account = tuple(A[f] for f in account)
        self._lite = lite
        self._minus = minus

    def _column(self, ctx: SchedulingContext) -> np.ndarray:
        st = ctx.state
        total: np.ndarray | float = st.status_sum(*self._status) if self._status else 0
        if self._account:
            account = st.account
            for i in self._account:
                total = total + account[:, i]
        if self._lite:
            lite = st.lite
            for i in self._lite:
                total = total + lite[:, i]
        less = getattr(ctx, self._minus) if self._minus else None
        return total if less is None else total - less  # type: ignore[return-value]

    def values_at(self, ctx: SchedulingContext, rows: list[int]) -> list[float] | None:
        """The metric at `rows`, in plain Python; None when the context's `minus` column is
        set (then only `compute` knows it)."""
        if self._minus and getattr(ctx, self._minus) is not None:
            return None
        st = ctx.state
        base = st.status_sum_list(self._status) if self._status else None
        out = []
        account, lite = st.account_rows, st.lite_rows
        for row in rows:
            value = base[row] if base is not None else 0.0
            if self._account:
                counts = account[row]
                for i in self._account:
                    value += counts[i]
            if self._lite:
                counts = lite[row]
                for i in self._lite:
                    value += counts[i]
            out.append(value)
        return out


def _kv_usage_projected(ctx: SchedulingContext) -> np.ndarray:
    st = ctx.state
    projected = (st.s("num_used_gpu_tokens") + st.s("num_uncomputed_tokens_all_waiting_prefills")
                 + st.s("num_unallocated_tokens_scheduler_running_prefills")
                 + st.s("num_unallocated_tokens_hybrid_scheduler_waiting_decodes")
                 + st.a("num_tokens_inflight_dispatch_decode_requests"))
    total = st.s("num_total_gpu_tokens")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, projected / np.where(total > 0, total, 1.0), np.inf)


_PREFILL_STATUS = ("num_uncomputed_tokens_all_waiting_prefills",
                   "num_uncomputed_tokens_scheduler_running_prefills")


def queued_prefill_tokens(st: ClusterState) -> np.ndarray:
    """`all_prefills_tokens_num` before any prediction: the status's and the account's part."""
    return (st.status_sum(*_PREFILL_STATUS)
            + st.a("num_uncomputed_tokens_inflight_dispatch_prefill_requests"))


def _all_prefills_tokens(name: str = "all_prefills_tokens_num") -> LinearMetric:
    return LinearMetric(
        name, status=_PREFILL_STATUS,
        account=("num_uncomputed_tokens_inflight_dispatch_prefill_requests",),
        minus="predicted_computed_tokens")


_ALL_PREFILLS = _all_prefills_tokens()


def _prefix_hit(ctx: SchedulingContext) -> np.ndarray:
    if ctx.prefix_hit_tokens is None:
        return np.zeros(len(ctx.state))
    return ctx.prefix_hit_tokens


def _cache_aware_prefills(ctx: SchedulingContext) -> np.ndarray:
    miss = ctx.request.prompt_len - _prefix_hit(ctx)
    return ctx.prefix_miss_weight * miss + _ALL_PREFILLS.compute(ctx)


def _predicted(field: str) -> Callable[[SchedulingContext], np.ndarray]:
    def compute(ctx: SchedulingContext) -> np.ndarray:
        values = getattr(ctx, field)
        return np.full(len(ctx.state), np.inf) if values is None else values

    return compute


def _column(fn: Callable[[SchedulingContext], np.ndarray], lower_is_better: bool = True
            ) -> Callable[[str], ColumnMetric]:
    return lambda name: ColumnMetric(name, fn, lower_is_better)


# name -> a maker of the metric, given its name
_FULL: dict[str, Callable[[str], ColumnMetric]] = {
    "kv_cache_usage_ratio_projected": _column(_kv_usage_projected),
    "decode_batch_size": lambda name: LinearMetric(
        name, status=("hybrid_scheduler_waiting_to_decode_requests_num", "num_loading_requests",
                      "scheduler_waiting_to_decode_requests_num",
                      "scheduler_running_to_decode_requests_num"),
        account=("num_inflight_dispatch_decode_requests",)),
    "num_waiting_requests": lambda name: LinearMetric(
        name, status=("num_waiting_requests",), account=("num_inflight_dispatch_requests",)),
    "all_prefills_tokens_num": _all_prefills_tokens,
    "kv_cache_hit_len": _column(_prefix_hit, lower_is_better=False),
    "cache_aware_all_prefills_tokens_num": _column(_cache_aware_prefills),
    # NEUTRAL legs count on both sides of the account: upstream's formula (reference §3.2)
    "num_requests": lambda name: LinearMetric(
        name, status=("num_waiting_requests", "num_loading_requests", "num_running_requests"),
        account=("num_inflight_dispatch_prefill_requests",
                 "num_inflight_dispatch_decode_requests")),
    "all_decodes_tokens_num": lambda name: LinearMetric(
        name, status=("hybrid_scheduler_waiting_to_decode_tokens_num",
                      "scheduler_waiting_to_decode_tokens_num",
                      "scheduler_running_to_decode_tokens_num", "num_tokens_loading_requests"),
        account=("num_tokens_inflight_dispatch_decode_requests",)),
    "predicted_ttft": _column(_predicted("predicted_ttft_ms")),
    "predicted_tpot": _column(_predicted("predicted_tpot_ms")),
    "predicted_decode_tokens": _column(lambda ctx: ctx.state.predicted_output),
}
_LITE: dict[str, Callable[[str], ColumnMetric]] = {
    "num_requests": lambda name: LinearMetric(name, lite=(0,)),
    "num_tokens": lambda name: LinearMetric(name, lite=(1,)),
    "predicted_decode_tokens": _column(lambda ctx: ctx.state.predicted_output),
}
METRIC_NAMES = tuple(sorted({*_FULL, *_LITE}))


def make_metric(name: str, *, full_mode: bool = True) -> ColumnMetric:
    """The metric called `name` in full mode (CMS data) or lite mode (router-local counts)."""
    table = _FULL if full_mode else _LITE
    if name not in table:
        mode = "full" if full_mode else "lite"
        raise ConfigError(f"metric {name!r} is not available in {mode} mode; "
                          f"available: {', '.join(sorted(table))}")
    return table[name](name)
