"""Rescheduling policies by name, and the round that runs them (reference §7.1-7.2, §5.3).

A policy is a source filter pass, a destination filter pass (the dispatch framework's filters,
run once each, with no fallback pass) and a pair selector, over the same `ClusterState` columns
and metrics the dispatcher uses, so a rescheduler sees exactly the stale, CMS-polled view the
dispatcher does. Every pair gets the policy's request selection (rule, order, value).

- `decode_load`, `neutral_load`: sources and destinations of that infer type, schedulable,
  fresh and outside failed domains; sources at or over the load threshold, destinations under
  it (when the threshold is > 0 and the scope `cluster`); `MetricBalance` pairs; the
  `--rescheduling-req-select-*` request selection.
- `prefill_failover`, `decode_failover`, `neutral_failover`: sources of the type in a failed
  domain (unschedulable or stale, widened by `--failover-domain`); destinations of the type,
  healthy and outside failed domains; `RoundRobinPairs`; NUM_REQ, LR, -1 (drain everything).
- `binpacking_mitigation`: any type but the reserved prefill, healthy; sources with predicted
  TPOT >= SLO x `--tpot-migrate-out-ceil-threshold`, destinations under SLO x
  `--tpot-slo-dispatch-threshold`; `MitigationPair`; NUM_REQ, LCR, 1.
- `binpacking_consolidation`: healthy instances with decode work (decode batch >= 0.1);
  sources under SLO x `--tpot-migrate-out-floor-threshold` and neither reserved instance,
  destinations under SLO x the dispatch threshold and not the reserved prefill;
  `ConsolidationPair`; NUM_REQ, LCR, 1.

The load metric is `--rescheduling-{decode,neutral}-load-metric`, the threshold
`--rescheduling-{decode,neutral}-load-threshold`. Predicted TPOT is upstream's request-less
`predicted_tpot`: one decode step with one more request than the instance's decode batch, from
the SLO profiles (`--tpot-profiling-data-path`), which the bin-packing policies need.

`Rescheduler.plan(state, now)` runs the configured policies in order and drops a pair only when
it is the exact reverse of one already accepted this round (A->B then B->A).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from prescient.errors import ConfigError
from prescient.model import InferType, Request
from prescient.policy.filters import Failover, Fresh, MetricThreshold, OfInferType, Schedulable
from prescient.policy.framework import (
    Filter,
    GlobalFilter,
    Pipeline,
    SchedulingContext,
)
from prescient.policy.metrics import make_metric
from prescient.policy.state import ClusterState
from prescient.rescheduler.filters import (
    AtLeast,
    FailoverSources,
    NoReservations,
    NotReserved,
    Reservations,
)
from prescient.rescheduler.pairs import (
    ConsolidationPair,
    MetricBalance,
    MitigationPair,
    PairSelector,
    RoundRobinPairs,
)
from prescient.rescheduler.plan import DRAIN, MigrationPlan, SelectOrder, SelectRule

if TYPE_CHECKING:
    from prescient.predict.slo import SloLatencyModel

# Upstream computes rescheduling metrics with no request; request-dependent metrics (only the
# cache-aware one) see a one-token prompt with no prefix hit.
_NO_REQUEST = Request(request_id="", prompt_len=1)
_DECODE_BATCH = make_metric("decode_batch_size")
_DECODE_TOKENS = make_metric("all_decodes_tokens_num")
_BUSY_DECODING = 0.1  # upstream's "has decode work": decode_batch_size >= 0.1


class ReschedulingSettings(Protocol):
    """The scheduler flags rescheduling reads (snake case of the flag names)."""

    rescheduling_policies: Sequence[str]
    rescheduling_decode_load_metric: str
    rescheduling_prefill_load_metric: str
    rescheduling_neutral_load_metric: str
    rescheduling_decode_load_threshold: float
    rescheduling_neutral_load_threshold: float
    rescheduling_load_balance_threshold: float
    rescheduling_load_balance_scope: str
    rescheduling_req_select_rule: str
    rescheduling_req_select_order: str
    rescheduling_req_select_value: float
    failover_domain: str
    instance_staleness_seconds: float
    tpot_slo: float
    tpot_slo_dispatch_threshold: float
    tpot_migrate_out_ceil_threshold: float
    tpot_migrate_out_floor_threshold: float


class _NoSelector:
    """Rescheduling filter passes pick nothing themselves: the pair selector does."""

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        raise NotImplementedError


class _RequestlessTpot:
    """Fills `predicted_tpot` as upstream's rescheduler computes it (no request)."""

    def __init__(self, model: SloLatencyModel) -> None:
        self.model = model

    def prepare(self, ctx: SchedulingContext) -> None:
        ctx.predicted_tpot_ms = self.model.predict_tpot(
            ctx.metric(_DECODE_BATCH) + 1, ctx.metric(_DECODE_TOKENS))


