"""Tests for prescient.sim.metrics: statistics, trimming, SLO accounting, deterministic JSON."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest

from prescient.sim.metrics import (
    SloSpec,
    Stats,
    compute_stats,
    round_floats,
    summarize,
    summary_to_json,
    to_deterministic_json,
)
from prescient.sim.records import RequestRecord


def rec(
    i: int,
    arrival: float,
    *,
    ttft: float | None = 0.1,
    decode: float | None = 0.4,
    output_len: int = 5,
    queueing: float = 0.0,
    rejected: str = "",
    preemptions: int = 0,
) -> RequestRecord:
    """A request arriving at `arrival`, first token `ttft` later, finishing `decode` after that."""
    first = None if ttft is None else arrival + ttft
    finish = None if first is None or decode is None else first + decode
    return RequestRecord(
        request_id=f"r{i}",
        arrival_time=arrival,
        prompt_len=10,
        output_len=output_len,
        instance_id="" if rejected else "i0",
        first_scheduled_time=None if rejected else arrival + queueing,
        first_token_time=first,
        finish_time=finish,
        num_preemptions=preemptions,
        rejected=rejected,
    )


def test_compute_stats_matches_hand_computed_values() -> None:
    values = [0.1, 0.2, 0.3, 0.4]
    stats = compute_stats(values)
    assert stats.count == 4
    assert stats.mean == pytest.approx(0.25)
    assert stats.p50 == pytest.approx(0.25)
    # numpy linear: rank 0.99 * 3 = 2.97 -> 0.3 + 0.97 * 0.1
    assert stats.p99 == pytest.approx(0.397)
    assert stats.p90 == pytest.approx(0.37)
    assert stats.max == pytest.approx(0.4)
    assert stats.p99 == pytest.approx(float(np.percentile(values, 99)))


def test_compute_stats_empty_is_all_none() -> None:
    assert compute_stats([]) == Stats(count=0)
    assert compute_stats([]).p99 is None


def test_summarize_counts_latencies_and_ttft_stats() -> None:
    records = [rec(i, float(i), ttft=t) for i, t in enumerate([0.1, 0.2, 0.3, 0.4])]
    s = summarize("p", records)
    assert (s.num_requests, s.num_completed, s.num_rejected, s.num_unfinished) == (4, 4, 0, 0)
    assert s.ttft.mean == pytest.approx(0.25)
    assert s.ttft.p50 == pytest.approx(0.25)
    assert s.e2e.count == 4
    assert s.slo_attainment is None


def test_warmup_and_cooldown_trim_by_arrival_time() -> None:
    records = [rec(i, float(i)) for i in range(10)]  # arrivals 0..9
    s = summarize("p", records, warmup_s=2.0, cooldown_s=3.0)
    # measured: arrivals in [2, 6] -> requests 2..6
    assert s.num_requests == 5
    assert s.ttft.count == 5
    assert s.duration_s == pytest.approx(6.5 - 2.0)  # last finish 6 + 0.5


def test_trimming_that_leaves_nothing_raises() -> None:
    records = [rec(i, float(i)) for i in range(3)]
    with pytest.raises(ValueError, match="leave no requests"):
        summarize("p", records, warmup_s=1.5, cooldown_s=1.0)
    with pytest.raises(ValueError, match="no requests"):
        summarize("p", [])
    with pytest.raises(ValueError, match=">= 0"):
        summarize("p", records, warmup_s=-1.0)


def test_rejected_and_unfinished_count_as_slo_misses() -> None:
    records = [
        rec(0, 0.0, ttft=0.1),  # meets
        rec(1, 0.0, ttft=0.5),  # ttft miss
        rec(2, 0.0, ttft=None, rejected="queue full"),  # rejected
        rec(3, 0.0, ttft=0.1, decode=None),  # unfinished (has a first token)
        rec(4, 0.0, ttft=None),  # unfinished, never started
    ]
    s = summarize("p", records, slo=SloSpec(ttft_s=0.2))
    assert (s.num_requests, s.num_completed, s.num_rejected, s.num_unfinished) == (5, 2, 1, 2)
    assert s.slo_attainment == pytest.approx(1 / 5)
    # TTFT stats include the unfinished request that produced a token, not the rejected one.
    assert s.ttft.count == 3
    assert s.e2e.count == 2


def test_tpot_excluded_for_single_token_outputs() -> None:
    records = [
        rec(0, 0.0, output_len=1, decode=0.0),
        rec(1, 0.0, output_len=5, decode=0.4),  # tpot 0.1
        rec(2, 0.0, output_len=3, decode=0.6),  # tpot 0.3 -> misses 0.2
    ]
    s = summarize("p", records, slo=SloSpec(tpot_s=0.2))
    assert s.tpot.count == 2
    assert s.tpot.mean == pytest.approx(0.2)
    # The one-token request has no TPOT, so the TPOT target counts as met for it.
    assert s.slo_attainment == pytest.approx(2 / 3)


def test_throughput_over_the_measurement_window() -> None:
    records = [
        rec(0, 1.0, ttft=0.5, decode=1.5, output_len=10),  # finishes at 3.0
        rec(1, 2.0, ttft=0.5, decode=2.5, output_len=30),  # finishes at 5.0
        rec(2, 3.0, ttft=None, rejected="too long", output_len=99),
    ]
    s = summarize("p", records)
    assert s.duration_s == pytest.approx(4.0)  # arrival 1.0 -> last finish 5.0
    assert s.output_tokens == 40
    assert s.throughput_rps == pytest.approx(2 / 4.0)
    assert s.throughput_tok_s == pytest.approx(40 / 4.0)


def test_preemption_counts() -> None:
    records = [rec(0, 0.0, preemptions=2), rec(1, 0.0), rec(2, 0.0, preemptions=1)]
    s = summarize("p", records)
    assert s.num_preemptions == 3
    assert s.preempted_requests == 2


def test_slo_spec_rejects_nonpositive_targets() -> None:
    with pytest.raises(ValueError, match="ttft_s"):
        SloSpec(ttft_s=0.0)
    with pytest.raises(ValueError, match="tpot_s"):
        SloSpec(tpot_s=math.nan)


def test_summary_to_json_is_deterministic_and_sorted() -> None:
    records = [rec(i, i * 0.1, ttft=0.1 * (i + 1)) for i in range(7)]
    a = summarize("p", records, slo=SloSpec(ttft_s=0.3))
    b = summarize("p", list(records), slo=SloSpec(ttft_s=0.3))
    assert summary_to_json([a]) == summary_to_json([b])
    decoded = msgspec.json.decode(summary_to_json([a]))
    assert list(decoded[0]) == sorted(decoded[0])
    assert list(decoded[0]["ttft"]) == sorted(decoded[0]["ttft"])
    assert decoded[0]["policy"] == "p"


def test_summary_to_json_rounds_to_six_significant_digits() -> None:
    records = [rec(0, 0.0, ttft=0.1234567891), rec(1, 3.0, ttft=0.1234567891)]
    base = summarize("p", records)
    noisy = msgspec.structs.replace(base, throughput_tok_s=base.throughput_tok_s * (1 + 1e-12))
    assert summary_to_json([base]) == summary_to_json([noisy])
    decoded = msgspec.json.decode(summary_to_json([base]))
    assert decoded[0]["ttft"]["mean"] == 0.123457
    assert b"0.1234567" not in summary_to_json([base])


def test_round_floats_and_json_edge_cases() -> None:
    assert round_floats({"a": [12345.678, -0.0, math.inf], "b": (1, "x")}) == {
        "a": [12345.7, 0.0, None],
        "b": [1, "x"],
    }
    assert to_deterministic_json({"b": 1, "a": 2.0}) == b'{"a":2.0,"b":1}'
    with pytest.raises(TypeError, match="cannot encode"):
        to_deterministic_json({"x": object()})
