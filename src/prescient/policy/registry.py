"""Every dispatch policy by name, in one place.

`make_dispatcher(name, settings, rng)` builds a `Dispatcher`; unknown names raise `ConfigError`
listing the known ones. `settings` is the scheduler's settings object (any object with the
attributes of `DispatchSettings`, i.e. the scheduler flags in snake case).

- `load-balance` (full mode): per infer type, keep schedulable, fresh instances whose
  `--dispatch-*-load-metric` is under its soft threshold, drop failover domains; pick the least
  loaded (random among the best `--dispatch-top-k`; with predictor-enhanced scheduling, equal
  `all_prefills_tokens_num` falls through to `decode_batch_size`). With
  `--enable-cache-aware-scheduling`, prefill and neutral legs of prompts of at least
  `--cache-aware-scheduling-min-tokens` rank by `--dispatch-prefill-cache-locality-metric`
  first, the load metric second and the projected KV usage third, under a balance guard
  (`_cache_aware_pipeline`, `policy/cache_aware.py`; the router-history index unless the
  caller swaps it).
- `load-balance` (lite mode): the least router-local `num_requests` or `num_tokens`.
- `flood` (full mode): schedulable, fresh, failover; stay on one instance while it can work.
- `round-robin` (lite): cycles through instances in id order (gateway-local upstream).
- `random` (lite): a uniform random instance.
- `least-requests` (lite): the fewest requests this router has in flight.
- `power-of-two` (lite): two random instances, the one with fewer router-local requests.
- `slo` (full mode): hard thresholds on predicted TTFT / TPOT from offline profiles; the least
  predicted latency wins; nothing available when every instance would miss its SLO.
- `llm-d`, `aibrix-least-request`, `aibrix-least-kv-cache`, `sglang-power-of-two`: the peer
  routers' load-only policies (`policy/peers.py`).
- `sglang-cache-aware`, `sglang-lmetric`, `llm-d-prefix`, `dynamo-kv`,
  `production-stack-prefixaware`: the peers' cache-aware policies (`policy/cache_peers.py`).
- `prism`: NexusSched's cluster layer (its `ELRARRouter`): predicted step latency + pending
  load + step-size mode + session affinity, summed; engine states read every 200 ms, stale
  after 3 s (`policy/prism.py`).

Adding a policy is one factory function here plus one line in `POLICIES`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from prescient.cache.index import ApproximateIndex
from prescient.errors import ConfigError
from prescient.model import InferType
from prescient.policy.account import LocalAccount
from prescient.policy.adaptive_pd import adaptive_pd
from prescient.policy.cache_aware import IndexHits, PrefixHits
from prescient.policy.cache_peers import CACHE_PEER_POLICIES
from prescient.policy.dispatcher import Dispatcher
from prescient.policy.filters import (
    BalanceGuard,
    Failover,
    Fresh,
    MetricThreshold,
    Schedulable,
)
from prescient.policy.framework import (
    Feature,
    Filter,
    Metric,
    Pipeline,
    PlacementObserver,
    Selector,
)
from prescient.policy.metrics import LITE_METRICS, make_metric
from prescient.policy.peers import PEER_POLICIES
from prescient.policy.prism import PRISM_POLICIES
from prescient.policy.selectors import (
    FixedPreferenceSelector,
    MetricSelector,
    PowerOfTwoSelector,
    RandomSelector,
    RoundRobinSelector,
)
from prescient.predict.enhanced import PredictorEnhancement
from prescient.predict.quadratic import PredictorBank
from prescient.predict.slo_scheduling import SloPrediction
from prescient.predict.structural import StructuralBank

if TYPE_CHECKING:
    from prescient.predict.slo import SloLatencyModel

INFER_TYPES = (InferType.PREFILL, InferType.DECODE, InferType.NEUTRAL)
_log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Configuration warnings repeat for every dispatcher built; say each once per process."""
    if message not in _warned:
        _warned.add(message)
        _log.warning(message)


