"""The SLO latency model: profile parsing, grid interpolation, extrapolation, upstream's rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prescient.errors import ConfigError
from prescient.model import InstanceMetadata, InstanceStatus
from prescient.policy.state import ACCOUNT_FIELDS, ClusterState
from prescient.predict.slo import (
    DecodeTrend,
    InterpolationPredictor,
    QuadraticTrend,
    SloLatencyModel,
    load_tpot_profile,
    load_ttft_profile,
)


def ttft_bytes(points: dict[int, float]) -> bytes:
    return json.dumps({"metadata": {"model": "m", "timestamp": 0, "description": ""},
                       "results": [{"tokens_num": n, "mean": v, "std": 0, "min": v, "max": v,
                                    "p50": v, "p95": v, "p99": v, "raw_data": [v]}
                                   for n, v in points.items()]}).encode()


def tpot_bytes(points: dict[tuple[int, float], float]) -> bytes:
    return json.dumps({"results": [{"batch_size": b, "tokens_per_request": t, "p50": v}
                                   for (b, t), v in points.items()]}).encode()


def ttft_predictor(points: dict[int, float]) -> InterpolationPredictor:
    return InterpolationPredictor.from_ttft(load_ttft_profile(ttft_bytes(points), "ttft.json"))


def tpot_predictor(points: dict[tuple[int, float], float]) -> InterpolationPredictor:
    return InterpolationPredictor.from_tpot(load_tpot_profile(tpot_bytes(points), "tpot.json"))


def engine_like_ttft() -> InterpolationPredictor:
    """p50 = 5.6 + 0.02 n + 5e-7 n², like the llama3-8b-h100 preset's prefill step."""
    return ttft_predictor({n: 5.6 + 0.02 * n + 5e-7 * n * n
                           for n in (128, 512, 1024, 2048, 4096, 8192)})


def engine_like_tpot() -> InterpolationPredictor:
    """p50 = 5.6 + 0.026 b + 5e-5 b t."""
    return tpot_predictor({(b, t): 5.6 + 0.026 * b + 5e-5 * b * t
                           for b in (1, 4, 16, 64) for t in (8, 64, 512)})


# ---- interpolation inside the grid ---------------------------------------------------------

@pytest.mark.parametrize(("tokens", "expected"), [
    (100, 10.0), (150, 15.0), (200, 20.0), (300, 40.0), (400, 60.0), (0, 0.0),
])
def test_ttft_interpolates_linearly_between_profiled_sizes(tokens: int, expected: float) -> None:
    p = ttft_predictor({100: 10.0, 200: 20.0, 400: 60.0})
    assert p.predict_one(tokens) == pytest.approx(expected)
    assert p.interpolate(tokens, 0.0) == pytest.approx(expected)


@pytest.mark.parametrize(("batch", "tpr", "expected"), [
    (1, 8, 2.0), (3, 16, 12.0),
    (2, 12, 0.25 * (2 + 4 + 6 + 12)),  # bilinear in the cell
    (2, 8, 4.0),  # on a b grid line: linear in a
    (1, 12, 3.0),  # on an a grid line: linear in b
    (2.5, 10, 0.75 * 0.25 * 2 + 0.25 * 0.25 * 4 + 0.75 * 0.75 * 6 + 0.25 * 0.75 * 12),
])
def test_tpot_bilinear_by_hand(batch: float, tpr: float, expected: float) -> None:
    p = tpot_predictor({(1, 8): 2.0, (1, 16): 4.0, (3, 8): 6.0, (3, 16): 12.0})
    assert p.predict_one(batch, tpr) == pytest.approx(expected)
    assert p.interpolate(batch, tpr) == pytest.approx(expected)


def test_degenerate_axes_interpolate_linearly() -> None:
    one_batch = tpot_predictor({(4, 8): 10.0, (4, 64): 24.0})
    assert one_batch.predict_one(4, 36) == pytest.approx(17.0)
    one_tpr = tpot_predictor({(1, 8): 5.0, (9, 8): 13.0})
    assert one_tpr.predict_one(5, 8) == pytest.approx(9.0)
    single = tpot_predictor({(2, 8): 7.0})
    assert single.predict_one(2, 8) == 7.0


def test_origin_is_zero_even_outside_the_grid() -> None:
    p = tpot_predictor({(1, 8): 2.0, (3, 16): 12.0, (1, 16): 4.0, (3, 8): 6.0})
    assert p.predict_one(0, 0) == 0.0
    assert float(p.interpolate(0, 0)) == 0.0
    assert engine_like_ttft().predict_one(0) == 0.0


