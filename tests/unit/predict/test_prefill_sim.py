"""The chunked-prefill forward simulation (upstream §4.3), vectorised and scalar."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prescient.predict.prefill_sim import (
    SCALAR_ROWS,
    PrefillReplay,
    _predict_one,
    predict_computed_prefill_tokens,
)

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


def queued(elapsed: float, u: float, ur: float, arrivals: list[tuple[float, float]],
           coef: tuple[float, float, float] = LINEAR, max_b: float = 1000) -> int:
    """`one` with arrivals (ms after the status, tokens): both implementations must agree."""
    at = np.array([[t for t, _ in arrivals] + [math.inf]])
    tokens = np.array([[x for _, x in arrivals] + [0.0]])
    vec = predict_computed_prefill_tokens([elapsed], [u], [ur], [coef[0]], [coef[1]],
                                          [coef[2]], max_b, arrival_ms=at, arrival_tokens=tokens)
    scalar = _predict_one(elapsed, u, ur, *coef, max_b, arrivals=arrivals)
    assert int(vec[0]) == scalar
    return scalar


@pytest.mark.parametrize(("elapsed", "u", "ur", "arrivals", "expected", "why"), [
    # the backlog (1000: 0-15 ms) goes first; the prompt dispatched at 20 ms runs 20-35 ms
    (40.0, 1000, 0, [(20.0, 1000)], 2000, "both done"),
    (30.0, 1000, 0, [(20.0, 1000)], 1000 + round(1000 * 10 / 15), "10 of its 15 ms"),
    (18.0, 1000, 0, [(20.0, 1000)], 1000, "not dispatched yet: only the backlog"),
    # arrivals during a step wait for the next step, then share it: 200 (0-7), 700 (7-19)
    (20.0, 200, 0, [(3.0, 300), (4.0, 400)], 900, "two arrivals batched together"),
    (13.0, 200, 0, [(3.0, 300), (4.0, 400)], 200 + 350, "6 of the 12 ms step"),
    # a full backlog keeps the arrival waiting: 1000 (0-15), 1000 (15-30), then its 500
    (30.0, 2000, 0, [(1.0, 500)], 2000, "queued behind the backlog"),
    (35.0, 2000, 0, [(1.0, 500)], 2000 + 250, "its own step, 30-40 ms, half done"),
    # the running chunk goes first even though more has arrived: 400 (0-9), 1000 (9-24)
    (20.0, 400, 400, [(0.0, 1000)], 400 + round(1000 * 11 / 15), "partial chunk first"),
    (-5.0, 0, 0, [(-50.0, 1000)], 0, "no time elapsed"),
    (15.0, 0, 0, [(-50.0, 1000)], 1000, "dispatched before the status: there at once"),
    (15.0, 0, 0, [(15.0, 1000)], 0, "dispatched just now"),
    (25.0, 0, 0, [(10.0, 1000)], 1000, "idle until it arrives, 10-25 ms"),
    (17.5, 0, 0, [(10.0, 1000)], 500, "idle, then half a step"),
    (25.0, 0, 0, [(5.0, 0), (10.0, 1000)], 1000, "a fully cached prompt costs nothing"),
    (1e6, 300, 0, [(0.0, 100), (50.0, 200)], 600, "never more than exists"),
    (1e6, -10, 0, [(0.0, 100)], 100, "a negative backlog does not eat the arrivals"),
])
def test_arrivals_queue_behind_the_backlog(elapsed: float, u: float, ur: float,
                                           arrivals: list[tuple[float, float]], expected: int,
                                           why: str) -> None:
    assert queued(elapsed, u, ur, arrivals) == expected, why


def test_without_arrivals_upstream_lump_credits_the_new_prompt_from_the_status() -> None:
    # what the arrival times change: the same 2000 tokens as one lump are all done by 30 ms
    assert one(30.0, 2000, 0, LINEAR) == 2000
    assert queued(30.0, 1000, 0, [(20.0, 1000)]) < 2000


def test_arrival_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="arrival"):
        predict_computed_prefill_tokens([10.0], [100], [0], 0.0, 0.0, 1.0, 8,
                                        arrival_ms=[[1.0]])
    with pytest.raises(ValueError, match="arrival"):
        predict_computed_prefill_tokens([10.0], [100], [0], 0.0, 0.0, 1.0, 8,
                                        arrival_ms=[[1.0]], arrival_tokens=[[1.0, 2.0]])


def test_vectorised_equals_scalar_with_arrivals() -> None:
    rng = np.random.default_rng(7)
    n, m = 400, 12
    elapsed = rng.uniform(-20, 1200, n)
    u = np.where(rng.random(n) < 0.3, 0, rng.integers(-100, 20_000, n)).astype(float)
    ur = np.where(rng.random(n) < 0.4, rng.integers(0, 9_000, n), 0).astype(float)
    a = np.where(rng.random(n) < 0.7, rng.uniform(0, 1e-6, n), 0.0)
    b = rng.uniform(0.0, 0.03, n)
    c = rng.uniform(-1.0, 20.0, n)
    a[rng.random(n) < 0.05] = np.nan
    max_b = rng.choice([256.0, 2048.0, 8192.0], n)
    counts = rng.integers(0, m + 1, n)
    at = np.sort(rng.uniform(-100, 1300, (n, m)), axis=1)
    tokens = np.where(rng.random((n, m)) < 0.1, 0, rng.integers(1, 6_000, (n, m))).astype(float)
    pad = np.arange(m)[None, :] >= counts[:, None]
    at[pad], tokens[pad] = np.inf, 0.0
    vec = predict_computed_prefill_tokens(elapsed, u, ur, a, b, c, max_b, arrival_ms=at,
                                          arrival_tokens=tokens)
    ref = [_predict_one(elapsed[i], u[i], ur[i], a[i], b[i], c[i], max_b[i],
                        arrivals=list(zip(at[i, :counts[i]], tokens[i, :counts[i]],
                                          strict=True)))
           for i in range(n)]
    assert vec.tolist() == ref
    with_arrivals = counts > 0
    assert (vec[with_arrivals] > np.maximum(u[with_arrivals], 0)).sum() > n // 8
    assert (vec <= np.maximum(u, 0) + tokens.sum(axis=1)).all()


@pytest.mark.parametrize("scalar_rows", [0, 10**9, SCALAR_ROWS])
def test_incremental_replay_equals_replay_from_scratch_on_random_cases(scalar_rows: int
                                                                       ) -> None:
    """Advancing decision by decision, with prompts appended as they are dispatched, gives
    what a replay from the status gives at every decision, step cap included; whether the
    rows are stepped in lockstep (numpy) or one by one (Python floats)."""
    rng = np.random.default_rng(11)
    n, decisions = 300, 60
    u = np.where(rng.random(n) < 0.3, 0, rng.integers(-100, 20_000, n)).astype(float)
    ur = np.where(rng.random(n) < 0.4, rng.integers(0, 9_000, n), 0).astype(float)
    a = np.where(rng.random(n) < 0.7, rng.uniform(0, 1e-6, n), 0.0)
    b = rng.uniform(0.0, 0.03, n)
    c = rng.uniform(-1.0, 20.0, n)
    a[rng.random(n) < 0.05] = np.nan
    max_b = rng.choice([256.0, 2048.0, 8192.0], n)
    head = np.where(rng.random(n) < 0.3, rng.uniform(0, 30, n), 0.0)
    replay = PrefillReplay(n, max_iterations=40)
    replay.scalar_rows = scalar_rows
    replay.reset(np.arange(n), u, ur, head)
    arrivals: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    elapsed = np.full(n, -5.0)
    for k in range(decisions):
        elapsed = elapsed + rng.exponential(15.0, n)
        if k == decisions // 2:  # time goes back on some rows: they start over
            elapsed[: n // 10] -= 100.0
        for row in np.flatnonzero(rng.random(n) < 0.3):
            # dispatched now, or (rarely) earlier than the replay has gone; still ascending
            at = elapsed[row] - (50.0 if rng.random() < 0.05 else 0.0)
            at = max([at, *(t for t, _ in arrivals[row])])
            tokens = 0.0 if rng.random() < 0.1 else float(rng.integers(1, 6_000))
            arrivals[row].append((at, tokens))
            replay.append(int(row), [at], [tokens])
        if k % 17 == 16:  # a refit reprices some rows
            b = np.where(rng.random(n) < 0.2, b * 1.1, b)
        got = replay.advance(elapsed, a, b, c, max_b)
        width = max(len(q) for q in arrivals) + 1
        at = np.full((n, width), np.inf)
        tok = np.zeros((n, width))
        for row, queue in enumerate(arrivals):
            at[row, :len(queue)] = [t for t, _ in queue]
            tok[row, :len(queue)] = [x for _, x in queue]
        fresh = PrefillReplay(n, max_iterations=40)
        fresh.scalar_rows = 0
        fresh.reset(np.arange(n), u, ur, head)
        fresh.set_arrivals(at, tok)
        assert got.tolist() == fresh.advance(elapsed, a, b, c, max_b).tolist(), f"decision {k}"
        if k % 20 == 19:  # the function and the scalar reference start at the status
            plain = head == 0
            vec = predict_computed_prefill_tokens(elapsed, u, ur, a, b, c, max_b,
                                                  arrival_ms=at, arrival_tokens=tok,
                                                  max_iterations=40)
            ref = [_predict_one(elapsed[i], u[i], ur[i], a[i], b[i], c[i], max_b[i],
                                arrivals=arrivals[i], max_iterations=40) for i in range(n)]
            assert got[plain].tolist() == vec[plain].tolist() == np.array(ref)[plain].tolist()
    assert (got > np.maximum(u, 0)).sum() > n // 8  # arrivals were replayed, not just U


def test_a_head_start_moves_every_step_earlier_and_nothing_before_the_status() -> None:
    # 3000 tokens, 1000-token steps of 15 ms; the first began 6 ms before the status
    replay = PrefillReplay(2)
    replay.reset([0, 1], [3000, 3000], [0, 0], [6.0, 0.0])
    replay.set_arrivals([[0.0], [0.0]], [[500.0], [500.0]])  # rewinds: head starts stay
    out = replay.advance([9.0, 9.0], *LINEAR, 1000).tolist()
    assert out == [1000, 600]  # the first step just ended; without the head start 9/15 of it
    assert replay.advance([0.0, 0.0], *LINEAR, 1000).tolist() == [0, 0]  # no time: nothing
    # the arrival (at the status) waits for the step in flight, as it would at the engine
    # (500 tokens take 10 ms: 39-49 ms with the head start, 45-55 ms without)
    assert replay.advance([54.0, 54.0], *LINEAR, 1000).tolist() == [3500, 3000 + 450]
