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

Beyond upstream, the queue may grow while it is replayed. Upstream replays one lump `U` that
includes the local account's in-flight dispatches as if they had all been there when the status
was stamped, which credits an instance that just received a prompt with progress on it. Here `U`
is the status's own backlog, and the requests dispatched since arrive at their own times
(`arrival_ms`, ms after the status, in dispatch order) behind it: a step at time `t` batches
`min(maxB, what has arrived by t and is not yet computed)`, and an instance with nothing left
idles until the next arrival. So a prompt dispatched mid-interval is only computed from its
dispatch on, and only once the backlog before it is done. `P` is then clamped to `max(U, 0)`
plus the arrived tokens. Without arrivals this is exactly the loop above.

The scheduler needs `P` for every instance on every dispatch, so
`predict_computed_prefill_tokens` runs all instances in lockstep with numpy: each iteration
simulates one step of every still-active instance. `_predict_one` is the scalar reference.

Pure: no I/O, no clock; the caller passes `elapsed_ms = now_ms - status.timestamp_ms`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


class _Queue:
    """Arrivals as padded rows: `at[i, j]` the j-th arrival's time (ms after the status, +inf
    past the last; one extra +inf column so "the next arrival" always exists), `before[i, j]`
    the tokens of the arrivals before the j-th."""

    __slots__ = ("at", "before")

    def __init__(self, arrival_ms: ArrayLike | None, arrival_tokens: ArrayLike | None,
                 n: int) -> None:
        if (arrival_ms is None) != (arrival_tokens is None):
            raise ValueError("arrival_ms and arrival_tokens go together")
        at = np.zeros((n, 0)) if arrival_ms is None else np.array(arrival_ms, np.float64,
                                                                   ndmin=2)
        tokens = np.zeros((n, 0)) if arrival_tokens is None else np.asarray(arrival_tokens,
                                                                            np.float64)
        if at.shape[0] != n or tokens.shape != at.shape:
            raise ValueError("arrival_ms and arrival_tokens must be (instances, arrivals)")
        # NaN and anything before the status arrive at once; padding (+inf) never arrives
        at = np.where(np.isnan(at), 0.0, np.maximum(at, 0.0))
        self.at = np.hstack([at, np.full((n, 1), np.inf)])
        self.before = np.zeros((n, at.shape[1] + 1))
        np.cumsum(np.where(np.isfinite(at), np.maximum(tokens, 0.0), 0.0), axis=1,
                  out=self.before[:, 1:])

    @property
    def total(self) -> np.ndarray:
        return self.before[:, -1]

    def arrived(self, idx: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row of `idx`: tokens arrived by time `t`, and the time of the next arrival."""
        count = (self.at[idx] <= t[:, None]).sum(axis=1)
        return self.before[idx, count], self.at[idx, count]


def predict_computed_prefill_tokens(
        elapsed_ms: ArrayLike, uncomputed: ArrayLike, running_uncomputed: ArrayLike,
        a: ArrayLike, b: ArrayLike, c: ArrayLike, max_num_batched_tokens: ArrayLike, *,
        arrival_ms: ArrayLike | None = None, arrival_tokens: ArrayLike | None = None,
        max_iterations: int = DEFAULT_MAX_ITERATIONS) -> np.ndarray:
    """Predicted prefill tokens computed since each instance's status, all instances at once.

    Args:
        elapsed_ms: per instance, `now_ms - status.timestamp_ms`; <= 0 (or NaN) predicts 0.
        uncomputed: per instance, `U`, the backlog at the status (its waiting + running
            uncomputed prefill tokens); upstream passes `all_prefills_tokens_num`.
        running_uncomputed: per instance, `Ur` =
            `num_uncomputed_tokens_scheduler_running_prefills`.
        a, b, c: per instance, the step-time coefficients (ms); NaN where no fitted predictor
            (predicts 0). `PredictorBank.coefficient_arrays` builds them.
        max_num_batched_tokens: the engine's tokens per step, scalar or per instance.
        arrival_ms: optional (instances, arrivals): when each prompt dispatched since the
            status reaches the queue, ms after the status, ascending along a row; +inf pads a
            row, values < 0 count as 0.
        arrival_tokens: the same shape: each arrival's uncomputed prompt tokens.
        max_iterations: steps simulated at most per instance; an instance still busy then
            keeps the tokens counted so far (an underestimate, never an overestimate).

    Returns:
        int64 array of predicted computed tokens, each in [0, max(U, 0) + arrived tokens].

    Raises:
        ValueError: when any `max_num_batched_tokens <= 0` or the shapes disagree.
    """
    elapsed = np.array(elapsed_ms, dtype=np.float64, ndmin=1)
    n = elapsed.shape[0]
    # a negative backlog (an inconsistent status) would un-compute the arrivals behind it
    backlog = np.maximum(np.array(uncomputed, dtype=np.float64, ndmin=1), 0.0)
    running = np.array(running_uncomputed, dtype=np.float64, ndmin=1)  # copy: mutated below
    coef = [np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)) for v in (a, b, c)]
    if backlog.shape != (n,) or running.shape != (n,):
        raise ValueError("elapsed_ms, uncomputed and running_uncomputed must have one shape")
    max_b = _max_batched(max_num_batched_tokens, n)
    queue = _Queue(arrival_ms, arrival_tokens, n)
    total = backlog + queue.total
    clock = np.zeros(n)  # ms since the status at which each instance's next step begins
    computed = np.zeros(n)
    fitted = np.isfinite(coef[0]) & np.isfinite(coef[1]) & np.isfinite(coef[2])
    active = np.flatnonzero(fitted & (elapsed > 0) & (total > 0))
    sim = _Sim(elapsed, backlog, running, clock, computed, coef, max_b, queue)
    for _ in range(max_iterations):
        if active.size == 0:
            break
        active = sim.step(active)
    return np.clip(computed, 0, total).astype(np.int64)


class _Sim:
    """The lockstep state of `predict_computed_prefill_tokens`; arrays are updated in place."""

    __slots__ = ("backlog", "clock", "coef", "computed", "elapsed", "max_b", "queue",
                 "running")

    def __init__(self, elapsed: np.ndarray, backlog: np.ndarray, running: np.ndarray,
                 clock: np.ndarray, computed: np.ndarray, coef: Sequence[np.ndarray],
                 max_b: np.ndarray, queue: _Queue) -> None:
        self.elapsed, self.backlog, self.running = elapsed, backlog, running
        self.clock, self.computed, self.coef = clock, computed, coef
        self.max_b, self.queue = max_b, queue

    def step(self, idx: np.ndarray) -> np.ndarray:
        """Simulate one step of the instances `idx`; returns those still active."""
        t = self.clock[idx]
        arrived, next_at = self.queue.arrived(idx, t)
        ready = self.backlog[idx] + arrived - self.computed[idx]
        idle = ready <= 0
        waiting = idx[:0]
        if idle.any():  # wait for the next arrival, which cannot be before `t`
            t = np.where(idle, next_at, t)
            late, _ = self.queue.arrived(idx[idle], t[idle])
            ready[idle] = self.backlog[idx[idle]] + late - self.computed[idx[idle]]
            waits = t < self.elapsed[idx]  # False for +inf: nothing more arrives
            idx, t, ready = idx[waits], t[waits], ready[waits]
            empty = ready <= 0  # only zero-token arrivals came: wait for the next one
            waiting = idx[empty]
            self.clock[waiting] = t[empty]
            idx, t, ready = idx[~empty], t[~empty], ready[~empty]
        ur = self.running[idx]
        partial = (ur > 0) & (ur < self.max_b[idx])
        batch = np.where(partial, ur, np.minimum(ready, self.max_b[idx]))
        self.running[idx] = np.where(partial, 0.0, ur)
        a, b, c = (v[idx] for v in self.coef)
        with np.errstate(over="ignore", invalid="ignore"):
            d = a * batch * batch + b * batch + c
        ok = (d >= MIN_PREDICTED_STEP_MS) & (d <= MAX_PREDICTED_STEP_MS)  # False for NaN
        left = self.elapsed[idx] - t
        full = ok & (left >= d)
        last = ok & ~full
        self.computed[idx[~ok]] = 0.0
        done = idx[full]
        self.computed[done] += batch[full]
        self.clock[done] = t[full] + d[full]
        self.computed[idx[last]] += _round_half_away(batch[last] * left[last] / d[last])
        total = self.backlog[done] + self.queue.total[done]
        busy = done[(self.clock[done] < self.elapsed[done]) & (self.computed[done] < total)]
        return np.concatenate([busy, waiting]) if waiting.size else busy


def _absorb(pending: list[tuple[float, float]], t: float) -> float:
    """Pop the arrivals due by `t` off the front of `pending`; returns their tokens."""
    tokens = 0.0
    while pending and pending[0][0] <= t:
        tokens += pending.pop(0)[1]
    return tokens


def _predict_one(elapsed_ms: float, uncomputed: float, running_uncomputed: float,
                 a: float, b: float, c: float, max_num_batched_tokens: float, *,
                 arrivals: Sequence[tuple[float, float]] = (),
                 max_iterations: int = DEFAULT_MAX_ITERATIONS) -> int:
    """Scalar reference of `predict_computed_prefill_tokens` for one instance (tests).

    `arrivals` are (ms after the status, tokens) in dispatch order.
    """
    if not max_num_batched_tokens > 0:
        raise ValueError("max_num_batched_tokens must be > 0 (upstream loops forever at 0)")
    pending = [(0.0 if math.isnan(at) else max(at, 0.0), max(tok, 0.0))
               for at, tok in arrivals if not math.isinf(at)]
    ready = max(float(uncomputed), 0.0)
    total = ready + sum(tok for _, tok in pending)
    fitted = math.isfinite(a) and math.isfinite(b) and math.isfinite(c)
    if not (fitted and elapsed_ms > 0 and total > 0):
        return 0
    t, ur, p = 0.0, float(running_uncomputed), 0.0
    for _ in range(max_iterations):
        ready += _absorb(pending, t)
        if ready <= 0:  # idle until the next arrival
            if not pending or pending[0][0] >= elapsed_ms:
                break
            t = pending[0][0]
            ready += _absorb(pending, t)
            if ready <= 0:
                continue
        if 0 < ur < max_num_batched_tokens:
            batch, ur = ur, 0.0
        else:
            batch = min(ready, float(max_num_batched_tokens))
        d = a * batch * batch + b * batch + c
        if not MIN_PREDICTED_STEP_MS <= d <= MAX_PREDICTED_STEP_MS:
            return 0
        if elapsed_ms - t < d:
            p += math.floor(batch * (elapsed_ms - t) / d + 0.5)
            break
        p, t, ready = p + batch, t + d, ready - batch
        if t >= elapsed_ms or p >= total:
            break
    return int(min(max(p, 0.0), total))