def test_vectorised_predict_matches_scalar_calls() -> None:
    p = engine_like_tpot()
    a = np.array([1, 2, 7, 64, 100, 0.5])
    b = np.array([8, 30, 512, 8, 700, 8])
    assert np.allclose(p.predict(a, b), [p.predict_one(x, y) for x, y in zip(a, b, strict=True)])


def test_non_finite_queries_are_inf() -> None:
    p = engine_like_ttft()
    assert np.all(np.isinf(p.predict([np.nan, np.inf], 0.0)))


# ---- outside the grid ----------------------------------------------------------------------

def test_upstream_interpolate_is_inf_outside_but_predict_extrapolates() -> None:
    p = engine_like_ttft()
    assert np.all(np.isinf(p.interpolate([64, 10_000], 0.0)))
    below, above = p.predict([64, 10_000], 0.0)
    assert 0 < below < p.predict_one(128)
    assert above > p.predict_one(8192)


def test_ttft_extrapolation_follows_the_quadratic_trend() -> None:
    p = engine_like_ttft()
    exact = 5.6 + 0.02 * 16384 + 5e-7 * 16384**2
    assert p.predict_one(16384) == pytest.approx(exact, rel=1e-9)
    assert p.predict_one(64) == pytest.approx(5.6 + 0.02 * 64 + 5e-7 * 64**2, rel=1e-9)


def test_extrapolation_is_finite_monotone_and_at_least_the_edge() -> None:
    concave = ttft_predictor({n: 40 * np.sqrt(n) for n in (100, 400, 900, 1600)})
    for p, edge in ((engine_like_ttft(), 8192), (concave, 1600)):
        xs = np.linspace(edge, 50 * edge, 200)
        ys = p.predict(xs, 0.0)
        assert np.all(np.isfinite(ys))
        assert np.all(np.diff(ys) >= 0)
        assert np.all(ys >= p.predict_one(edge))
        low = p.predict(np.linspace(1, edge, 50), 0.0)
        assert np.all(np.diff(low) >= -1e-12) and np.all(low >= 0)


def test_tpot_extrapolation_in_batch_and_context() -> None:
    p = engine_like_tpot()
    batches = np.arange(64, 1025, 16)
    for tpr in (8, 100, 512, 2000):
        ys = p.predict(batches, tpr)
        assert np.all(np.isfinite(ys)) and np.all(np.diff(ys) >= 0)
        assert np.all(ys >= p.predict_one(64, min(tpr, 512)))
    assert p.predict_one(256, 1024) == pytest.approx(5.6 + 0.026 * 256 + 5e-5 * 256 * 1024)
    assert 0 <= p.predict_one(1, 4) <= p.predict_one(1, 8)


def test_a_falling_trend_never_makes_a_bigger_batch_faster() -> None:
    # A noisy profile whose last point dips: the fitted slope may be anything, the answer
    # beyond the edge stays at or above the edge.
    p = tpot_predictor({(1, 8): 9.0, (2, 8): 8.0, (4, 8): 7.0})
    assert np.all(p.predict([4, 8, 100], 8) >= 7.0)


def test_trend_fits() -> None:
    xs = [100, 1000, 5000, 9000]
    q = QuadraticTrend.fit(xs, [3 + 0.1 * x + 2e-6 * x * x for x in xs])
    assert (q.c2, q.c1, q.c0) == pytest.approx((2e-6, 0.1, 3.0))
    line = QuadraticTrend.fit([10, 20], [1.0, 3.0])
    assert (line.c2, line.c1, line.c0) == pytest.approx((0.0, 0.2, -1.0))
    concave = QuadraticTrend.fit(xs, [np.sqrt(x) for x in xs])
    assert concave.c2 == 0 and concave.c1 > 0
    assert QuadraticTrend.fit([10], [4.0]) == QuadraticTrend(0.0, 0.0, 4.0)
    b, t = [1, 1, 8, 8], [8, 64, 8, 64]
    d = DecodeTrend.fit(b, t, [5 + 0.03 * x + 1e-4 * x * y for x, y in zip(b, t, strict=True)])
    assert (d.c0, d.c1, d.c2) == pytest.approx((5.0, 0.03, 1e-4))