class DispatchSettings(Protocol):
    """The scheduler flags dispatch policies read (snake case of the flag names)."""

    enable_full_mode_scheduling: bool
    dispatch_top_k: int
    dispatch_prefill_load_metric: str
    dispatch_prefill_load_threshold: float
    dispatch_decode_load_metric: str
    dispatch_decode_load_threshold: float
    dispatch_neutral_load_metric: str
    dispatch_neutral_load_threshold: float
    enable_instance_status_local_account: bool
    request_local_account_staleness_seconds: float
    failover_domain: str
    instance_staleness_seconds: float
    enable_predictor_enhanced_scheduling: bool
    num_predictor_warmup_samples: int
    max_num_batched_tokens: int
    step_predictor: str
    per_instance_predictors: bool
    ttft_slo: float
    tpot_slo: float
    ttft_slo_dispatch_threshold: float
    tpot_slo_dispatch_threshold: float
    enable_cache_aware_scheduling: bool
    cache_aware_scheduling_min_tokens: int
    dispatch_prefill_cache_locality_metric: str
    cache_index_ttl_s: float
    cache_index_max_blocks: int
    cache_aware_miss_weight: float
    cache_aware_backlog_tokens: float
    cache_aware_load_requests: float
    cache_aware_balance_abs_threshold: float
    cache_aware_balance_rel_threshold: float


PolicyFactory = Callable[[DispatchSettings, random.Random], Dispatcher]


def _metric_and_threshold(settings: DispatchSettings, infer_type: InferType) -> tuple[str, float]:
    metric = getattr(settings, f"dispatch_{infer_type.value}_load_metric")
    threshold = getattr(settings, f"dispatch_{infer_type.value}_load_threshold")
    return metric, threshold


def _is_default(settings: object, field: str) -> bool:
    """Whether `settings.field` is the scheduler's declared default (not chosen by the user)."""
    from prescient.config.scheduler import SchedulerSettings

    return bool(getattr(settings, field) == getattr(SchedulerSettings(), field))


def _health_filters(settings: DispatchSettings) -> list[Filter]:
    return [Schedulable(), Fresh(settings.instance_staleness_seconds)]


FULL_MODE_FEATURES = ("enable_cache_aware_scheduling", "enable_predictor_enhanced_scheduling",
                      "enable_adaptive_pd", "enable_rescheduling")


def disabled_in_lite_mode(settings: object) -> list[str]:
    """The full-mode features `settings` turns on, which lite mode cannot honour.

    As upstream's `verifySchedulingFeature`, lite mode switches them off (and the local
    account, which has no CMS status to reconcile against); each is logged once here.
    """
    if getattr(settings, "enable_full_mode_scheduling", True):
        return []
    on = [name for name in FULL_MODE_FEATURES if getattr(settings, name, False)]
    for name in on:
        _warn_once(f"--{name.replace('_', '-')} needs --enable-full-mode-scheduling=true; "
                   "disabled in lite mode")
    return on


def cache_feature(settings: DispatchSettings) -> PrefixHits:
    """The cache-aware feature from `settings`: the router-history index by default.

    The index lives in `feature.source.index`; the live scheduler and the simulator replace
    the source when they have engine KV events or a KV-store metadata service.
    """
    index = ApproximateIndex(ttl_s=settings.cache_index_ttl_s,
                             max_blocks=settings.cache_index_max_blocks)
    return PrefixHits(IndexHits(index), min_tokens=settings.cache_aware_scheduling_min_tokens,
                      miss_weight=settings.cache_aware_miss_weight,
                      backlog_tokens=settings.cache_aware_backlog_tokens,
                      load_requests=settings.cache_aware_load_requests)


def _cache_aware_pipeline(settings: DispatchSettings, load: Metric, threshold: float
                          ) -> Pipeline:
    """Prefill / neutral legs when cache-aware: the locality metric first, the load second.

    With the cost metric (`cache_aware_all_prefills_tokens_num`, the prefill work the instance
    would have with this request) the soft load threshold is left out: it would drop an
    instance holding the prefix for its load alone, before the hit is weighed, and on the cost
    itself it could only drop instances the cost already ranks behind. A balance guard on
    in-flight requests keeps affinity from piling requests onto one instance. Equal costs and
    loads fall to the least projected KV usage (decode load), not to the lowest id.
    """
    locality = make_metric(settings.dispatch_prefill_cache_locality_metric)
    filters = _health_filters(settings)
    if not locality.lower_is_better:  # kv_cache_hit_len ranks by hits alone: keep the limit
        filters.append(MetricThreshold(load, threshold, soft=True))
    guard = BalanceGuard(make_metric("num_requests"), settings.cache_aware_balance_abs_threshold,
                         settings.cache_aware_balance_rel_threshold)
    tie_break = make_metric("kv_cache_usage_ratio_projected")
    return Pipeline(filters, MetricSelector([locality, load, tie_break], settings.dispatch_top_k),
                    [Failover(settings.failover_domain), guard])


