"""Each rescheduling policy's pairs on hand-built cluster views (reference §7.2, §5.3)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest

from prescient.errors import ConfigError
from prescient.model import InferType
from prescient.predict.slo import SloLatencyModel, load_tpot_profile, load_ttft_profile
from prescient.rescheduler import (
    DRAIN,
    MigrationPlan,
    Rescheduler,
    make_rescheduler,
    make_rescheduling_policy,
)
from prescient.rescheduler.policies import RESCHEDULING_POLICIES

from .conftest import meta, settings, status, usage, view

NOW = 1.0  # seconds; statuses are stamped at 1000 ms


def pairs(name: str, state, now: float = NOW, **kw: object) -> list[tuple[str, str]]:
    policy = make_rescheduling_policy(name, settings(**kw))
    return policy.select_pairs(state, now, random.Random(0))


def test_load_balance_pairs_most_loaded_sources_with_least_loaded_destinations() -> None:
    state = usage(1.2, 0.3, 0.9, 1.05)  # threshold 1.0: i0, i3 are sources; i1, i2 destinations
    assert pairs("neutral_load", state) == [("i0", "i1"), ("i3", "i2")]


def test_load_balance_threshold_drops_pairs_with_a_small_gap() -> None:
    state = usage(1.2, 0.3, 0.9, 1.05)
    assert pairs("neutral_load", state, rescheduling_load_balance_threshold=0.2) == [("i0", "i1")]


def test_without_a_load_threshold_pairs_stop_at_the_first_that_would_not_improve() -> None:
    # every instance is both a source and a destination; no self-pair, no crossing back
    state = usage(0.8, 0.1, 0.5)
    assert pairs("neutral_load", state, rescheduling_neutral_load_threshold=0.0) == [("i0", "i1")]
    assert pairs("neutral_load", usage(0.5, 0.5), rescheduling_neutral_load_threshold=0.0) == []


def test_load_threshold_is_inclusive_for_sources_and_exclusive_for_destinations() -> None:
    state = usage(1.0, 0.99)
    assert pairs("neutral_load", state) == [("i0", "i1")]
    assert pairs("neutral_load", usage(0.99, 0.5)) == []  # no source at >= 1.0


def test_unit_scope_balances_within_each_unit() -> None:
    units = [("u0", 0.9), ("u0", 0.8), ("u1", 0.1), ("u1", 0.2)]
    state = view(*[(meta(f"i{k}", unit=u), status(f"i{k}", r)) for k, (u, r) in enumerate(units)])
    cluster = pairs("neutral_load", state, rescheduling_neutral_load_threshold=0.0)
    assert cluster == [("i0", "i2"), ("i1", "i3")]
    # unit scope also drops the threshold filters: the default 1.0 does not matter
    assert pairs("neutral_load", state, rescheduling_load_balance_scope="unit") == [
        ("i0", "i1"), ("i3", "i2")]


def test_decode_load_moves_only_between_decode_instances() -> None:
    state = view((meta("p", InferType.PREFILL), status("p", 1.5)),
                 (meta("d0", InferType.DECODE), status("d0", 1.1)),
                 (meta("d1", InferType.DECODE), status("d1", 0.2)),
                 (meta("n", InferType.NEUTRAL), status("n", 0.0)))
    assert pairs("decode_load", state) == [("d0", "d1")]
    assert pairs("neutral_load", state) == []


def test_the_metric_and_its_threshold_are_the_flags() -> None:
    state = view((meta("a"), status("a", num_waiting_requests=9)),
                 (meta("b"), status("b", num_waiting_requests=2)))
    got = pairs("neutral_load", state, rescheduling_neutral_load_metric="num_waiting_requests",
                rescheduling_neutral_load_threshold=5.0)
    assert got == [("a", "b")]


def test_unhealthy_instances_neither_send_nor_receive_load_migrations() -> None:
    state = view((meta("a"), status("a", 1.5)), (meta("b"), status("b", 1.4, schedulable=False)),
                 (meta("c"), status("c", 0.1)), (meta("d"), status("d", 0.0, ts_ms=0)))
    # d's status is 61 s old at t=61: stale
    assert pairs("neutral_load", state, now=61.0) == [("a", "c")]


def test_load_policies_drop_the_failure_domain_of_a_failed_instance() -> None:
    state = view((meta("a", node="n0"), status("a", 1.5)),
                 (meta("b", node="n0"), status("b", 0.1, schedulable=False)),
                 (meta("c", node="n1"), status("c", 0.5)))
    assert pairs("neutral_load", state, failover_domain="instance") == [("a", "c")]
    assert pairs("neutral_load", state, failover_domain="node") == []  # a shares b's node


def test_failover_spreads_failed_instances_round_robin_over_healthy_ones() -> None:
    state = view((meta("a"), status("a")), (meta("b"), status("b", schedulable=False)),
                 (meta("c"), status("c")), (meta("d"), status("d", ts_ms=0)),
                 (meta("e"), status("e", schedulable=False)))
    # failed, in id order: b, d, e; healthy destinations: a, c
    assert pairs("neutral_failover", state, now=61.0) == [("b", "a"), ("d", "c"), ("e", "a")]


def test_failover_staleness_is_the_flag() -> None:
    state = view((meta("a"), status("a")), (meta("d"), status("d", ts_ms=0)))
    assert pairs("neutral_failover", state, now=61.0) == [("d", "a")]
    assert pairs("neutral_failover", state, now=61.0, instance_staleness_seconds=100) == []


@pytest.mark.parametrize(("domain", "dp", "expected"), [
    ("instance", 1, [("b", "a"), ("c", "d")]),  # the failed b and c themselves
    ("node", 1, [("a", "d"), ("b", "d"), ("c", "d")]),  # a shares b's node n0
    ("instance-unit", 1, [("b", "a"), ("c", "d")]),  # data parallelism off: as instance
    ("instance-unit", 2, [("a", "d"), ("b", "d"), ("c", "d")]),  # a shares b's unit u0
])
def test_failover_sources_are_the_failed_domains(domain: str, dp: int,
                                                 expected: list[tuple[str, str]]) -> None:
    state = view((meta("a", node="n0", unit="u0", dp=dp), status("a")),
                 (meta("b", node="n0", unit="u0", dp=dp), status("b", schedulable=False)),
                 (meta("c", node="n1", unit="u1", dp=dp), status("c", schedulable=False)),
                 (meta("d", node="n2", unit="u2", dp=dp), status("d")))
    assert pairs("neutral_failover", state, failover_domain=domain) == expected


def test_failover_keeps_each_infer_type_to_itself() -> None:
    state = view((meta("p0", InferType.PREFILL), status("p0", schedulable=False)),
                 (meta("p1", InferType.PREFILL), status("p1")),
                 (meta("d0", InferType.DECODE), status("d0", schedulable=False)),
                 (meta("d1", InferType.DECODE), status("d1")))
    assert pairs("prefill_failover", state) == [("p0", "p1")]
    assert pairs("decode_failover", state) == [("d0", "d1")]
    assert pairs("neutral_failover", state) == []


def test_failover_has_nothing_to_do_without_a_failure_or_a_destination() -> None:
    assert pairs("neutral_failover", usage(0.5, 0.9)) == []
    state = view((meta("a"), status("a", schedulable=False)))
    assert pairs("neutral_failover", state) == []


def test_instances_without_a_status_take_no_part() -> None:
    state = view((meta("a"), status("a", 1.5)), (meta("b"), None), (meta("c"), status("c", 0.1)))
    assert pairs("neutral_load", state) == [("a", "c")]
    assert pairs("neutral_failover", state) == []  # b has no status: nothing to judge it by


def test_plans_carry_each_policys_request_selection() -> None:
    state = view((meta("a"), status("a", 1.5)), (meta("b"), status("b", 0.1)),
                 (meta("c"), status("c", schedulable=False)))
    s = settings(rescheduling_policies=("neutral_load", "neutral_failover"),
                 rescheduling_req_select_rule="NUM_REQ", rescheduling_req_select_order="LCR",
                 rescheduling_req_select_value=2)
    plans = make_rescheduler(s, random.Random(0)).plan(state, NOW)
    assert plans == [
        MigrationPlan(src="a", dst="b", rule="NUM_REQ", order="LCR", value=2,
                      trigger="neutral_load"),
        MigrationPlan(src="c", dst="a", rule="NUM_REQ", order="LR", value=DRAIN,
                      trigger="neutral_failover"),
    ]
    assert plans[1].drains and not plans[0].drains


def test_a_pair_reversing_an_accepted_one_is_dropped_and_a_repeat_is_not() -> None:
    state = view((meta("a"), status("a", 1.5, num_waiting_requests=0)),
                 (meta("b"), status("b", 0.1, num_waiting_requests=9)))
    by_usage = make_rescheduling_policy("neutral_load", settings())
    by_queue = make_rescheduling_policy("neutral_load", settings(
        rescheduling_neutral_load_metric="num_waiting_requests",
        rescheduling_neutral_load_threshold=5.0))
    assert by_queue.select_pairs(state, NOW, random.Random(0)) == [("b", "a")]
    plans = Rescheduler([by_usage, by_queue, by_usage], random.Random(0)).plan(state, NOW)
    assert [(p.src, p.dst) for p in plans] == [("a", "b"), ("a", "b")]


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="decode_load"):
        make_rescheduling_policy("nope", settings())
    assert set(RESCHEDULING_POLICIES) == {
        "decode_load", "neutral_load", "prefill_failover", "decode_failover",
        "neutral_failover", "binpacking_mitigation", "binpacking_consolidation"}


# ---- bin-packing (adaptive PD) ----------------------------------------------------------------

# TPOT: 5 ms + 0.5 ms per request in the batch; with a 30 ms SLO the thresholds are
# ceil 0.95 -> 28.5 ms (batch >= 47), dispatch 0.85 -> 25.5 ms (batch < 41), floor 0.6 -> 18 ms
TTFT = {"results": [{"tokens_num": n, "p50": 10 + 0.1 * n} for n in (100, 1000, 8000)]}
TPOT = {"results": [{"batch_size": b, "tokens_per_request": t, "p50": 5 + 0.5 * b}
                    for b in (1, 8, 64) for t in (8, 512, 2048)]}


def slo_model() -> SloLatencyModel:
    return SloLatencyModel.from_profiles(load_ttft_profile(json.dumps(TTFT).encode(), "ttft"),
                                         load_tpot_profile(json.dumps(TPOT).encode(), "tpot"))


@dataclass
class Reserved:
    prefill: str | None = None
    decode: str | None = None


def decoding(**batches: int):
    """Instances decoding `batch` requests of 512 tokens each (predicted TPOT at batch + 1)."""
    return view(*[(meta(iid), status(iid, scheduler_running_to_decode_requests_num=b,
                                     scheduler_running_to_decode_tokens_num=512 * b))
                  for iid, b in batches.items()])


def binpacking(name: str, state, reserved: Reserved | None = None) -> list[tuple[str, str]]:
    policy = make_rescheduling_policy(name, settings(tpot_slo=30.0,
                                                     tpot_slo_dispatch_threshold=0.85),
                                      slo_model=slo_model(), reservations=reserved)
    assert (policy.rule, policy.order, policy.value) == ("NUM_REQ", "LCR", 1)
    return policy.select_pairs(state, NOW, random.Random(0))


def test_mitigation_moves_from_the_hottest_to_the_fullest_instance_under_the_slo() -> None:
    state = decoding(a=50, b=55, c=30, d=35, e=0)  # TPOT a 30.5, b 33, c 20.5, d 23, e 0 ms
    assert binpacking("binpacking_mitigation", state) == [("b", "d")]
    assert binpacking("binpacking_mitigation", state, Reserved(prefill="d")) == [("b", "c")]
    assert binpacking("binpacking_mitigation", state, Reserved(prefill="b")) == [("a", "d")]
    assert binpacking("binpacking_mitigation", decoding(c=30, d=35)) == []  # none too hot


def test_consolidation_moves_the_lightest_decoder_to_the_fullest_or_reserved_one() -> None:
    state = decoding(c=30, d=35, f=10, g=20, idle=0)  # TPOT c 20.5, d 23, f 10.5, g 15.5 ms
    assert binpacking("binpacking_consolidation", state) == [("f", "d")]
    assert binpacking("binpacking_consolidation", state, Reserved(decode="c")) == [("f", "c")]
    # the reserved decode instance never gives its requests away; idle ones never take part
    assert binpacking("binpacking_consolidation", state, Reserved(decode="f")) == [("g", "f")]
    assert binpacking("binpacking_consolidation", state, Reserved(prefill="d")) == [("f", "c")]


def test_bin_packing_needs_the_slo_profiles() -> None:
    with pytest.raises(ConfigError, match="tpot-profiling-data-path"):
        make_rescheduling_policy("binpacking_mitigation", settings())
