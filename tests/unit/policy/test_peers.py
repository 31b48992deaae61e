from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from prescient.policy import make_dispatcher, registry
from prescient.policy.peers import (
    SCRAPE_INTERVAL_S,
    TokenLoadPowerOfTwo,
    WeightedScorePicker,
    _kv_usage,
    _queue_score,
)
from prescient.policy.registry import disabled_in_lite_mode

from .conftest import Settings, ctx_for, meta, request, state_of, status


def cluster(waiting: list[int], used: list[int]):
    return state_of(*[(meta(f"i{k}"), status(f"i{k}", num_waiting_requests=w,
                                              num_used_gpu_tokens=u))
                      for k, (w, u) in enumerate(zip(waiting, used, strict=True))])


def test_llm_d_scores_queue_and_kv_utilisation_with_weights_2_and_2() -> None:
    state = cluster(waiting=[0, 4, 8], used=[9000, 1000, 0])  # capacity 10,000 tokens
    rows = np.arange(3)
    ctx = ctx_for(state)
    assert _queue_score(ctx, rows).tolist() == [1.0, 0.5, 0.0]
    assert (1 - _kv_usage(ctx)) == pytest.approx([0.1, 0.9, 1.0])
    picker = WeightedScorePicker([(2.0, _queue_score), (2.0, lambda c, r: 1 - _kv_usage(c)[r])])
    # totals: 2.2, 2.8, 2.0 -> the middle one
    assert picker.select(ctx, rows) == 1
    assert _queue_score(ctx_for(cluster([3, 3], [0, 0])), np.arange(2)).tolist() == [1.0, 1.0]


def test_sglang_power_of_two_compares_token_loads_once_known() -> None:
    state = cluster(waiting=[0, 0, 0, 0], used=[4000, 100, 3000, 200])
    for seed in range(20):
        ctx = ctx_for(state, seed=seed)
        a, b = ctx_for(state, seed=seed).rng.sample(range(4), 2)
        expected = min((a, b), key=[4000, 100, 3000, 200].__getitem__)
        assert TokenLoadPowerOfTwo().select(ctx, np.arange(4)) == expected


def test_peer_policies_are_registered_and_scrape_every_50_ms(settings: Settings) -> None:
    for name in ("llm-d", "aibrix-least-request", "aibrix-least-kv-cache",
                 "sglang-power-of-two"):
        d = make_dispatcher(name, settings, random.Random(0))
        assert d.scrape_interval_s == SCRAPE_INTERVAL_S
        d.on_instances({"i0": meta("i0"), "i1": meta("i1")}, 0.0)
        d.on_statuses({"i0": status("i0", num_used_gpu_tokens=5000), "i1": status("i1")}, 0.1)
        assert d.schedule(request(), 0.2).instance_id in ("i0", "i1")
    kv = make_dispatcher("aibrix-least-kv-cache", settings, random.Random(0))
    kv.on_instances({"i0": meta("i0"), "i1": meta("i1")}, 0.0)
    kv.on_statuses({"i0": status("i0", num_used_gpu_tokens=5000), "i1": status("i1")}, 0.1)
    assert kv.schedule(request(), 0.2).instance_id == "i1"


def test_full_mode_features_are_disabled_in_lite_mode_with_a_warning(caplog, monkeypatch) -> None:
    monkeypatch.setattr(registry, "_warned", set())
    lite = replace(Settings(), enable_full_mode_scheduling=False)
    lite.enable_cache_aware_scheduling = True  # type: ignore[attr-defined]
    lite.enable_rescheduling = True  # type: ignore[attr-defined]
    assert disabled_in_lite_mode(lite) == ["enable_cache_aware_scheduling", "enable_rescheduling"]
    assert "--enable-cache-aware-scheduling needs --enable-full-mode-scheduling=true" in caplog.text
    assert disabled_in_lite_mode(Settings()) == []
