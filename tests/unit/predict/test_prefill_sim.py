"""The chunked-prefill forward simulation (upstream §4.3), vectorised and scalar."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prescient.predict.prefill_sim import _predict_one, predict_computed_prefill_tokens

NAN = math.nan


def one(elapsed: float, u: float, ur: float, coef: tuple[float, float, float],
        max_b: float = 1000) -> int:
    """Run both implementations on one instance and check they agree."""
    vec = predict_computed_prefill_tokens([elapsed], [u], [ur], [coef[0]], [coef[1]],
                                          [coef[2]], max_b)
    scalar = _predict_one(elapsed, u, ur, *coef, max_b)
    assert int(vec[0]) == scalar
    return scalar


LINEAR = (0.0, 0.01, 5.0)  # 5 ms + 0.01 ms/token: 1000 tokens take 15 ms


@pytest.mark.parametrize(("elapsed", "u", "ur", "expected", "why"), [
    (15.0, 3000, 0, 1000, "exactly one full step"),
    (30.0, 3000, 0, 2000, "two full steps"),
    (22.5, 3000, 0, 1500, "half of the second step is apportioned"),
    # the running chunk (400 tokens: 9 ms) goes first, then 1000 (15 ms), then 6 ms of 15
    (30.0, 3000, 400, 400 + 1000 + 400, "partial running chunk first"),
    (9.0, 3000, 400, 400, "only the running chunk"),
    # Ur >= maxB is not a partial chunk: plain full-size steps
    (15.0, 3000, 1500, 1000, "running chunk too big to be partial"),
    (1000.0, 2500, 0, 2500, "the queue drains: 1000 + 1000 + 500"),
    (0.0, 3000, 0, 0, "no time elapsed"),
    (-5.0, 3000, 0, 0, "status newer than now"),
    (15.0, 0, 0, 0, "nothing to prefill"),
    (15.0, -10, 0, 0, "negative load (over-subtracted account)"),
])
def test_hand_computed_cases(elapsed: float, u: float, ur: float, expected: int,
                             why: str) -> None:
    assert one(elapsed, u, ur, LINEAR) == expected, why


def test_apportioned_step_rounds_half_away_from_zero() -> None:
    # one token per 2 ms: after 1 ms half a token is done → Go's math.Round gives 1
    assert one(1.0, 10, 0, (0.0, 0.0, 2.0), max_b=1) == 1
    # 3 tokens in 8 ms, 1 ms elapsed → 0.375 → 0
    assert one(1.0, 3, 0, (0.0, 0.0, 8.0), max_b=3) == 0


def test_clamp_is_against_the_original_load() -> None:
    # Ur larger than U (inconsistent status): the chunk of 500 counts fully, U was 300.
    # Upstream compares with the decremented U (-200) and would report -200; we report 300.
    assert one(100.0, 300, 500, LINEAR) == 300


def test_no_predictor_predicts_zero() -> None:
    assert one(100.0, 3000, 0, (NAN, NAN, NAN)) == 0
    assert one(100.0, 3000, 0, (0.0, NAN, 1.0)) == 0


@pytest.mark.parametrize("coef", [
    (0.0, 0.0, 1e-4),  # step shorter than 1 µs
    (0.0, 0.0, 2e6),  # step longer than 1000 s
    (0.0, -0.01, 5.0),  # negative at the second (full-size) step
    (0.0, 0.0, math.inf),
])
def test_an_implausible_step_duration_voids_the_prediction(
        coef: tuple[float, float, float]) -> None:
    # the running chunk (100 tokens) is fine for the third case, the full step is not
    assert one(1000.0, 3000, 100, coef) == 0


def test_max_batched_tokens_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        predict_computed_prefill_tokens([10.0], [100], [0], [0.0], [0.0], [1.0], 0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        predict_computed_prefill_tokens([10.0, 1.0], [100, 1], [0, 0], 0.0, 0.0, 1.0, [8, -1])
    with pytest.raises(ValueError):
        _predict_one(10.0, 100, 0, 0.0, 0.0, 1.0, 0)


def test_mismatched_shapes_raise() -> None:
    with pytest.raises(ValueError):
        predict_computed_prefill_tokens([1.0, 2.0], [1], [0, 0], 0.0, 0.0, 1.0, 8)


def test_iteration_cap_keeps_the_tokens_counted_so_far() -> None:
    out = predict_computed_prefill_tokens([1e9], [10**6], [0], [0.0], [0.0], [1.0], 1,
                                          max_iterations=50)
    assert out.tolist() == [50]
    assert _predict_one(1e9, 10**6, 0, 0.0, 0.0, 1.0, 1, max_iterations=50) == 50


def test_per_instance_max_batched_tokens_and_dtype() -> None:
    out = predict_computed_prefill_tokens([15.0, 15.0], [5000, 5000], [0, 0], 0.0, 0.01, 5.0,
                                          np.array([1000, 500]))
    # second instance: 500-token steps take 10 ms → 1 full step + 5/10 of the next
    assert out.dtype == np.int64 and out.tolist() == [1000, 750]


def test_vectorised_equals_scalar_on_random_cases() -> None:
    rng = np.random.default_rng(20240601)
    n = 500
    elapsed = rng.uniform(-20, 400, n)
    u = rng.integers(-100, 50_000, n).astype(float)
    ur = np.where(rng.random(n) < 0.5, rng.integers(0, 10_000, n), 0).astype(float)
    a = np.where(rng.random(n) < 0.7, rng.uniform(-1e-6, 1e-6, n), 0.0)
    b = rng.uniform(-0.002, 0.03, n)
    c = rng.uniform(-1.0, 20.0, n)
    a[rng.random(n) < 0.1] = np.nan  # no fitted predictor
    max_b = rng.choice([256.0, 2048.0, 8192.0, 65536.0], n)
    vec = predict_computed_prefill_tokens(elapsed, u, ur, a, b, c, max_b)
    ref = [_predict_one(*args) for args in zip(elapsed, u, ur, a, b, c, max_b, strict=True)]
    assert vec.tolist() == ref
    assert (vec > 0).sum() > n // 4  # the cases exercise the simulation, not just its exits
    assert (vec <= np.maximum(u, 0)).all()
