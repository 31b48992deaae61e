"""Tests for synthetic workloads, length specs, arrival processes and transformations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from prescient.errors import ConfigError
from prescient.model.request import Request
from prescient.sim.workload import (
    LengthSpec,
    parse_length_spec,
    rebase,
    sample_interarrivals,
    scale_rate,
    session_workload,
    synthetic_workload,
    truncate,
)

# --- length specs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", LengthSpec.fixed(512)),
        (" fixed:7 ", LengthSpec.fixed(7)),
        ("uniform:100:2000", LengthSpec.uniform(100, 2000)),
        ("lognormal:mean=1155,median=1020", LengthSpec.lognormal(mean=1155, median=1020)),
        (
            "lognormal:median=13, mean=28,max=4096,min=2",
            LengthSpec.lognormal(mean=28, median=13, min=2, max=4096),
        ),
        ("LogNormal:mean=10.5,median=10.5", LengthSpec.lognormal(mean=10.5, median=10.5)),
    ],
)
def test_parse_length_spec_accepts_the_documented_forms(text: str, expected: LengthSpec) -> None:
    spec = parse_length_spec(text)
    assert spec == expected
    assert parse_length_spec(str(spec)) == spec  # str() gives back a parseable form


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "0",
        "-3",
        "12.5",
        "uniform:5",
        "uniform:10:5",
        "uniform:0:5",
        "uniform:a:b",
        "normal:5",
        "lognormal:mean=10",
        "lognormal:mean=5,median=10",
        "lognormal:mean=1155,median=1020,foo=3",
        "lognormal:mean=1155,mean=1,median=1020",
        "lognormal:mean=x,median=1020",
        "lognormal:mean=1155,median=1020,min=50,max=10",
    ],
)
def test_parse_length_spec_rejects_bad_text_quoting_it(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_length_spec(text)
    message = str(info.value)
    assert repr(text) in message
    assert "uniform:LOW:HIGH" in message and "lognormal:mean=" in message


def test_length_spec_constructors_validate() -> None:
    with pytest.raises(ConfigError):
        LengthSpec.fixed(0)
    with pytest.raises(ConfigError):
        LengthSpec.uniform(3, 2)
    with pytest.raises(ConfigError):
        LengthSpec.lognormal(mean=100, median=0)
    with pytest.raises(ConfigError):
        LengthSpec(kind="gaussian")  # type: ignore[arg-type]


def test_lognormal_sample_matches_mean_and_median() -> None:
    spec = LengthSpec.lognormal(mean=1155, median=1020)
    samples = spec.sample(np.random.default_rng(1), 100_000)
    assert samples.dtype == np.int64
    assert samples.min() >= 1
    assert float(samples.mean()) == pytest.approx(1155, rel=0.05)
    assert float(np.median(samples)) == pytest.approx(1020, rel=0.05)


def test_lognormal_clips_and_equal_mean_median_is_constant() -> None:
    clipped = LengthSpec.lognormal(mean=1000, median=100, min=50, max=200)
    samples = clipped.sample(np.random.default_rng(2), 10_000)
    assert samples.min() == 50 and samples.max() == 200
    degenerate = LengthSpec.lognormal(mean=64, median=64).sample(np.random.default_rng(2), 100)
    assert set(degenerate.tolist()) == {64}


def test_uniform_and_fixed_samples() -> None:
    samples = LengthSpec.uniform(3, 6).sample(np.random.default_rng(3), 2_000)
    assert set(samples.tolist()) == {3, 4, 5, 6}  # both ends inclusive
    assert LengthSpec.fixed(9).sample(np.random.default_rng(3), 4).tolist() == [9, 9, 9, 9]


# --- arrivals -----------------------------------------------------------------------------


def _cv(x: np.ndarray) -> float:
    return float(x.std() / x.mean())


def test_gamma_interarrivals_have_requested_cv_and_rate() -> None:
    gaps = sample_interarrivals(np.random.default_rng(4), 10_000, rate=2.0, arrival="gamma", cv=3.0)
    assert _cv(gaps) == pytest.approx(3.0, rel=0.10)
    assert float(gaps.mean()) == pytest.approx(0.5, rel=0.10)


def test_poisson_interarrivals_and_gamma_cv1_agree() -> None:
    poisson = sample_interarrivals(np.random.default_rng(5), 20_000, rate=4.0)
    gamma = sample_interarrivals(np.random.default_rng(6), 20_000, rate=4.0, arrival="gamma")
    assert float(poisson.mean()) == pytest.approx(0.25, rel=0.03)
    assert _cv(poisson) == pytest.approx(1.0, rel=0.03)
    for q in (0.1, 0.5, 0.9, 0.99):
        assert np.quantile(gamma, q) == pytest.approx(np.quantile(poisson, q), rel=0.06)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0.0},
        {"rate": -1.0},
        {"rate": math.nan},
        {"rate": 1.0, "arrival": "weibull"},
        {"rate": 1.0, "arrival": "gamma", "cv": 0.0},
    ],
)
def test_bad_arrival_parameters_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        sample_interarrivals(np.random.default_rng(0), 3, **kwargs)  # type: ignore[arg-type]


# --- synthetic workloads ------------------------------------------------------------------

PROMPT = LengthSpec.lognormal(mean=1155, median=1020)
OUTPUT = LengthSpec.uniform(10, 300)


def _synthetic(**kwargs: object) -> list[Request]:
    args: dict[str, object] = {"rate": 5.0, "prompt": PROMPT, "output": OUTPUT, "seed": 7}
    args.update(kwargs)
    return synthetic_workload(**args)  # type: ignore[arg-type]


def test_synthetic_workload_by_count() -> None:
    requests = _synthetic(num_requests=1_000)
    assert [r.request_id for r in requests[:2]] == ["req-000000", "req-000001"]
    assert requests[-1].request_id == "req-000999"
    arrivals = [r.arrival_time for r in requests]
    assert arrivals[0] > 0.0  # first arrival is one gap after 0
    assert arrivals == sorted(arrivals)
    assert arrivals[-1] == pytest.approx(1_000 / 5.0, rel=0.1)
    assert all(10 <= r.output_len <= 300 and r.prompt_len >= 1 for r in requests)


def test_synthetic_workload_by_duration_and_both_limits() -> None:
    by_time = _synthetic(duration=100.0)
    assert all(r.arrival_time < 100.0 for r in by_time)
    assert len(by_time) == pytest.approx(500, rel=0.15)
    assert len(_synthetic(duration=100.0, num_requests=10)) == 10
    assert len(_synthetic(duration=1.0, num_requests=1_000)) < 50
    by_count = _synthetic(num_requests=len(by_time))
    assert [r.arrival_time for r in by_time] == pytest.approx([r.arrival_time for r in by_count])
    assert [r.prompt_len for r in by_time] == [r.prompt_len for r in by_count]


def test_synthetic_workload_is_deterministic_and_prefix_stable() -> None:
    first = _synthetic(num_requests=200, arrival="gamma", cv=2.0)
    assert first == _synthetic(num_requests=200, arrival="gamma", cv=2.0)
    assert first != _synthetic(num_requests=200, arrival="gamma", cv=2.0, seed=8)
    assert first[:100] == _synthetic(num_requests=100, arrival="gamma", cv=2.0)


def test_synthetic_workload_needs_a_limit() -> None:
    with pytest.raises(ConfigError, match="num_requests or duration"):
        _synthetic()
    with pytest.raises(ConfigError):
        _synthetic(num_requests=-1)
    assert _synthetic(num_requests=0) == []


# --- sessions -----------------------------------------------------------------------------


def _sessions(**kwargs: object) -> list[Request]:
    args: dict[str, object] = {
        "num_sessions": 40,
        "turns": LengthSpec.uniform(1, 6),
        "session_rate": 2.0,
        "think_time": 5.0,
        "first_prompt": LengthSpec.lognormal(mean=300, median=200),
        "turn_prompt": LengthSpec.uniform(1, 80),
        "output": LengthSpec.uniform(1, 100),
        "seed": 11,
    }
    args.update(kwargs)
    return session_workload(**args)  # type: ignore[arg-type]


def _by_session(requests: list[Request]) -> dict[str, list[Request]]:
    sessions: dict[str, list[Request]] = {}
    for r in sorted(requests, key=lambda r: r.request_id):
        sessions.setdefault(r.session_id, []).append(r)
    return sessions


def test_session_block_ids_hand_computed() -> None:
    requests = _sessions(
        num_sessions=2,
        turns=LengthSpec.fixed(3),
        first_prompt=LengthSpec.fixed(20),
        turn_prompt=LengthSpec.fixed(5),
        output=LengthSpec.fixed(10),
    )
    s0 = _by_session(requests)["s00000"]
    assert [r.request_id for r in s0] == ["s00000-t000", "s00000-t001", "s00000-t002"]
    assert [r.prompt_len for r in s0] == [20, 35, 50]  # previous prompt + output + 5
    # totals 30, 45, 60 tokens in 16-token blocks; the partial block is replaced each turn
    assert [r.prefix_block_ids for r in s0] == [(0, 1), (0, 2, 3), (0, 2, 4, 5)]
    s1 = _by_session(requests)["s00001"]
    assert s1[0].prefix_block_ids == (6, 7)
    assert all(r.prefix_block_size == 16 for r in requests)


def test_sessions_share_full_prefix_blocks_and_grow() -> None:
    requests = _sessions()
    arrivals = [r.arrival_time for r in requests]
    assert arrivals == sorted(arrivals)
    sessions = _by_session(requests)
    assert len(sessions) == 40
    seen: set[int] = set()
    for turns in sessions.values():
        ids = {i for r in turns for i in r.prefix_block_ids}
        assert not ids & seen  # no id is shared across sessions
        seen |= ids
        for r in turns:
            total = r.prompt_len + r.output_len
            assert len(r.prefix_block_ids) == -(-total // 16)
        for prev, cur in itertools.pairwise(turns):
            history = prev.prompt_len + prev.output_len
            assert 1 <= cur.prompt_len - history <= 80
            full = history // 16
            assert cur.prefix_block_ids[:full] == prev.prefix_block_ids[:full]
            assert not set(cur.prefix_block_ids[full:]) & set(prev.prefix_block_ids)
            assert cur.arrival_time >= prev.arrival_time
            assert cur.session_id == prev.session_id


def test_sessions_are_deterministic() -> None:
    assert _sessions() == _sessions()
    assert _sessions() != _sessions(seed=12)
    assert _sessions(num_sessions=0) == []
    with pytest.raises(ConfigError):
        _sessions(think_time=-1.0)


# --- transformations ----------------------------------------------------------------------


def _at(*times: float) -> list[Request]:
    return [Request(request_id=f"r{i}", prompt_len=1, arrival_time=t) for i, t in enumerate(times)]


def _times(requests: list[Request]) -> list[float]:
    return [r.arrival_time for r in requests]


def test_scale_rate_compresses_time() -> None:
    original = _at(2.0, 4.0, 10.0)
    assert _times(scale_rate(original, 2.0)) == [1.0, 2.0, 5.0]
    assert _times(scale_rate(original, 0.5)) == [4.0, 8.0, 20.0]
    assert _times(original) == [2.0, 4.0, 10.0]  # inputs untouched
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ConfigError):
            scale_rate(original, bad)


def test_truncate_by_duration_and_count() -> None:
    original = _at(10.0, 11.0, 12.5, 13.0, 20.0)
    assert _times(truncate(original, duration=3.0)) == [10.0, 11.0, 12.5]  # strictly < 13
    assert _times(truncate(original, num_requests=2)) == [10.0, 11.0]
    assert _times(truncate(original, duration=3.0, num_requests=10)) == [10.0, 11.0, 12.5]
    assert truncate(original) == original
    assert truncate([], duration=1.0) == []
    with pytest.raises(ConfigError):
        truncate(original, num_requests=-1)


def test_rebase_moves_first_arrival_to_zero() -> None:
    assert _times(rebase(_at(3.5, 4.0, 9.5))) == [0.0, 0.5, 6.0]
    assert rebase([]) == []