# ---- profile files -------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "message"), [
    (b'{"results": [{"tokens_num": 1, "p50": 1}, {"tokens_num": 2, "p50": 2}, '
     b'{"tokens_num": 3, "p50": 3}, {"tokens_num": 4, "p50": "x"}]}',
     "ttft.json: results[3].p50: expected a number, got a string"),
    (b'{"results": [{"tokens_num": 1}]}', "ttft.json: results[0]: missing required field 'p50'"),
    (b'{"results": [{"tokens_num": 0, "p50": 1}]}',
     "ttft.json: results[0].tokens_num: expected an integer >= 1"),
    (b'{"results": [{"tokens_num": 1.5, "p50": 1}]}',
     "ttft.json: results[0].tokens_num: expected an integer, got a number"),
    (b'{"results": [{"tokens_num": 1, "p50": -2}]}',
     "ttft.json: results[0].p50: expected a number >= 0.0"),
    (b'{"results": [{"tokens_num": 1, "p50": 1, "raw_data": ["a"]}]}',
     "ttft.json: results[0].raw_data[0]: expected a number, got a string"),
    (b'{"results": []}', "ttft.json: results: expected a list of length >= 1"),
    (b'{"metadata": []}', "ttft.json: metadata: expected an object, got a list"),
    (b'[]', "ttft.json: expected an object, got a list"),
    (b'{"results": [', "ttft.json: not valid JSON"),
    (b'{"results": [{"tokens_num": 5, "p50": 1}, {"tokens_num": 5, "p50": 2}]}',
     "ttft.json: results[1]: tokens_num=5 repeats results[0]"),
])
def test_malformed_ttft_files_name_the_field(data: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_ttft_profile(data, "ttft.json")
    assert str(e.value).startswith(message)


def test_tpot_grid_must_be_rectangular_and_names_the_missing_corner() -> None:
    points = {(b, t): 1.0 for b in (1, 4, 16) for t in (8, 64)}
    del points[(4, 64)]
    with pytest.raises(ConfigError, match=r"^tpot\.json: results: the grid is not rectangular: "
                                          r"no row for batch_size=4, tokens_per_request=64 "):
        load_tpot_profile(tpot_bytes(points), "tpot.json")


@pytest.mark.parametrize(("row", "message"), [
    ({"batch_size": 1, "p50": 1}, "results[0]: missing required field 'tokens_per_request'"),
    ({"batch_size": 0, "tokens_per_request": 8, "p50": 1},
     "results[0].batch_size: expected an integer >= 1"),
    ({"batch_size": 1, "tokens_per_request": 0, "p50": 1},
     "results[0].tokens_per_request: expected a number > 0"),
])
def test_malformed_tpot_rows(row: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^tpot.json: {message}".replace("[", r"\[")):
        load_tpot_profile(json.dumps({"results": [row]}).encode(), "tpot.json")


def test_unknown_keys_and_missing_statistics_are_accepted() -> None:
    data = b'{"extra": 1, "results": [{"tokens_num": 8, "p50": 2.5, "note": "x"}]}'
    profile = load_ttft_profile(data, "ttft.json")
    assert profile.results[0].p50 == 2.5 and profile.metadata.model == ""


# ---- the latency model ---------------------------------------------------------------------

def model() -> SloLatencyModel:
    return SloLatencyModel(engine_like_ttft(), engine_like_tpot())


def chunk_loop(m: SloLatencyModel, tokens: float, reqs: float, dtok: float, maxb: float
               ) -> float:
    """Upstream's `predictTtftLatencyByChunkPrefill`, one chunk at a time."""
    step = float(m.predict_tpot(reqs, dtok))
    total, left = 0.0, tokens
    while left > 0:
        chunk = min(left, maxb)
        total += m.ttft.predict_one(chunk) + step
        left -= chunk
    return total


def test_chunked_ttft_closed_form_equals_the_loop() -> None:
    m = model()
    cases = [(0, 0, 0, 8192), (1, 0, 0, 8192), (100, 3, 900, 8192), (8192, 3, 900, 8192),
             (8193, 1, 8, 8192), (20000, 16, 4000, 8192), (50000, 0, 0, 2048),
             (3000, 200, 100_000, 512), (1024, 5, 10, 1024), (12345, 64, 64 * 700, 4096)]
    tokens, reqs, dtok, maxb = (np.array(c, float) for c in zip(*cases, strict=True))
    closed = m.predict_ttft_by_chunks(tokens, reqs, dtok, maxb)
    assert closed == pytest.approx([chunk_loop(m, *c) for c in cases], rel=1e-12)


def test_chunked_ttft_rejects_a_zero_budget() -> None:
    with pytest.raises(ValueError, match="max_batched must be > 0"):
        model().predict_ttft_by_chunks([100, 100], 0, 0, [8192, 0])


def test_predict_tpot_rules() -> None:
    m = model()
    out = m.predict_tpot([0, 3, 4, 4, 10], [100, 0, 16, 400, 5000])
    assert out[0] == 0 and out[1] == 0
    assert out[2] == m.tpot.predict_one(4, 8.0)  # 16 / 4 = 4 tokens, floored at 8
    assert out[3] == m.tpot.predict_one(4, 100.0)
    assert out[4] == m.tpot.predict_one(10, 500.0)


ACCOUNT_PREFILL_TOKENS = ACCOUNT_FIELDS.index(
    "num_uncomputed_tokens_inflight_dispatch_prefill_requests")


def slo_state(rows: list[tuple[str, int, InstanceStatus, float]]) -> ClusterState:
    """(id, max_num_batched_tokens, status, local-account inflight prefill tokens) rows."""
    state = ClusterState([InstanceMetadata(instance_id=iid, max_num_batched_tokens=mb)
                          for iid, mb, _, _ in rows])
    for iid, _, st, inflight in rows:
        row = state.index[iid]
        state.set_status(row, st)
        totals = [0.0] * len(ACCOUNT_FIELDS)
        totals[ACCOUNT_PREFILL_TOKENS] = inflight
        state.set_account(row, totals)
    return state


def test_predicted_ttft_elapsed_time_correction_takes_both_branches() -> None:
    m = model()
    state = slo_state([
        # busy: 6000 status prefill tokens take far longer than the 30 ms since the status
        ("a-busy", 2048, InstanceStatus(instance_id="a-busy", timestamp_ms=1000,
                                        num_uncomputed_tokens_all_waiting_prefills=5000,
                                        num_uncomputed_tokens_scheduler_running_prefills=1000),
         700),
        # drained: 100 status tokens are done within 30 ms; only the local account remains
        ("b-drained", 2048, InstanceStatus(instance_id="b-drained", timestamp_ms=1000,
                                           num_uncomputed_tokens_all_waiting_prefills=100),
         700),
        ("c-no-budget", 0, InstanceStatus(instance_id="c-no-budget", timestamp_ms=1000), 0),
    ])
    now, prompt = 1.030, 300
    all_prefills = np.array([6700.0, 800.0, 0.0])
    dbs, adt = np.array([4.0, 4.0, 0.0]), np.array([2000.0, 2000.0, 0.0])
    got = m.predicted_ttft_ms(state, prompt, now, all_prefills, dbs, adt)
    busy = m.predict_ttft_by_chunks(6000, 4, 2000, 2048)
    assert busy > 30 > m.predict_ttft_by_chunks(100, 4, 2000, 2048)
    assert got[0] == pytest.approx(m.predict_ttft_by_chunks(6700 + prompt, 4, 2000, 2048) - 30)
    assert got[1] == pytest.approx(m.predict_ttft_by_chunks(700 + prompt, 4, 2000, 2048))
    assert got[2] == np.inf


def test_predicted_ttft_clamps_elapsed_and_turns_failures_into_inf() -> None:
    m = model()
    state = slo_state([("a", 8192, InstanceStatus(instance_id="a", timestamp_ms=5000), 0),
                       ("b", 8192, InstanceStatus(instance_id="b", timestamp_ms=5000), 0)])
    got = m.predicted_ttft_ms(state, 100, 1.0, np.array([50.0, np.nan]), np.zeros(2),
                              np.zeros(2))
    assert got[0] == pytest.approx(m.ttft.predict_one(150))  # a status from the future: 0 ms
    assert got[1] == np.inf


def test_predicted_tpot_adds_the_request_to_the_batch() -> None:
    m = model()
    got = m.predicted_tpot_ms(100, np.array([0.0, 7.0]), np.array([0.0, 3000.0]))
    assert got[0] == m.tpot.predict_one(1, 100)
    assert got[1] == m.tpot.predict_one(8, 3100 / 8)


def test_max_batched_column_follows_the_instance_set() -> None:
    m = model()
    state = ClusterState([InstanceMetadata(instance_id="a", max_num_batched_tokens=512)])
    assert list(m.max_batched_tokens(state)) == [512]
    state.set_instances([InstanceMetadata(instance_id="a", max_num_batched_tokens=512),
                         InstanceMetadata(instance_id="b", max_num_batched_tokens=2048)])
    assert list(m.max_batched_tokens(state)) == [512, 2048]
