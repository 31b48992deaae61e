from __future__ import annotations

import random

import msgspec
import pytest

from prescient.cms.view import ProfilingSample
from prescient.config.scheduler import SchedulerSettings
from prescient.model import InferType, InstanceMetadata, InstanceStatus, Request
from prescient.policy import make_dispatcher
from prescient.policy.framework import SchedulingContext
from prescient.policy.metrics import make_metric
from prescient.policy.state import ClusterState
from prescient.predict.enhanced import PredictorEnhancement
from prescient.predict.quadratic import PredictorBank


def linear_samples(iid: str, n: int = 30) -> list[ProfilingSample]:
    tokens = range(500, 500 + 100 * n, 100)
    return [ProfilingSample(instance_id=iid, num_scheduled_prefill_tokens=x,
                            step_duration_ms=10.0 + 0.01 * x) for x in tokens]


def state(kind: InferType = InferType.NEUTRAL, budget: int = 0) -> ClusterState:
    st = ClusterState([InstanceMetadata(instance_id="i0", instance_type=kind,
                                        max_num_batched_tokens=budget)])
    st.set_status(0, InstanceStatus(instance_id="i0", timestamp_ms=0, update_id=1,
                                    num_uncomputed_tokens_all_waiting_prefills=10_000,
                                    num_total_gpu_tokens=100_000))
    return st


def test_replay_subtracts_what_the_instance_computed_since_its_status() -> None:
    feature = PredictorEnhancement(PredictorBank(20, shared=True), max_num_batched_tokens=8192)
    st = state()
    feature.on_statuses(st, linear_samples("i0"), 0.0)
    ctx = SchedulingContext(Request(request_id="r", prompt_len=10), st, 0.05, random.Random(0))
    feature.prepare(ctx)
    # 50 ms: one 8192-token step takes 10 + 81.92 ms, so 50/91.92 of it is apportioned
    assert ctx.predicted_computed_tokens[0] == round(8192 * 50 / 91.92)
    ctx = SchedulingContext(Request(request_id="r", prompt_len=10), st, 0.5, random.Random(0))
    feature.prepare(ctx)
    assert ctx.predicted_computed_tokens[0] == 10_000  # all of it, and never more
    assert make_metric("all_prefills_tokens_num").compute(ctx)[0] == 0


def test_decode_instances_and_unfitted_predictors_predict_nothing() -> None:
    feature = PredictorEnhancement(PredictorBank(20), max_num_batched_tokens=8192)
    st = state(InferType.DECODE)
    feature.on_statuses(st, linear_samples("i0"), 0.0)
    ctx = SchedulingContext(Request(request_id="r", prompt_len=10), st, 0.5, random.Random(0))
    feature.prepare(ctx)
    assert ctx.predicted_computed_tokens[0] == 0
    fresh = PredictorEnhancement(PredictorBank(20), max_num_batched_tokens=8192)
    ctx = SchedulingContext(Request(request_id="r", prompt_len=10), state(), 0.5, random.Random(0))
    fresh.prepare(ctx)
    assert ctx.predicted_computed_tokens[0] == 0
    with pytest.raises(ValueError, match="max-num-batched-tokens"):
        PredictorEnhancement(PredictorBank(20), max_num_batched_tokens=0)


def test_the_instance_budget_wins_over_the_flag() -> None:
    feature = PredictorEnhancement(PredictorBank(20, shared=True), max_num_batched_tokens=65536)
    st = state(budget=1000)
    feature.on_statuses(st, linear_samples("i0"), 0.0)
    ctx = SchedulingContext(Request(request_id="r", prompt_len=10), st, 0.04, random.Random(0))
    feature.prepare(ctx)
    assert ctx.predicted_computed_tokens[0] == 2000  # two 20 ms steps of 1,000 tokens


def test_load_balance_gets_the_feature_only_in_full_mode_when_enabled() -> None:
    on = msgspec.structs.replace(SchedulerSettings(), enable_predictor_enhanced_scheduling=True)
    assert make_dispatcher("load-balance", on, random.Random(0)).features
    assert not make_dispatcher("load-balance", SchedulerSettings(), random.Random(0)).features
    lite = msgspec.structs.replace(on, enable_full_mode_scheduling=False,
                                   dispatch_neutral_load_metric="num_tokens")
    assert not make_dispatcher("load-balance", lite, random.Random(0)).features


def test_per_instance_predictors_keep_one_bank_entry_per_instance() -> None:
    per = msgspec.structs.replace(SchedulerSettings(), enable_predictor_enhanced_scheduling=True,
                                  per_instance_predictors=True)
    bank = make_dispatcher("load-balance", per, random.Random(0)).features[0].bank
    assert not bank.shared
    on = msgspec.structs.replace(per, per_instance_predictors=False)
    assert make_dispatcher("load-balance", on, random.Random(0)).features[0].bank.shared
