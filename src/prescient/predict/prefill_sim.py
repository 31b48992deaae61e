"""How many prefill tokens each instance has computed since its last status (upstream §4.3).

Between two CMS snapshots an instance keeps working. The scheduler replays its prefill queue
step by step with the fitted step-time model `d(B) = a B² + b B + c` (ms for a step of `B`
tokens) over the time elapsed since the status was stamped, and subtracts the result `P` from
`all_prefills_tokens_num`. Per instance (upstream `predictNumComputedPrefillTokens`):

    U = all_prefills_tokens_num before prediction; Ur = running prefill's uncomputed tokens
    while elapsed > 0 and U > 0:
        B = Ur, Ur = 0          if 0 < Ur < maxB     # finish the partially done chunk first
        B = min(U, maxB)        otherwise
        d = d(B)                                     # not finite / outside [1e-3, 1e6] ms → P = 0
        if elapsed >= d: P += B; elapsed -= d; U -= B
        else:            P += round(B · elapsed / d); stop   # apportion the last step
    P = min(P, original U)

`round` is Go's `math.Round` (half away from zero). Upstream clamps against the *decremented*
`U`, a quirk (§11.7); we clamp against the original. Upstream also loops forever when
`maxB = 0`; we raise. Decode interference is ignored, as upstream.

The scheduler needs `P` for every instance on every dispatch, so
`predict_computed_prefill_tokens` runs all instances in lockstep with numpy: each iteration
simulates one step of every still-active instance. `_predict_one` is the scalar reference.

Pure: no I/O, no clock; the caller passes `elapsed_ms = now_ms - status.timestamp_ms`.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

MIN_PREDICTED_STEP_MS = 1e-3  # a predicted step outside [MIN, MAX] voids the prediction
MAX_PREDICTED_STEP_MS = 1e6
DEFAULT_MAX_ITERATIONS = 10_000  # steps simulated per instance at most


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """Go's `math.Round` for x >= 0."""
    return np.floor(x + 0.5)


def _max_batched(max_num_batched_tokens: ArrayLike, n: int) -> np.ndarray:
    max_b = np.broadcast_to(np.asarray(max_num_batched_tokens, dtype=np.float64), (n,))
    if not bool(np.all(max_b > 0)):
        raise ValueError("max_num_batched_tokens must be > 0 (upstream loops forever at 0)")
    return max_b


def predict_computed_prefill_tokens(
        elapsed_ms: ArrayLike, uncomputed: ArrayLike, running_uncomputed: ArrayLike,
        a: ArrayLike, b: ArrayLike, c: ArrayLike, max_num_batched_tokens: ArrayLike, *,
        max_iterations: int = DEFAULT_MAX_ITERATIONS) -> np.ndarray:
    """Predicted prefill tokens computed since each instance's status, all instances at once.

    Args:
        elapsed_ms: per instance, `now_ms - status.timestamp_ms`; <= 0 (or NaN) predicts 0.
        uncomputed: per instance, `U` = all_prefills_tokens_num computed without prediction
            (waiting + running uncomputed + local-account in-flight prefill tokens).
        running_uncomputed: per instance, `Ur` =
            `num_uncomputed_tokens_scheduler_running_prefills`.
        a, b, c: per instance, the step-time coefficients (ms); NaN where no fitted predictor
            (predicts 0). `PredictorBank.coefficient_arrays` builds them.
        max_num_batched_tokens: the engine's tokens per step, scalar or per instance.
        max_iterations: steps simulated at most per instance; an instance still busy then
            keeps the tokens counted so far (an underestimate, never an overestimate).

    Returns:
        int64 array of predicted computed tokens, each in [0, max(U, 0)].

    Raises:
        ValueError: when any `max_num_batched_tokens <= 0` or the shapes disagree.
    """
    elapsed = np.array(elapsed_ms, dtype=np.float64, ndmin=1)  # copies: mutated below
    n = elapsed.shape[0]
    remaining = np.array(uncomputed, dtype=np.float64, ndmin=1)
    running = np.array(running_uncomputed, dtype=np.float64, ndmin=1)
    coef = [np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)) for v in (a, b, c)]
    if remaining.shape != (n,) or running.shape != (n,):
        raise ValueError("elapsed_ms, uncomputed and running_uncomputed must have one shape")
    max_b = _max_batched(max_num_batched_tokens, n)
    original = remaining.copy()
    computed = np.zeros(n)
    fitted = np.isfinite(coef[0]) & np.isfinite(coef[1]) & np.isfinite(coef[2])
    active = np.flatnonzero(fitted & (elapsed > 0) & (remaining > 0))
    for _ in range(max_iterations):
        if active.size == 0:
            break
        active = _step(active, elapsed, remaining, running, computed, coef, max_b)
    return np.clip(computed, 0, np.maximum(original, 0)).astype(np.int64)


def _step(idx: np.ndarray, elapsed: np.ndarray, remaining: np.ndarray, running: np.ndarray,
          computed: np.ndarray, coef: list[np.ndarray], max_b: np.ndarray) -> np.ndarray:
    """Simulate one step of the instances `idx` in place; returns those still active."""
    ur, u, e = running[idx], remaining[idx], elapsed[idx]
    partial = (ur > 0) & (ur < max_b[idx])
    batch = np.where(partial, ur, np.minimum(u, max_b[idx]))
    running[idx] = np.where(partial, 0.0, ur)
    with np.errstate(over="ignore", invalid="ignore"):
        d = coef[0][idx] * batch * batch + coef[1][idx] * batch + coef[2][idx]
    ok = (d >= MIN_PREDICTED_STEP_MS) & (d <= MAX_PREDICTED_STEP_MS)  # False for NaN
    full = ok & (e >= d)
    last = ok & ~full
    computed[idx[~ok]] = 0.0
    done = idx[full]
    computed[done] += batch[full]
    elapsed[done] -= d[full]
    remaining[done] -= batch[full]
    computed[idx[last]] += _round_half_away(batch[last] * e[last] / d[last])
    return done[(elapsed[done] > 0) & (remaining[done] > 0)]


def _predict_one(elapsed_ms: float, uncomputed: float, running_uncomputed: float,
                 a: float, b: float, c: float, max_num_batched_tokens: float, *,
                 max_iterations: int = DEFAULT_MAX_ITERATIONS) -> int:
    """Scalar reference of `predict_computed_prefill_tokens` for one instance (tests)."""
    if not max_num_batched_tokens > 0:
        raise ValueError("max_num_batched_tokens must be > 0 (upstream loops forever at 0)")
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(c)):
        return 0
    elapsed, u, ur, p = float(elapsed_ms), float(uncomputed), float(running_uncomputed), 0.0
    for _ in range(max_iterations):
        if not (elapsed > 0 and u > 0):
            break
        if 0 < ur < max_num_batched_tokens:
            batch, ur = ur, 0.0
        else:
            batch = min(u, float(max_num_batched_tokens))
        d = a * batch * batch + b * batch + c
        if not MIN_PREDICTED_STEP_MS <= d <= MAX_PREDICTED_STEP_MS:
            return 0
        if elapsed < d:
            p += math.floor(batch * elapsed / d + 0.5)
            break
        p, elapsed, u = p + batch, elapsed - d, u - batch
    return int(min(max(p, 0.0), max(float(uncomputed), 0.0)))