def _load_balance(settings: DispatchSettings, rng: random.Random) -> Dispatcher:
    full = settings.enable_full_mode_scheduling
    disabled_in_lite_mode(settings)
    cache = None
    if full and settings.enable_cache_aware_scheduling:
        cache = cache_feature(settings)
    pipelines = {}
    for infer_type in INFER_TYPES:
        name, threshold = _metric_and_threshold(settings, infer_type)
        if not full and name not in LITE_METRICS:
            field = f"dispatch_{infer_type.value}_load_metric"
            if not _is_default(settings, field):  # the full-mode defaults switch silently
                _warn_once(f"lite mode supports only {' / '.join(LITE_METRICS)}; "
                           f"--dispatch-{infer_type.value}-load-metric {name} becomes num_tokens")
            name = "num_tokens"
        metric = make_metric(name, full_mode=full)
        if cache is not None and infer_type is not InferType.DECODE:
            pipelines[infer_type] = _cache_aware_pipeline(settings, metric, threshold)
            continue
        filters = [*_health_filters(settings)] if full else []
        filters.append(MetricThreshold(metric, threshold, soft=True))
        pipelines[infer_type] = Pipeline(
            filters, MetricSelector(_with_tie_break(settings, metric), settings.dispatch_top_k),
            [Failover(settings.failover_domain)] if full else [])
    extra = [cache] if cache is not None else []
    return _dispatcher("load-balance", pipelines, settings, rng, full=full,
                       extra_features=extra, observers=extra)


def _with_tie_break(settings: DispatchSettings, metric: Metric) -> list[Metric]:
    """The load metric, then `decode_batch_size` where prediction empties the prefill queues.

    Predictor-enhanced scheduling replays each instance's prefill queue, local account
    included, so every instance that has caught up reads exactly 0 `all_prefills_tokens_num`:
    at moderate load most of them, on most dispatches. The first of equals (the lowest id)
    would then take request after request, each adding a decode that slows its later steps
    (bench/RESULTS.md, "Value of prediction under staleness"); among equal prefill loads the
    fewest decodes, the account's in-flight ones included, spreads them instead.
    """
    tie_break = (settings.enable_full_mode_scheduling
                 and settings.enable_predictor_enhanced_scheduling
                 and metric.name == "all_prefills_tokens_num")
    return [metric, make_metric("decode_batch_size")] if tie_break else [metric]


def _flood(settings: DispatchSettings, rng: random.Random) -> Dispatcher:
    if not settings.enable_full_mode_scheduling:
        raise ConfigError("--scheduling-policy flood needs --enable-full-mode-scheduling=true")
    pipelines = {t: Pipeline(_health_filters(settings), FixedPreferenceSelector(),
                             [Failover(settings.failover_domain)]) for t in INFER_TYPES}
    return _dispatcher("flood", pipelines, settings, rng, full=True)


def _lite_selector(name: str, make: Callable[[], Selector]) -> PolicyFactory:
    def factory(settings: DispatchSettings, rng: random.Random) -> Dispatcher:
        pipelines = {t: Pipeline([], make()) for t in INFER_TYPES}
        return _dispatcher(name, pipelines, settings, rng, full=False)

    return factory