class ReschedulingPolicy:
    """Source filters, destination filters, a pair selector and the request selection."""

    def __init__(
        self, name: str, *, src: Sequence[Filter], dst: Sequence[Filter],
        pairs: PairSelector, rule: SelectRule, order: SelectOrder, value: float,
        src_global: Sequence[GlobalFilter] = (), dst_global: Sequence[GlobalFilter] = (),
        prepare: Callable[[SchedulingContext], None] | None = None,
    ) -> None:
        self.name = name
        self.src = Pipeline(src, _NoSelector(), src_global)
        self.dst = Pipeline(dst, _NoSelector(), dst_global)
        self.pairs = pairs
        self.rule: SelectRule = rule
        self.order: SelectOrder = order
        self.value = value
        self._prepare = prepare

    def select_pairs(self, state: ClusterState, now: float, rng: random.Random
                     ) -> list[tuple[str, str]]:
        """This round's (source id, destination id) pairs."""
        if not len(state):
            return []
        ctx = SchedulingContext(_NO_REQUEST, state, now, rng)
        if self._prepare is not None:
            self._prepare(ctx)
        candidates = state.has_status.copy()
        src = np.flatnonzero(self.src.filter(ctx, candidates, fallback=False))
        dst = np.flatnonzero(self.dst.filter(ctx, candidates, fallback=False))
        if not len(src) or not len(dst):
            return []
        ids = state.ids
        return [(ids[s], ids[d]) for s, d in self.pairs.select(ctx, src, dst) if s != d]

    def __repr__(self) -> str:
        return f"ReschedulingPolicy({self.name!r})"


class Rescheduler:
    """One rescheduling round: every policy in order, reverse pairs dropped."""

    def __init__(self, policies: Sequence[ReschedulingPolicy], rng: random.Random) -> None:
        self.policies = tuple(policies)
        self.rng = rng

    def plan(self, state: ClusterState, now: float) -> list[MigrationPlan]:
        plans: list[MigrationPlan] = []
        accepted: set[tuple[str, str]] = set()
        for policy in self.policies:
            for src, dst in policy.select_pairs(state, now, self.rng):
                if (dst, src) in accepted:
                    continue
                accepted.add((src, dst))
                plans.append(MigrationPlan(src=src, dst=dst, rule=policy.rule,
                                           order=policy.order, value=policy.value,
                                           trigger=policy.name))
        return plans


# ---- the registry ---------------------------------------------------------------------------

def _health(s: ReschedulingSettings) -> list[Filter]:
    return [Schedulable(), Fresh(s.instance_staleness_seconds)]


def _load(infer_type: InferType) -> Callable[..., ReschedulingPolicy]:
    def build(s: ReschedulingSettings, **_: object) -> ReschedulingPolicy:
        t = infer_type.value
        metric = make_metric(getattr(s, f"rescheduling_{t}_load_metric"))
        threshold = getattr(s, f"rescheduling_{t}_load_threshold")
        scope = s.rescheduling_load_balance_scope
        src: list[Filter] = [OfInferType(infer_type), *_health(s)]
        dst: list[Filter] = [OfInferType(infer_type), *_health(s)]
        if threshold > 0 and scope != "unit":
            below = MetricThreshold(metric, threshold, soft=False)
            src.append(AtLeast(below))
            dst.append(below)
        failover = [Failover(s.failover_domain)]
        return ReschedulingPolicy(
            f"{t}_load", src=src, dst=dst, src_global=failover, dst_global=failover,
            pairs=MetricBalance(metric, scope, s.rescheduling_load_balance_threshold),
            rule=s.rescheduling_req_select_rule,  # type: ignore[arg-type]
            order=s.rescheduling_req_select_order,  # type: ignore[arg-type]
            value=s.rescheduling_req_select_value)

    return build


def _failover(infer_type: InferType) -> Callable[..., ReschedulingPolicy]:
    def build(s: ReschedulingSettings, **_: object) -> ReschedulingPolicy:
        return ReschedulingPolicy(
            f"{infer_type.value}_failover",
            src=[OfInferType(infer_type)],
            src_global=[FailoverSources(s.instance_staleness_seconds, s.failover_domain)],
            dst=[OfInferType(infer_type), *_health(s)],
            dst_global=[Failover(s.failover_domain)],
            pairs=RoundRobinPairs(), rule="NUM_REQ", order="LR", value=DRAIN)

    return build


