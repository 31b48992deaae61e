from __future__ import annotations

import numpy as np
import pytest

from prescient.errors import ConfigError
from prescient.policy.metrics import METRIC_NAMES, LinearMetric, make_metric

from .conftest import ctx_for, meta, request, state_of, status


def two_instances():
    a = status("a", num_used_gpu_tokens=1000, num_uncomputed_tokens_all_waiting_prefills=300,
               num_unallocated_tokens_scheduler_running_prefills=200,
               num_unallocated_tokens_hybrid_scheduler_waiting_decodes=100,
               num_uncomputed_tokens_scheduler_running_prefills=250,
               hybrid_scheduler_waiting_to_decode_requests_num=1, num_loading_requests=2,
               scheduler_waiting_to_decode_requests_num=3,
               scheduler_running_to_decode_requests_num=4, num_waiting_requests=5,
               num_running_requests=6, hybrid_scheduler_waiting_to_decode_tokens_num=10,
               scheduler_waiting_to_decode_tokens_num=20, scheduler_running_to_decode_tokens_num=30,
               num_tokens_loading_requests=40)
    b = status("b", num_total_gpu_tokens=0)
    state = state_of((meta("a"), a), (meta("b"), b))
    # local account of a: prefill reqs 1, decode reqs 2, reqs 3, prefill tokens 50, decode tokens 70
    state.set_account(0, (1, 2, 3, 50, 70))
    return state


EXPECTED_A = {
    "kv_cache_usage_ratio_projected": (1000 + 300 + 200 + 100 + 70) / 10_000,
    "decode_batch_size": 1 + 2 + 3 + 4 + 2,
    "num_waiting_requests": 5 + 3,
    "all_prefills_tokens_num": 300 + 250 + 50,
    "kv_cache_hit_len": 0,
    "cache_aware_all_prefills_tokens_num": 100 + 300 + 250 + 50,
    "num_requests": 5 + 2 + 6 + 1 + 2,
    "all_decodes_tokens_num": 10 + 20 + 30 + 40 + 70,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_A))
def test_full_mode_metric_formulas_against_a_hand_built_status(name: str) -> None:
    ctx = ctx_for(two_instances(), request(prompt=100))
    assert make_metric(name).compute(ctx)[0] == pytest.approx(EXPECTED_A[name])


def test_kv_usage_is_infinite_without_capacity_and_hit_len_is_higher_better() -> None:
    ctx = ctx_for(two_instances())
    assert make_metric("kv_cache_usage_ratio_projected").compute(ctx)[1] == np.inf
    assert not make_metric("kv_cache_hit_len").lower_is_better
    assert all(make_metric(n).lower_is_better for n in EXPECTED_A if n != "kv_cache_hit_len")


def test_cache_aware_miss_is_the_whole_prompt_where_nothing_is_cached() -> None:
    ctx = ctx_for(two_instances(), request(prompt=1000))
    ctx.prefix_hit_tokens = np.array([768.0, 0.0])
    values = make_metric("cache_aware_all_prefills_tokens_num").compute(ctx)
    assert values.tolist() == [232 + 600, 1000 + 0]
    assert make_metric("kv_cache_hit_len").compute(ctx).tolist() == [768, 0]


def test_predictor_inputs_reduce_prefills_and_feed_predicted_metrics() -> None:
    ctx = ctx_for(two_instances())
    assert make_metric("predicted_ttft").compute(ctx).tolist() == [np.inf, np.inf]
    ctx.predicted_computed_tokens = np.array([100.0, 0.0])
    ctx.predicted_ttft_ms = np.array([12.0, 30.0])
    assert make_metric("all_prefills_tokens_num").compute(ctx)[0] == 500
    assert make_metric("predicted_ttft").compute(ctx).tolist() == [12.0, 30.0]


def test_lite_metrics_read_router_local_counts_and_full_only_names_are_refused() -> None:
    state = two_instances()
    state.set_lite(1, 4, 900)
    ctx = ctx_for(state)
    assert make_metric("num_requests", full_mode=False).compute(ctx).tolist() == [0, 4]
    assert make_metric("num_tokens", full_mode=False).compute(ctx).tolist() == [0, 900]
    with pytest.raises(ConfigError, match="lite mode"):
        make_metric("all_prefills_tokens_num", full_mode=False)
    with pytest.raises(ConfigError, match="full mode"):
        make_metric("num_tokens", full_mode=True)
    assert "predicted_tpot" in METRIC_NAMES


@pytest.mark.parametrize("full_mode", [True, False])
def test_linear_metrics_read_in_plain_python_equal_their_numpy_columns(full_mode: bool) -> None:
    """`LinearMetric.values_at` (decisions at a few instances) and `compute` agree on every
    row, after count writes the numpy columns have not taken yet."""
    state = two_instances()
    state.set_account(1, (2, 1, 2, 4096, 333))
    state.set_lite(0, 3, 700)
    state.set_lite(1, 1, 90)
    linear = [name for name in METRIC_NAMES
              if isinstance(_maybe(name, full_mode), LinearMetric)]
    assert set(linear) >= ({"all_prefills_tokens_num", "num_requests", "decode_batch_size"}
                           if full_mode else {"num_requests", "num_tokens"})
    for name in linear:
        metric = make_metric(name, full_mode=full_mode)
        ctx = ctx_for(state)
        assert metric.values_at(ctx, [0, 1]) == metric.compute(ctx).tolist(), name
        assert metric.values_at(ctx, [1]) == [metric.compute(ctx)[1]], name


def test_a_linear_metric_with_the_per_request_column_set_is_numpy_only() -> None:
    ctx = ctx_for(two_instances())
    metric = make_metric("all_prefills_tokens_num")
    assert metric.values_at(ctx, [0, 1]) == [600, 0]
    ctx.predicted_computed_tokens = np.array([100.0, 0.0])
    assert metric.values_at(ctx, [0, 1]) is None
    assert metric.compute(ctx).tolist() == [500, 0]


def _maybe(name: str, full_mode: bool) -> object:
    try:
        return make_metric(name, full_mode=full_mode)
    except ConfigError:
        return None
