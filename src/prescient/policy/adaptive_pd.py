"""Adaptive PD (`--enable-adaptive-pd` with `--scheduling-policy slo`, full mode; reference §5.3).

No instance has a fixed role. Per request the dispatcher picks a prefill instance and a decode
instance among **all** instances, and roles emerge from where the decode work sits: an instance
with no decode batch may prefill, and a decode placed on an idle one turns it into a decode
instance until its batch drains (or the consolidation migrations empty it), when it may prefill
again.

- Reservations (`AdaptivePdRoles`, upstream `setReservedInstance`): after each status poll,
  while a slot is empty, the reserved decode instance is the first (in id order; upstream: map
  order) whose status shows no prefill tokens, the reserved prefill instance the first other one
  with no decode batch; when none qualifies, the one with the fewest decode requests (prefill)
  or prefill tokens (decode). A reservation holds until its instance leaves the view. The
  reserved prefill instance never decodes, the reserved decode one never prefills.
- Prefill leg: healthy; not the reserved decode; `predicted_ttft < --ttft-slo x
  --ttft-slo-dispatch-threshold` (soft); `decode_batch_size < 0.1`, i.e. no decode work at all
  (hard). The least predicted TTFT wins, ties going to the reserved prefill instance.
- Decode leg: healthy; not the reserved prefill; `predicted_ttft < --tpot-slo x
  --tpot-slo-dispatch-threshold` (soft; upstream compares the TTFT with the TPOT limit, an
  "almost no pending prefill" test) and `predicted_tpot` under the same limit (soft). Passing
  both, the reserved decode instance wins, else the highest predicted TPOT (bin-packing). In the
  fallback pass (nothing passed both): the highest TPOT still under the limit, ties to the lower
  predicted TTFT, and when no instance is under it the lowest TPOT, which usually lands on an
  idle prefill instance and so converts it. Upstream builds its decode selector without the
  SLO fields (reference §11.4), so its fallback is always "lowest TPOT"; here the limit is set.

Requests are never rejected for their SLO (nothing is hard but health and "no decode work on a
prefill instance", which the reserved prefill instance always meets). The bin-packing
rescheduling policies (`rescheduler/policies.py`) read the same reservations.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from prescient.model import InferType
from prescient.policy.dispatcher import Dispatcher
from prescient.policy.filters import Fresh, MetricThreshold, Schedulable
from prescient.policy.framework import Feature, Metric, Pipeline, SchedulingContext
from prescient.policy.metrics import make_metric
from prescient.policy.state import ClusterState
from prescient.predict.slo_scheduling import SloPrediction

if TYPE_CHECKING:
    from prescient.policy.registry import DispatchSettings
    from prescient.predict.slo import SloLatencyModel

NO_DECODE_WORK = 0.1  # upstream's "decode_batch_size < 0.1": an instance with no decode batch


class Reservations(Protocol):
    """Adaptive PD's reserved instances (ids, or None while none is reserved)."""

    @property
    def prefill(self) -> str | None: ...

    @property
    def decode(self) -> str | None: ...


class NoReservations:
    """No instance is reserved (adaptive PD off)."""

    prefill: str | None = None
    decode: str | None = None


class NotReserved:
    """Drops the instance reserved for `role`."""

    soft = False

    def __init__(self, reservations: Reservations, role: Literal["prefill", "decode"]) -> None:
        self.reservations = reservations
        self.role = role

    def keep(self, ctx: SchedulingContext) -> np.ndarray:
        keep = np.ones(len(ctx.state), bool)
        row = ctx.state.row(getattr(self.reservations, self.role) or "")
        if row is not None:
            keep[row] = False
        return keep