def _tpot(s: ReschedulingSettings, slo_model: SloLatencyModel | None, name: str
          ) -> _RequestlessTpot:
    if slo_model is None:
        raise ConfigError(f"rescheduling policy {name} needs the SLO profiles "
                          "(--ttft-profiling-data-path and --tpot-profiling-data-path)")
    return _RequestlessTpot(slo_model)


def _mitigation(s: ReschedulingSettings, *, slo_model: SloLatencyModel | None = None,
                reservations: Reservations, **_: object) -> ReschedulingPolicy:
    feature = _tpot(s, slo_model, "binpacking_mitigation")
    tpot = make_metric("predicted_tpot")
    healthy = [*_health(s), NotReserved(reservations, "prefill")]
    hot = MetricThreshold(tpot, s.tpot_slo * s.tpot_migrate_out_ceil_threshold, soft=False)
    room = MetricThreshold(tpot, s.tpot_slo * s.tpot_slo_dispatch_threshold, soft=False)
    failover = [Failover(s.failover_domain)]
    return ReschedulingPolicy(
        "binpacking_mitigation", src=[*healthy, AtLeast(hot)], dst=[*healthy, room],
        src_global=failover, dst_global=failover, pairs=MitigationPair(tpot),
        rule="NUM_REQ", order="LCR", value=1, prepare=feature.prepare)


def _consolidation(s: ReschedulingSettings, *, slo_model: SloLatencyModel | None = None,
                   reservations: Reservations, **_: object) -> ReschedulingPolicy:
    feature = _tpot(s, slo_model, "binpacking_consolidation")
    tpot = make_metric("predicted_tpot")
    busy = AtLeast(MetricThreshold(_DECODE_BATCH, _BUSY_DECODING, soft=False))
    cold = MetricThreshold(tpot, s.tpot_slo * s.tpot_migrate_out_floor_threshold, soft=False)
    room = MetricThreshold(tpot, s.tpot_slo * s.tpot_slo_dispatch_threshold, soft=False)
    not_prefill = NotReserved(reservations, "prefill")
    failover = [Failover(s.failover_domain)]
    return ReschedulingPolicy(
        "binpacking_consolidation",
        src=[*_health(s), not_prefill, NotReserved(reservations, "decode"), cold, busy],
        dst=[*_health(s), not_prefill, room, busy], src_global=failover, dst_global=failover,
        pairs=ConsolidationPair(tpot, reservations), rule="NUM_REQ", order="LCR", value=1,
        prepare=feature.prepare)


RESCHEDULING_POLICIES: dict[str, Callable[..., ReschedulingPolicy]] = {
    "decode_load": _load(InferType.DECODE),
    "neutral_load": _load(InferType.NEUTRAL),
    "prefill_failover": _failover(InferType.PREFILL),
    "decode_failover": _failover(InferType.DECODE),
    "neutral_failover": _failover(InferType.NEUTRAL),
    "binpacking_mitigation": _mitigation,
    "binpacking_consolidation": _consolidation,
}


ADAPTIVE_PD_POLICIES = ("binpacking_mitigation", "binpacking_consolidation")


def make_rescheduling_policy(
    name: str, settings: ReschedulingSettings, *, slo_model: SloLatencyModel | None = None,
    reservations: Reservations | None = None,
) -> ReschedulingPolicy:
    """The policy called `name`; unknown names raise `ConfigError` listing the known ones."""
    factory = RESCHEDULING_POLICIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown rescheduling policy {name!r}; known: "
                          f"{', '.join(RESCHEDULING_POLICIES)}")
    return factory(settings, slo_model=slo_model, reservations=reservations or NoReservations())


def make_rescheduler(
    settings: ReschedulingSettings, rng: random.Random, *,
    slo_model: SloLatencyModel | None = None, reservations: Reservations | None = None,
) -> Rescheduler:
    """The `--rescheduling-policies` in their order.

    With `--enable-adaptive-pd` the bin-packing policies are added after them when missing, as
    upstream does (mitigation first).
    """
    names = list(settings.rescheduling_policies)
    if getattr(settings, "enable_adaptive_pd", False):
        names += [name for name in ADAPTIVE_PD_POLICIES if name not in names]
    policies = [make_rescheduling_policy(name, settings, slo_model=slo_model,
                                         reservations=reservations)
                for name in names]
    return Rescheduler(policies, rng)
