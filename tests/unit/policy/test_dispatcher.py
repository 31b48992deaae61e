from __future__ import annotations

import random
from dataclasses import replace

import pytest

from prescient.cms import CmsUnavailableError
from prescient.errors import ConfigError
from prescient.model import InferType
from prescient.policy import POLICIES, SchedulingMode, make_dispatcher, registry

from .conftest import Settings, meta, request, status

P, D, N = InferType.PREFILL, InferType.DECODE, InferType.NEUTRAL


def dispatcher(settings: Settings, name: str = "load-balance", types: str = "NN", seed: int = 0):
    kinds = {"P": P, "D": D, "N": N}
    d = make_dispatcher(name, settings, random.Random(seed))
    d.on_instances({f"i{k}": meta(f"i{k}", kinds[t]) for k, t in enumerate(types)}, 0.0)
    return d


def test_local_account_spreads_a_burst_between_polls(settings: Settings) -> None:
    d = dispatcher(settings, types="NNN")
    d.on_statuses({f"i{k}": status(f"i{k}") for k in range(3)}, 1.0)
    picks = [d.schedule(request(1000, f"r{k}"), 1.1).instance_id for k in range(6)]
    assert picks == ["i0", "i1", "i2", "i0", "i1", "i2"]
    without = dispatcher(replace(settings, enable_instance_status_local_account=False), types="NNN")
    without.on_statuses({f"i{k}": status(f"i{k}") for k in range(3)}, 1.0)
    assert {without.schedule(request(1000, f"r{k}"), 1.1).instance_id for k in range(6)} == {"i0"}


def test_reconciliation_hands_the_load_over_to_the_status(settings: Settings) -> None:
    d = dispatcher(settings, types="NN")
    d.on_statuses({"i0": status("i0"), "i1": status("i1")}, 1.0)
    assert d.schedule(request(1000, "r1"), 1.1).instance_id == "i0"
    row = d.state.row("i0")
    assert d.state.a("num_uncomputed_tokens_inflight_dispatch_prefill_requests")[row] == 1000
    # the engine now shows r1 waiting: the status carries its tokens, the account does not
    seen = status("i0", ts_ms=1500, num_uncomputed_tokens_all_waiting_prefills=1000,
                  recent_waiting_requests=("r1",), waiting_requests=("r1",))
    d.on_statuses({"i0": seen}, 1.5)
    assert d.state.a("num_uncomputed_tokens_inflight_dispatch_prefill_requests")[row] == 0
    assert d.state.s("num_uncomputed_tokens_all_waiting_prefills")[row] == 1000
    assert d.schedule(request(10, "r2"), 1.6).instance_id == "i1"


def test_pd_batch_places_both_legs_and_reverts_the_prefill_without_a_decode(settings) -> None:
    d = dispatcher(settings, types="PD")
    d.on_statuses({"i0": status("i0"), "i1": status("i1")}, 1.0)
    decision = d.schedule(request(100, "r1"), 1.1, SchedulingMode.PD_BATCH)
    assert [(p.instance_id, p.infer_type) for p in decision.placements] == [("i0", P), ("i1", D)]
    d.on_statuses({"i1": status("i1", ts_ms=2000, schedulable=False)}, 2.0)
    assert d.schedule(request(100, "r2"), 2.1, SchedulingMode.PD_BATCH).placements == ()
    row = d.state.row("i0")
    assert d.state.a("num_inflight_dispatch_prefill_requests")[row] == 1  # r1 only: r2 reverted
    staged = d.schedule(request(100, "r3"), 2.2, SchedulingMode.PD_STAGED, stage=P)
    assert [p.infer_type for p in staged.placements] == [P]
    with pytest.raises(ValueError, match="stage"):
        d.schedule(request(100, "r4"), 2.3, SchedulingMode.PD_STAGED)


def test_unschedulable_and_stale_instances_are_avoided_then_nothing_is_available(settings) -> None:
    d = dispatcher(settings, types="NN")
    d.on_statuses({"i0": status("i0", schedulable=False), "i1": status("i1", ts_ms=1000)}, 1.0)
    assert d.schedule(request(), 2.0).instance_id == "i1"
    assert d.schedule(request(rid="late"), 62.0).placements == ()  # i1's status is 61 s old


