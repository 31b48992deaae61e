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
`PrefillReplay` is the same simulation kept between dispatches: each decision continues from
the steps already completed instead of replaying from the status (the result is identical).

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
SCALAR_ROWS = 8  # a replay advancing at most this many rows steps them one by one in Python


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
    backlog = np.array(uncomputed, dtype=np.float64, ndmin=1)
    running = np.array(running_uncomputed, dtype=np.float64, ndmin=1)
    if backlog.shape != (n,) or running.shape != (n,):
        raise ValueError("elapsed_ms, uncomputed and running_uncomputed must have one shape")
    replay = PrefillReplay(n, max_iterations=max_iterations)
    replay.reset(np.arange(n), backlog, running)
    replay.set_arrivals(arrival_ms, arrival_tokens)
    return replay.advance(elapsed, a, b, c, max_num_batched_tokens)


class PrefillReplay:
    """`predict_computed_prefill_tokens` as a state that can be advanced decision by decision.

    The scheduler asks for the replay at every dispatch, each time a little later than the
    last. Replaying from the status each time repeats every step already simulated, which is
    most of a decision's cost at a slow poll. This keeps, per row, the steps completed so far
    (the clock, the tokens computed, the running chunk, the iterations used) and continues
    from there: a later `advance` simulates only the steps that begin after the last one
    completed, and re-prices only the step in flight, which is apportioned anew each time.

    The result always equals a replay from scratch over the same inputs (tested on random
    cases), because completed steps depend on nothing that can still change: a completed step
    began before the last advance's `elapsed`, and an arrival appended since is dispatched no
    earlier than that. Whatever would break this restarts the row from the status by itself:
    other coefficients or chunk budget, an `elapsed` earlier than the last, an arrival earlier
    than the last `elapsed`. A new status, or arrivals that change other than at the end
    (a prompt reconciled or released), are the caller's to `reset`.

    Args:
        n: rows (instances).
        max_iterations: steps simulated at most per row, over all advances since its reset.
    """

    def __init__(self, n: int, *, max_iterations: int = DEFAULT_MAX_ITERATIONS) -> None:
        self.n = n
        self.max_iterations = max_iterations
        self.scalar_rows = SCALAR_ROWS
        self._backlog = np.zeros(n)
        self._head_start = np.zeros(n)  # ms of the first step done before the status
        self._running_at_status = np.zeros(n)
        self._running = np.zeros(n)  # the running chunk left, until a step consumes it
        self._clock = np.zeros(n)  # ms after the status at which the next step begins
        self._computed = np.zeros(n)  # tokens of completed steps
        self._iterations = np.zeros(n, np.int64)
        self._void = np.zeros(n, bool)  # a step priced outside the sane range: predicts 0
        self._horizon = np.zeros(n)  # the `elapsed` of the last advance
        self._priced = np.full((4, n), np.nan)  # a, b, c and chunk budget of the last advance
        self._price_args: tuple[ArrayLike, ...] | None = None  # the arguments they came from
        # the step in flight at the last advance: it began at `_pend_start` (the clock, or
        # the arrival an idle row waited for), batches `_pend_batch` tokens (the running chunk
        # if `_pend_chunk`) and takes `_pend_ms` (NaN: none). Kept so that a decision inside
        # it costs one apportioning, not a step's simulation.
        self._pend_start = np.zeros(n)
        self._pend_batch = np.zeros(n)
        self._pend_ms = np.full(n, np.nan)
        self._pend_chunk = np.zeros(n, bool)
        # arrivals as padded rows: `_at[i, j]` the j-th arrival (ms after the status; +inf from
        # `_count[i]` on, so "the next arrival" always exists), `_before[i, j]` the tokens of
        # the arrivals before the j-th
        self._count = np.zeros(n, np.int64)
        self._at = np.full((n, 1), np.inf)
        self._before = np.zeros((n, 1))

    def reset(self, rows: ArrayLike, uncomputed: ArrayLike, running_uncomputed: ArrayLike,
              head_start_ms: ArrayLike = 0.0) -> None:
        """Start `rows` over from a status: its backlog `U`, its running chunk `Ur`, no
        arrivals (a negative backlog counts as 0: it would un-compute the arrivals).

        `head_start_ms`: how long the first step had been running when the status was taken
        (the replay's first step begins that long before the status; 0 for upstream's replay,
        which starts a step at the status).
        """
        rows = np.asarray(rows, np.int64)
        self._head_start[rows] = np.maximum(np.nan_to_num(head_start_ms), 0.0)
        self._backlog[rows] = np.maximum(uncomputed, 0.0)
        self._running_at_status[rows] = running_uncomputed
        self.clear_arrivals(rows)

    def clear_arrivals(self, rows: ArrayLike) -> None:
        """Drop `rows`' arrivals and start them over from their status."""
        rows = np.asarray(rows, np.int64)
        self._count[rows] = 0
        self._at[rows] = np.inf
        self._before[rows] = 0.0
        self._rewind(rows)

    def append(self, row: int, arrival_ms: Sequence[float], arrival_tokens: Sequence[float]
               ) -> None:
        """Queue more prompts behind row `row`'s, in dispatch order (ms after the status,
        < 0 and NaN count as 0, +inf never arrives; uncomputed tokens, < 0 count as 0)."""
        at = np.asarray(arrival_ms, np.float64)
        at = np.where(np.isnan(at), 0.0, np.maximum(at, 0.0))
        keep = np.isfinite(at)
        at = at[keep]
        if not at.size:
            return
        tokens = np.maximum(np.asarray(arrival_tokens, np.float64)[keep], 0.0)
        start = int(self._count[row])
        end = start + at.size
        self._reserve(end + 1)
        self._at[row, start:end] = at
        self._before[row, start + 1:end + 1] = self._before[row, start] + np.cumsum(tokens)
        self._count[row] = end
        if at[0] < self._horizon[row]:  # it could have joined a step already completed
            self._rewind(np.array([row]))

    def set_arrivals(self, arrival_ms: ArrayLike | None, arrival_tokens: ArrayLike | None
                     ) -> None:
        """Replace every row's arrivals with padded (rows, arrivals) arrays, +inf padding, as
        `predict_computed_prefill_tokens` takes them; rewinds every row."""
        if (arrival_ms is None) != (arrival_tokens is None):
            raise ValueError("arrival_ms and arrival_tokens go together")
        n = self.n
        at = np.zeros((n, 0)) if arrival_ms is None else np.array(arrival_ms, np.float64,
                                                                   ndmin=2)
        tokens = np.zeros((n, 0)) if arrival_tokens is None else np.asarray(arrival_tokens,
                                                                            np.float64)
        if at.shape[0] != n or tokens.shape != at.shape:
            raise ValueError("arrival_ms and arrival_tokens must be (instances, arrivals)")
        at = np.where(np.isnan(at), 0.0, np.maximum(at, 0.0))
        self._at = np.hstack([at, np.full((n, 1), np.inf)])
        self._before = np.zeros((n, at.shape[1] + 1))
        np.cumsum(np.where(np.isfinite(at), np.maximum(tokens, 0.0), 0.0), axis=1,
                  out=self._before[:, 1:])
        self._count = np.isfinite(at).sum(axis=1)
        self._rewind(np.arange(n))

    def advance(self, elapsed_ms: ArrayLike, a: ArrayLike, b: ArrayLike, c: ArrayLike,
                max_num_batched_tokens: ArrayLike) -> np.ndarray:
        """Predicted computed tokens of every row at `elapsed_ms` after its status, with the
        step time `a x² + b x + c` ms; the arguments of `predict_computed_prefill_tokens`."""
        n = self.n
        elapsed = np.array(elapsed_ms, dtype=np.float64, ndmin=1)
        if elapsed.shape != (n,):
            raise ValueError("elapsed_ms must have one value per row")
        elapsed[np.isnan(elapsed)] = 0.0
        priced = self._price(a, b, c, max_num_batched_tokens)
        stale = elapsed < self._horizon
        if priced is not self._priced:
            same = (priced == self._priced) | (np.isnan(priced) & np.isnan(self._priced))
            stale |= ~same.all(axis=0)
        if stale.any():
            self._rewind(np.flatnonzero(stale))
        self._priced = priced
        self._horizon = elapsed
        fitted = np.isfinite(priced[:3]).all(axis=0)
        total = self._backlog + self._before[np.arange(n), self._count]
        in_flight = np.zeros(n)  # tokens of the step in flight at `elapsed`, apportioned
        active = np.flatnonzero(fitted & ~self._void & (elapsed > 0) & (self._clock < elapsed)
                                & (self._computed < total)
                                & (self._iterations < self.max_iterations))
        active = self._finish_pending(active, elapsed, total, in_flight)
        if active.size <= self.scalar_rows:
            for row in active.tolist():
                self._run_row(row, elapsed, priced, total, in_flight)
            active = active[:0]
        while active.size:
            active = self._step(active, elapsed, priced, total, in_flight)
        predicted = np.clip(self._computed + in_flight, 0, total)
        return np.where(self._void, 0, predicted).astype(np.int64)

    def _price(self, a: ArrayLike, b: ArrayLike, c: ArrayLike, max_b: ArrayLike) -> np.ndarray:
        """The (4, n) step-time coefficients and budgets; the kept array when the caller
        passes the very arrays of the last call (it must not modify them in place: new values
        come in new arrays, which are compared element by element)."""
        args = (a, b, c, max_b)
        if self._price_args is not None and all(
                x is y for x, y in zip(args, self._price_args, strict=True)):
            return self._priced
        self._price_args = args
        return np.vstack([np.broadcast_to(np.asarray(v, np.float64), (self.n,))
                          for v in (a, b, c, _max_batched(max_b, self.n))])

    def _finish_pending(self, active: np.ndarray, elapsed: np.ndarray, total: np.ndarray,
                        in_flight: np.ndarray) -> np.ndarray:
        """Apportion or complete the kept steps in flight of `active`; returns the rows that
        need simulating (the arithmetic is `_step`'s, so the results are the same)."""
        kept = np.isfinite(self._pend_ms[active])
        pend = active[kept]
        if not pend.size:
            return active
        start, d = self._pend_start[pend], self._pend_ms[pend]
        left = elapsed[pend] - start
        full = left >= d
        last = pend[~full]
        in_flight[last] = _round_half_away(self._pend_batch[last] * left[~full] / d[~full])
        done = pend[full]
        self._running[done[self._pend_chunk[done]]] = 0.0
        self._computed[done] += self._pend_batch[done]
        self._clock[done] = start[full] + d[full]
        self._iterations[done] += 1
        self._pend_ms[done] = np.nan
        busy = done[(self._clock[done] < elapsed[done]) & (self._computed[done] < total[done])
                    & (self._iterations[done] < self.max_iterations)]
        return np.concatenate([active[~kept], busy])

    def _run_row(self, row: int, elapsed: np.ndarray, priced: np.ndarray, total: np.ndarray,
                 in_flight: np.ndarray) -> None:
        """`_step` for one row, in Python floats, until the row stops.

        Between two dispatches only a handful of rows have a step to complete, and numpy's
        per-call cost on a few elements is most of a decision; the same IEEE operations in
        the same order on Python floats give the same results.
        """
        e, t_total = float(elapsed[row]), float(total[row])
        a, b, c, max_b = (float(v) for v in priced[:, row])
        at, before = self._at[row], self._before[row]
        backlog = float(self._backlog[row])
        clock, computed = float(self._clock[row]), float(self._computed[row])
        running, iterations = float(self._running[row]), int(self._iterations[row])
        while iterations < self.max_iterations:
            t = clock
            count = int((at <= t).sum())
            ready = backlog + float(before[count]) - computed
            if ready <= 0:  # wait for the next arrival
                t = float(at[count])
                ready = backlog + float(before[int((at <= t).sum())]) - computed
                if not t < e:
                    break
                if ready <= 0:  # only zero-token arrivals came
                    clock, iterations = t, iterations + 1
                    continue
            partial = 0 < running < max_b
            batch = running if partial else min(ready, max_b)
            d = a * batch * batch + b * batch + c
            if not MIN_PREDICTED_STEP_MS <= d <= MAX_PREDICTED_STEP_MS:  # also NaN
                self._void[row] = True
                break
            left = e - t
            if not left >= d:
                in_flight[row] = math.floor(batch * left / d + 0.5)
                self._pend_start[row], self._pend_batch[row] = t, batch
                self._pend_ms[row], self._pend_chunk[row] = d, partial
                break
            running = 0.0 if partial else running
            computed, clock, iterations = computed + batch, t + d, iterations + 1
            if not (clock < e and computed < t_total):
                break
        self._clock[row], self._computed[row] = clock, computed
        self._running[row], self._iterations[row] = running, iterations

    def _rewind(self, rows: np.ndarray) -> None:
        """Forget the steps simulated for `rows`; their status and arrivals stay."""
        self._pend_ms[rows] = np.nan
        self._running[rows] = self._running_at_status[rows]
        self._clock[rows] = -self._head_start[rows]
        self._computed[rows] = 0.0
        self._iterations[rows] = 0
        self._void[rows] = False

    def _reserve(self, width: int) -> None:
        have = self._at.shape[1]
        if width <= have:
            return
        grow = max(width, 2 * have) - have
        self._at = np.hstack([self._at, np.full((self.n, grow), np.inf)])
        self._before = np.hstack([self._before, np.zeros((self.n, grow))])

    def _arrived(self, idx: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row of `idx`: tokens arrived by time `t`, and the time of the next arrival."""
        count = (self._at[idx] <= t[:, None]).sum(axis=1)
        return self._before[idx, count], self._at[idx, count]

    def _step(self, idx: np.ndarray, elapsed: np.ndarray, priced: np.ndarray,
              total: np.ndarray, in_flight: np.ndarray) -> np.ndarray:
        """Simulate one step of the rows `idx`; returns those still active.

        Only a step that completes by `elapsed` (or a wait that ends before it) changes the
        kept state; the step in flight goes to `in_flight`, priced again at the next advance.
        """
        t = self._clock[idx]
        arrived, next_at = self._arrived(idx, t)
        ready = self._backlog[idx] + arrived - self._computed[idx]
        idle = ready <= 0
        waiting = idx[:0]
        if idle.any():  # wait for the next arrival, which cannot be before `t`
            t = np.where(idle, next_at, t)
            late, _ = self._arrived(idx[idle], t[idle])
            ready[idle] = self._backlog[idx[idle]] + late - self._computed[idx[idle]]
            waits = t < elapsed[idx]  # False for +inf: nothing more arrives
            idx, t, ready = idx[waits], t[waits], ready[waits]
            empty = ready <= 0  # only zero-token arrivals came: wait for the next one
            waiting = idx[empty]
            self._clock[waiting] = t[empty]
            self._iterations[waiting] += 1
            idx, t, ready = idx[~empty], t[~empty], ready[~empty]
        max_b = priced[3, idx]
        ur = self._running[idx]
        partial = (ur > 0) & (ur < max_b)
        batch = np.where(partial, ur, np.minimum(ready, max_b))
        a, b, c = priced[0, idx], priced[1, idx], priced[2, idx]
        with np.errstate(over="ignore", invalid="ignore"):
            d = a * batch * batch + b * batch + c
        ok = (d >= MIN_PREDICTED_STEP_MS) & (d <= MAX_PREDICTED_STEP_MS)  # False for NaN
        left = elapsed[idx] - t
        full = ok & (left >= d)
        last = ok & ~full
        self._void[idx[~ok]] = True
        done = idx[full]
        self._running[done] = np.where(partial[full], 0.0, ur[full])
        self._computed[done] += batch[full]
        self._clock[done] = t[full] + d[full]
        self._iterations[done] += 1
        in_flight[idx[last]] = _round_half_away(batch[last] * left[last] / d[last])
        pend = idx[last]
        self._pend_start[pend] = t[last]
        self._pend_batch[pend] = batch[last]
        self._pend_ms[pend] = d[last]
        self._pend_chunk[pend] = partial[last]
        busy = done[(self._clock[done] < elapsed[done]) & (self._computed[done] < total[done])]
        if waiting.size:
            busy = np.concatenate([busy, waiting])
        return busy[self._iterations[busy] < self.max_iterations]


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