def _slo(settings: DispatchSettings, rng: random.Random, model: SloLatencyModel) -> Dispatcher:
    """Upstream's `slo` policy: hard predicted-latency thresholds, least predicted latency.

    Prefill legs need `predicted_ttft < --ttft-slo x --ttft-slo-dispatch-threshold`, decode legs
    the same for TPOT, neutral legs both (upstream configures no neutral pipeline); when no
    instance passes, nothing is available (HTTP 429 at the gateway, which retries).
    """
    if not settings.enable_full_mode_scheduling:
        raise ConfigError("--scheduling-policy slo needs --enable-full-mode-scheduling=true")
    if getattr(settings, "enable_adaptive_pd", False):
        return adaptive_pd(settings, rng, model, _dispatcher)
    ttft, tpot = make_metric("predicted_ttft"), make_metric("predicted_tpot")
    s = settings
    ttft_ok = MetricThreshold(ttft, s.ttft_slo * s.ttft_slo_dispatch_threshold, soft=False)
    tpot_ok = MetricThreshold(tpot, s.tpot_slo * s.tpot_slo_dispatch_threshold, soft=False)
    health, failover = _health_filters(settings), [Failover(settings.failover_domain)]
    pipelines = {
        InferType.PREFILL: Pipeline([*health, ttft_ok], MetricSelector([ttft]), failover),
        InferType.DECODE: Pipeline([*health, tpot_ok], MetricSelector([tpot]), failover),
        InferType.NEUTRAL: Pipeline([*health, ttft_ok, tpot_ok], MetricSelector([ttft, tpot]),
                                    failover),
    }
    return _dispatcher("slo", pipelines, settings, rng, full=True,
                       extra_features=[SloPrediction(model)])


def _dispatcher(name: str, pipelines: dict[InferType, Pipeline], settings: DispatchSettings,
                rng: random.Random, *, full: bool, extra_features: Sequence[Feature] = (),
                observers: Sequence[PlacementObserver] = ()) -> Dispatcher:
    account = None
    if full and settings.enable_instance_status_local_account:
        account = LocalAccount(settings.request_local_account_staleness_seconds)
    features: list[Feature] = []
    if full and settings.enable_predictor_enhanced_scheduling:
        warmup = settings.num_predictor_warmup_samples
        max_tokens = settings.max_num_batched_tokens
        shared = not settings.per_instance_predictors
        bank: PredictorBank | StructuralBank = PredictorBank(warmup, shared=shared)
        if settings.step_predictor == "structural":
            bank = StructuralBank(warmup, shared=shared, max_tokens=max_tokens)
        features.append(PredictorEnhancement(bank, max_tokens, account))
    return Dispatcher(name, pipelines, rng, full_mode=full, local_account=account,
                      needs_cms=full, features=[*features, *extra_features], observers=observers)


def _lite_requests() -> MetricSelector:
    return MetricSelector([make_metric("num_requests", full_mode=False)])


POLICIES: dict[str, PolicyFactory] = {
    "load-balance": _load_balance,
    "flood": _flood,
    "round-robin": _lite_selector("round-robin", RoundRobinSelector),
    "random": _lite_selector("random", RandomSelector),
    "least-requests": _lite_selector("least-requests", _lite_requests),
    "power-of-two": _lite_selector(
        "power-of-two", lambda: PowerOfTwoSelector(make_metric("num_requests", full_mode=False))),
    **PEER_POLICIES,
    **CACHE_PEER_POLICIES,
    **PRISM_POLICIES,
}


SLO_POLICY = "slo"


def make_dispatcher(
    name: str, settings: DispatchSettings, rng: random.Random,
    extra: dict[str, PolicyFactory] | None = None, *, slo_model: SloLatencyModel | None = None,
) -> Dispatcher:
    """Build the policy called `name` (also looking in `extra`, e.g. the simulator's oracle).

    The `slo` policy needs the latency model of its profiling files, loaded by the caller.
    `--enable-adaptive-pd` turns it into adaptive PD (`policy/adaptive_pd.py`) and is an
    error with any other policy or in lite mode.
    """
    if getattr(settings, "enable_adaptive_pd", False):  # a scheduler flag, not a dispatch one
        if not settings.enable_full_mode_scheduling:
            raise ConfigError("--enable-adaptive-pd needs --enable-full-mode-scheduling=true")
        if name != SLO_POLICY:
            raise ConfigError(f"--enable-adaptive-pd needs --scheduling-policy slo, got {name!r}")
    if name == SLO_POLICY:
        if slo_model is None:
            raise ConfigError("the slo policy needs --ttft-profiling-data-path and "
                              "--tpot-profiling-data-path (make them with `prescient profile`)")
        return _slo(settings, rng, slo_model)
    table = {**POLICIES, **(extra or {})}
    factory = table.get(name)
    if factory is None:
        known = ", ".join(sorted([*table, SLO_POLICY]))
        raise ConfigError(f"unknown policy {name!r}; known policies: {known}")
    return factory(settings, rng)