class AdaptivePdRoles:
    """The reserved prefill and decode instances, refreshed after each status poll."""

    def __init__(self) -> None:
        self.prefill: str | None = None
        self.decode: str | None = None

    def prepare(self, ctx: SchedulingContext) -> None:
        """Nothing per request: reservations change only with statuses."""

    def on_statuses(self, state: ClusterState, samples: Sequence[object], now: float) -> None:
        self.update(state)

    def update(self, state: ClusterState) -> None:
        """Drop reservations of instances that left the view; fill empty slots."""
        self.prefill = self._still_there(state, self.prefill)
        self.decode = self._still_there(state, self.decode)
        if (self.prefill is not None and self.decode is not None) or not state.has_status.any():
            return
        rows = np.flatnonzero(state.has_status)
        prefill_tokens = (state.s("num_uncomputed_tokens_all_waiting_prefills")
                          + state.s("num_uncomputed_tokens_scheduler_running_prefills"))[rows]
        decode_batch = (state.s("hybrid_scheduler_waiting_to_decode_requests_num")
                        + state.s("num_loading_requests")
                        + state.s("scheduler_waiting_to_decode_requests_num")
                        + state.s("scheduler_running_to_decode_requests_num"))[rows]
        if self.decode is None:
            self.decode = self._first(state, rows, prefill_tokens, exclude=self.prefill)
        if self.prefill is None:
            self.prefill = self._first(state, rows, decode_batch, exclude=self.decode)

    @staticmethod
    def _still_there(state: ClusterState, instance_id: str | None) -> str | None:
        """`instance_id` while the view still has its status, else None."""
        row = None if instance_id is None else state.row(instance_id)
        return instance_id if row is not None and state.has_status[row] else None

    @staticmethod
    def _first(state: ClusterState, rows: np.ndarray, load: np.ndarray, exclude: str | None
               ) -> str | None:
        """The first row with no load, else the least loaded (id order breaks ties)."""
        allowed = np.array([state.ids[r] != exclude for r in rows])
        if not allowed.any():
            return None
        values = np.where(allowed, load, np.inf)
        idle = np.flatnonzero(values == 0)
        pick = idle[0] if len(idle) else int(np.argmin(values))
        return state.ids[int(rows[pick])]


class PrefillSelector:
    """Least predicted TTFT; among equals the reserved prefill instance (upstream
    `sloPrefillApdSelector`), then instance id."""

    def __init__(self, ttft: Metric, reservations: Reservations) -> None:
        self.ttft = ttft
        self.reservations = reservations

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        values = ctx.metric(self.ttft)[rows]
        tied = rows[values == values.min()]
        reserved = ctx.state.row(self.reservations.prefill or "")
        return reserved if reserved is not None and reserved in tied else int(tied[0])


class DecodeSelector:
    """Bin-packing by predicted TPOT (upstream `sloDecodeApdSelector`, with its SLO set).

    `tpot_limit_ms` is `--tpot-slo x --tpot-slo-dispatch-threshold`.
    """

    def __init__(self, tpot: Metric, ttft: Metric, reservations: Reservations,
                 tpot_limit_ms: float) -> None:
        self.tpot = tpot
        self.ttft = ttft
        self.reservations = reservations
        self.tpot_limit_ms = tpot_limit_ms

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        tpot = ctx.metric(self.tpot)
        if not ctx.fallback:
            reserved = ctx.state.row(self.reservations.decode or "")
            if reserved is not None and reserved in rows:
                return reserved
            return int(rows[np.argmax(tpot[rows])])
        under = rows[tpot[rows] < self.tpot_limit_ms]
        if not len(under):
            return int(rows[np.argmin(tpot[rows])])
        ttft = ctx.metric(self.ttft)
        order = np.lexsort((under, ttft[under], -tpot[under]))  # last key sorts first
        return int(under[order[0]])


DispatcherFactory = Callable[..., Dispatcher]


def adaptive_pd(settings: DispatchSettings, rng: random.Random, model: SloLatencyModel,
                dispatcher: DispatcherFactory) -> Dispatcher:
    """The `slo` policy with adaptive PD: both legs over all instances, roles by reservation.

    `dispatcher` is the registry's builder, which adds the local
    account and the predictor-enhanced feature as for every full-mode policy.
    """
    s = settings
    roles = AdaptivePdRoles()
    ttft, tpot = make_metric("predicted_ttft"), make_metric("predicted_tpot")
    decode_batch = make_metric("decode_batch_size")
    tpot_limit = s.tpot_slo * s.tpot_slo_dispatch_threshold
    health = [Schedulable(), Fresh(s.instance_staleness_seconds)]
    ttft_ok = MetricThreshold(ttft, s.ttft_slo * s.ttft_slo_dispatch_threshold, soft=True)
    prefill = Pipeline(
        [*health, NotReserved(roles, "decode"), ttft_ok,
         MetricThreshold(decode_batch, NO_DECODE_WORK, soft=False)],
        PrefillSelector(ttft, roles))
    decode = Pipeline(
        [*health, NotReserved(roles, "prefill"), MetricThreshold(ttft, tpot_limit, soft=True),
         MetricThreshold(tpot, tpot_limit, soft=True)],
        DecodeSelector(tpot, ttft, roles, tpot_limit))
    features: list[Feature] = [roles, SloPrediction(model)]
    built = dispatcher("slo", {InferType.PREFILL: prefill, InferType.DECODE: decode},
                       settings, rng, full=True, extra_features=features)
    built.any_instance_any_leg = True
    return built


def reservations_of(dispatcher: Dispatcher) -> Reservations | None:
    """The adaptive-PD reservations a dispatcher keeps (None when adaptive PD is off), for the
    rescheduler's bin-packing policies."""
    for feature in dispatcher.features:
        if isinstance(feature, AdaptivePdRoles):
            return feature
    return None