def test_full_mode_needs_the_cms_and_lite_mode_does_not(settings: Settings) -> None:
    d = dispatcher(settings)
    d.mark_cms_unavailable("redis down")
    with pytest.raises(CmsUnavailableError, match="redis down"):
        d.schedule(request(), 1.0)
    lite = dispatcher(replace(settings, enable_full_mode_scheduling=False,
                              dispatch_neutral_load_metric="num_requests"))
    lite.mark_cms_unavailable("redis down")
    assert lite.schedule(request(), 1.0).instance_id == "i0"  # no status needed in lite mode


def test_lite_counts_return_to_zero_after_release(settings: Settings) -> None:
    lite = dispatcher(replace(settings, enable_full_mode_scheduling=False,
                              dispatch_neutral_load_metric="num_tokens"), types="NNN")
    rids = [f"r{k}" for k in range(30)]
    picks = [lite.schedule(request(100 + k, rid), 1.0).instance_id for k, rid in enumerate(rids)]
    assert len(set(picks)) == 3
    assert lite.state.lite[:, 0].sum() == 30
    lite.report("r0", picks[0], 5000)  # the gateway saw r0 grow: tokens only ever rise
    lite.report("r0", picks[0], 10)
    assert lite.state.lite[lite.state.row(picks[0]), 1] >= 5000
    for rid in rids:
        lite.release(rid, 2.0)
    assert lite.state.lite.sum() == 0


def test_lite_mode_forces_a_full_only_metric_to_num_tokens_with_a_warning(settings, caplog,
                                                                         monkeypatch) -> None:
    monkeypatch.setattr(registry, "_warned", set())
    lite = dispatcher(replace(settings, enable_full_mode_scheduling=False), types="NN")
    assert "becomes num_tokens" not in caplog.text  # the full-mode defaults switch silently
    assert lite.schedule(request(), 1.0).instance_id == "i0"
    dispatcher(replace(settings, enable_full_mode_scheduling=False,
                       dispatch_neutral_load_metric="decode_batch_size"), types="NN")
    assert "--dispatch-neutral-load-metric decode_batch_size becomes num_tokens" in caplog.text


def test_flood_and_unknown_policies(settings: Settings) -> None:
    d = dispatcher(settings, "flood", types="NNN")
    d.on_statuses({f"i{k}": status(f"i{k}") for k in range(3)}, 1.0)
    assert {d.schedule(request(rid=f"r{k}"), 1.1).instance_id for k in range(5)} == {"i0"}
    with pytest.raises(ConfigError, match="full-mode"):
        make_dispatcher("flood", replace(settings, enable_full_mode_scheduling=False),
                        random.Random(0))
    with pytest.raises(ConfigError, match="known policies"):
        make_dispatcher("nope", settings, random.Random(0))
    assert {"load-balance", "flood", "round-robin"} <= set(POLICIES)


def test_instances_that_vanish_take_their_account_with_them(settings: Settings) -> None:
    d = dispatcher(settings, types="NN")
    d.on_statuses({"i0": status("i0"), "i1": status("i1")}, 1.0)
    d.schedule(request(rid="r1"), 1.1)
    d.on_instances({"i1": meta("i1")}, 2.0)
    assert d.state.ids == ("i1",)
    assert d.schedule(request(rid="r2"), 2.1).instance_id == "i1"


def test_predicted_decode_tokens_follow_dispatches_and_releases(settings: Settings) -> None:
    import msgspec

    from prescient.policy.metrics import make_metric

    lite = dispatcher(replace(settings, enable_full_mode_scheduling=False,
                              dispatch_neutral_load_metric="predicted_decode_tokens"), types="NN")
    picks = []
    for k, predicted in enumerate((500, 100, 50)):
        r = msgspec.structs.replace(request(100, f"r{k}"), predicted_output_len=predicted)
        picks.append(lite.schedule(r, 1.0).instance_id)
    assert picks == ["i0", "i1", "i1"]  # i1 holds 100 < 500 predicted tokens
    assert lite.state.predicted_output.tolist() == [500, 150]
    lite.release("r0", 2.0)
    assert lite.state.predicted_output.tolist() == [0, 150]
    assert make_metric("predicted_decode_tokens", full_mode=True).name == "predicted_decode_tokens"
