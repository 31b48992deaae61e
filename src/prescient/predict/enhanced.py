"""Predictor-enhanced scheduling as a dispatcher feature.

Between two CMS polls the scheduler sees each instance as it was at its last status, while the
instance keeps computing prefill tokens. This feature learns each instance's prefill step time
from the profiling samples its statuses carry (`PredictorBank`), and at dispatch replays the
prefill queue over the time elapsed since the status (`predict_computed_prefill_tokens`); the
result becomes `ctx.predicted_computed_tokens`, which `all_prefills_tokens_num` subtracts (and
so every policy built on it: load-balance, cache-aware, SLO).

Beyond upstream: instances that compute prefills include neutral ones (upstream only predicts
for prefill instances, so a cluster without PD disaggregation gained nothing), and the chunk
budget is each instance's reported `max_num_batched_tokens` when its metadata has one (the
`--max-num-batched-tokens` flag otherwise), so a mismatch between flag and engine cannot skew
the replay.

The local account's part of the metric is replayed too (beyond upstream). Between two polls
`all_prefills_tokens_num` also counts the prompts dispatched since the status, each at full
size until the next poll reconciles it, although the instance computes them meanwhile; at a
1000 ms poll that over-count dominates the metric, and a pick on it degenerates into "fewest
prompt tokens dispatched since the last poll". So the replay queues the account's in-flight
prefill legs behind the status's backlog, each arriving at its own dispatch time (one dispatched
before the status was stamped, yet not in it, counts as there from the status on), and the
prediction covers both parts. It never exceeds the tokens that exist (status backlog plus
account), so the metric never goes negative. Upstream instead replays the account's tokens as if
they had all been queued when the status was stamped, which credits an instance that just
received a prompt with progress on it; replaying only the status (this feature's first
version) leaves the account's whole over-count in place.

The replay is kept between decisions (`PrefillReplay`): each dispatch continues every
instance's replay from where the last one left it, and an instance starts over only when its
status changes or its in-flight prompts change other than by a new dispatch (the account's
`prefill_changes` journal says which did, so a decision does not look at every instance).
The predictions are those of a replay from scratch. Statuses reach the feature through
`on_statuses` (the dispatcher calls it after every poll), which is when they are compared.

Each replayed step is priced at the instance's decode load (beyond upstream): the profiling
samples are paired with the decode requests and context tokens of the status they came with and
fitted as `DecodeAwareStepTime`, used per instance at its status's decode load once fitted
(the bank's model before), and the decodes keep one token each of the step's budget. A status
read while a prefill step is in flight counts that step as half done (`_head_start`).

A prompt also waits for a running-request slot (beyond upstream): an engine runs at most
`max_num_seqs` requests, and when they are all taken (at high load, most decodes) a dispatched
prompt computes nothing until one finishes, while a replay that starts it at once credits the
instance with progress it has not made; at a slow poll the busiest instances then look caught
up and draw the next burst. Where the metadata reports the limit (Prescient's extension field,
0 = unknown as in upstream records), the queued prompts start no earlier than their slots
free, at a completion rate predicted from the dispatch rate (`_Slots`). Unknown limits replay
exactly as before.

The bank is upstream's quadratic `PredictorBank` or, with `--step-predictor structural`, a
`StructuralBank` (NexusSched's model, fed `B = 1` per profiling sample since samples carry no
request count, priced for the replay through its quadratic approximation).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from prescient.model import InferType, InstanceMetadata
from prescient.policy.account import LocalAccount
from prescient.policy.framework import SchedulingContext
from prescient.policy.state import INFER_CODES, ClusterState
from prescient.predict.bank import ProfilingSampleLike
from prescient.predict.decode_aware import DecodeAwareStepTime
from prescient.predict.prefill_sim import (
    MAX_PREDICTED_STEP_MS,
    MIN_PREDICTED_STEP_MS,
    PrefillReplay,
)
from prescient.predict.quadratic import PredictorBank
from prescient.predict.structural import StructuralBank

_DECODE = INFER_CODES[InferType.DECODE]  # every other instance computes prefills
_NEUTRAL = INFER_CODES[InferType.NEUTRAL]  # where the seq limit is applied (see `_Slots`)
_DECODES = "scheduler_running_to_decode_requests_num"
_DECODE_TOKENS = "scheduler_running_to_decode_tokens_num"
COMPLETION_RATE_WINDOW_S = 30.0  # dispatches counted for the cluster's completion rate
COMPLETION_RATE_MIN_DISPATCHES = 20  # fewer in the window: no rate, no seq limit applied


class PredictorEnhancement:
    """Fills `ctx.predicted_computed_tokens` from per-instance step-time predictors.

    Args:
        bank: the step-time predictors.
        max_num_batched_tokens: tokens per step where an instance reports none.
        account: the dispatcher's local account, whose in-flight prefills are replayed behind
            each status's backlog; None replays the statuses alone.
        decode_aware: price each replayed step with the instance's decode batch
            (`DecodeAwareStepTime`, once fitted) and leave the decodes their share of the
            chunk budget; False prices steps with the bank's model alone, as upstream.
        seq_limit: where an instance's metadata reports its engine's `max_num_seqs`, start
            each queued prompt no earlier than a running-request slot is free for it
            (`_Slots`); False replays every prompt as admitted at once, as upstream.
    """

    def __init__(self, bank: PredictorBank | StructuralBank, max_num_batched_tokens: int,
                 account: LocalAccount | None = None, *, decode_aware: bool = True,
                 seq_limit: bool = True) -> None:
        if max_num_batched_tokens <= 0:
            raise ValueError("--max-num-batched-tokens must be > 0")
        self.bank = bank
        self.max_num_batched_tokens = max_num_batched_tokens
        self.account = account
        self.decode_aware = decode_aware
        self.seq_limit = seq_limit
        # the cluster's request completion rate (per ms) at the last poll, which frees the
        # running-request slots of the replay; 0 before enough dispatches were seen
        self.completion_rate_per_ms = 0.0
        self._dispatched: deque[float] = deque()  # dispatch times (s) in the rate window
        self._decode_models: dict[str, DecodeAwareStepTime] = {}
        self._cache: _Coefficients | None = None
        self._price_cache: tuple[tuple[str, ...], tuple[np.ndarray, ...]] | None = None
        self._replay = _Replay((), account)

    def on_statuses(self, state: ClusterState, samples: Sequence[ProfilingSampleLike],
                    now: float) -> None:
        self._price_cache = None  # new statuses: new decode loads
        self._replay.polled = True
        self.completion_rate_per_ms = self._dispatch_rate_per_ms(now)
        if samples:
            self.bank.add_all(samples)
            self.bank.maybe_refit_all()
            if self.decode_aware:
                self._add_decode_samples(state, samples)
            self._cache = None

    def _add_decode_samples(self, state: ClusterState,
                            samples: Sequence[ProfilingSampleLike]) -> None:
        """Pair each sample with the decode load of the status it came with (the state row
        was just set from it), one model per bank key (shared or per instance)."""
        decodes, context = state.s(_DECODES), state.s(_DECODE_TOKENS)
        for sample in samples:
            row = state.index.get(sample.instance_id)
            if row is None or not state.has_status[row]:
                continue
            key = "" if self.bank.shared else sample.instance_id
            model = self._decode_models.get(key)
            if model is None:
                model = self._decode_models[key] = DecodeAwareStepTime()
            model.add(sample.num_scheduled_prefill_tokens, decodes[row], context[row],
                      sample.step_duration_ms)
        for model in self._decode_models.values():
            model.refit()

    def _dispatch_rate_per_ms(self, now: float) -> float:
        """Dispatches per ms over the last `COMPLETION_RATE_WINDOW_S` (or since the first
        one, if later); 0 with fewer than `COMPLETION_RATE_MIN_DISPATCHES` in the window.

        In a steady state requests complete as fast as they are dispatched, so this is also
        the cluster's completion rate, which frees running-request slots (`_Slots`). The
        window is long: completions follow the throughput, which bursts of dispatches do not
        raise at once (a 10 s window, following the bursts more, gave a slightly worse p99
        TTFT at a 1000 ms poll on bench/predict_value.py, within its noise).
        """
        times = self._forget_dispatches(now)
        if len(times) < COMPLETION_RATE_MIN_DISPATCHES:
            return 0.0
        span_s = min(COMPLETION_RATE_WINDOW_S, now - times[0])
        return 0.0 if span_s <= 0 else len(times) / (span_s * 1000.0)

    def _forget_dispatches(self, now: float) -> deque[float]:
        times = self._dispatched
        while times and times[0] < now - COMPLETION_RATE_WINDOW_S:
            times.popleft()
        return times

    def prepare(self, ctx: SchedulingContext) -> None:
        st = ctx.state
        if self.seq_limit:
            self._forget_dispatches(ctx.now).append(ctx.now)
        if not len(st):
            return
        a, b, c, max_batched = self._prices(st)
        stamped_ms = st.s("timestamp_ms")
        elapsed_ms = ctx.now * 1000.0 - stamped_ms
        replayed = st.has_status & (st.infer_type != _DECODE) & (elapsed_ms > 0)
        elapsed_ms = np.where(replayed, elapsed_ms, 0.0)
        if self._replay.ids is not st.ids and self._replay.ids != st.ids:
            self._replay = _Replay(st.ids, self.account)
        rate = self.completion_rate_per_ms if self.seq_limit else 0.0
        self._replay.sync(st, stamped_ms, (a, b, c, max_batched), rate)
        ctx.predicted_computed_tokens = self._replay.replay.advance(
            elapsed_ms, a, b, c, max_batched).astype(float)

    def _prices(self, st: ClusterState) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray]:
        """Per row: the step time `a x² + b x + c` (ms) at the decode load of its status, and
        the tokens a step has for prefills (the engine's budget less one per decode).

        Statuses change only with a poll (`on_statuses`) or a new instance set, so the arrays
        are kept until then; `PrefillReplay` then recognises them without comparing values.
        """
        if self._price_cache is not None and self._price_cache[0] is st.ids:
            return self._price_cache[1]
        co = self._coefficients(st)
        prices = (co.a, co.b, co.c, co.budgets)
        if self.decode_aware:
            decodes = np.nan_to_num(st.s(_DECODES))
            c = co.c + co.e * decodes + co.f * np.nan_to_num(st.s(_DECODE_TOKENS))
            prices = (co.a, co.b, c, np.maximum(co.budgets - decodes, 1.0))
        self._price_cache = (st.ids, prices)
        return prices

    def _coefficients(self, st: ClusterState) -> _Coefficients:
        """Per-row coefficients and chunk budgets, rebuilt only when fits or instances change.

        A row takes its decode-aware fit where there is one, the bank's model otherwise
        (decode terms 0).
        """
        if self._cache is None or (self._cache.ids is not st.ids and self._cache.ids != st.ids):
            a, b, c = self.bank.coefficient_arrays(st.ids)
            e, f = np.zeros(len(st)), np.zeros(len(st))
            for row, instance_id in enumerate(st.ids):
                model = self._decode_models.get("" if self.bank.shared else instance_id)
                fit = None if model is None else model.coefficients
                if fit is not None:
                    a[row], b[row], c[row], e[row], f[row] = fit
            budgets = np.array([m.max_num_batched_tokens or self.max_num_batched_tokens
                                for m in st.metadata], float)
            self._cache = _Coefficients(st.ids, a, b, c, e, f, budgets)
        return self._cache


class _Coefficients(NamedTuple):
    ids: tuple[str, ...]
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    e: np.ndarray  # ms per decode request
    f: np.ndarray  # ms per decode context token
    budgets: np.ndarray


class _Slots(NamedTuple):
    """Per row, what the engine's `max_num_seqs` allows the replay (NaN where no limit is
    known, or where it is not applied: no rate, a prefill instance).

    An engine runs at most `max_num_seqs` requests at once, prefilling and decoding alike; a
    prompt waits in its queue, computing nothing, until a running request finishes. The
    status says how many run (`num_running_requests`) and wait (`num_waiting_requests`); the
    queue is those waiting, then the local account's in-flight prompts in dispatch order. The
    first `free = max_num_seqs - running` of them start when they reach the engine; the one
    at queue position `q >= free` (from 0) waits for the `q + 1 - free`-th completion since
    the status. Completions are a fluid at `rate` per ms: the cluster's completion rate (its
    dispatch rate, in a steady state) apportioned by running requests (Little's law: equal
    time in the engine everywhere), so the `k`-th comes `k / rate` ms after the status.
    Applied on neutral instances only: a prefill instance's requests leave when their prefill
    is done, which the replay itself would have to free (not modelled).
    """

    free: np.ndarray  # slots free at the status
    waiting: np.ndarray  # prompts waiting at the status
    rate: np.ndarray  # slots freed per ms

    def start_ms(self, row: int, positions: np.ndarray) -> np.ndarray:
        """The earliest start (ms after the status) of the prompts at queue `positions` of
        `row` (0 where a slot is free at once, +inf where none ever is at this rate)."""
        free, rate = self.free[row], self.rate[row]
        if np.isnan(free):
            return np.zeros(len(positions))
        wait = positions + 1.0 - free
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(wait <= 0, 0.0, wait / rate)


def _slots(st: ClusterState, limits: np.ndarray, rate_per_ms: float) -> _Slots:
    running = np.maximum(np.nan_to_num(st.s("num_running_requests")), 0.0)
    applied = (limits > 0) & st.has_status & (st.infer_type == _NEUTRAL) & (rate_per_ms > 0)
    total = float(running[applied].sum())
    nan = np.full(len(st), np.nan)
    if not applied.any():
        return _Slots(nan, nan, nan)
    free = np.where(applied, np.maximum(limits - running, 0.0), np.nan)
    waiting = np.where(applied, np.maximum(np.nan_to_num(st.s("num_waiting_requests")), 0.0),
                       np.nan)
    share = running / total if total > 0 else np.zeros(len(st))
    rate = np.where(applied, rate_per_ms * share, np.nan)
    return _Slots(free, waiting, rate)


class _Replay:
    """One `PrefillReplay` per instance set, kept in step with the statuses and the account.

    A row starts over when its status changes (stamp, backlog, running chunk, or what its seq
    limit allows); the account's in-flight prefills join it as they are dispatched (appended,
    so the replay continues), and a change other than an append (a prompt reconciled,
    released, merged) reloads the row.

    With a seq limit (`_Slots`), the status's waiting prompts beyond the free slots leave the
    backlog and join the replay as arrivals at their slots' times (each an equal share of the
    waiting tokens), and each in-flight prompt arrives at its dispatch or its slot's time,
    whichever is later.
    """

    def __init__(self, ids: tuple[str, ...], account: LocalAccount | None) -> None:
        n = len(ids)
        self.ids = ids
        self.account = account
        self.replay = PrefillReplay(n)
        # stamp, backlog, running chunk, free slots, waiting prompts, slot rate of each row
        self._status = np.full((6, n), np.nan)
        self.polled = True  # statuses may have changed since the last sync
        self._epoch = [-2] * n  # the account epoch of the arrivals loaded; -2: none read
        self._loaded = np.zeros(n, np.int64)  # arrivals loaded per row
        self._serial = -1 if account is None else account.prefill_serial()
        nan = np.full(n, np.nan)
        self._slots = _Slots(nan, nan, nan)
        self._waiting_tokens = np.zeros(n)  # tokens of the waiting prompts held for slots
        self._metadata: list[InstanceMetadata] | None = None  # where `_limits` came from
        self._limits = np.zeros(n)

    def sync(self, st: ClusterState, stamped_ms: np.ndarray,
             priced: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
             rate_per_ms: float = 0.0) -> None:
        changed = np.zeros(0, np.int64)
        if self.polled:  # statuses change with polls only (`on_statuses`)
            self.polled = False
            running = st.s("num_uncomputed_tokens_scheduler_running_prefills")
            waiting_tokens = st.s("num_uncomputed_tokens_all_waiting_prefills")
            backlog = waiting_tokens + running
            slots = _slots(st, self._seq_limits(st), rate_per_ms)
            status = np.vstack([stamped_ms, backlog, running, *slots])
            same = (status == self._status) | (np.isnan(status) & np.isnan(self._status))
            changed = np.flatnonzero(~same.all(axis=0))
            self._status = status
            self._slots = slots
        if changed.size:
            # waiting prompts beyond the free slots wait for theirs: out of the backlog
            held = np.clip(slots.waiting - slots.free, 0.0, None)
            held = np.where(np.isnan(held), 0.0, held)
            share = np.divide(held, slots.waiting, out=np.zeros(len(held)),
                              where=held > 0)
            self._waiting_tokens = np.maximum(np.nan_to_num(waiting_tokens), 0.0) * share
            backlog = backlog - self._waiting_tokens
            head = _head_start(st, changed, backlog, running, priced)
            self.replay.reset(changed, backlog[changed], running[changed], head)
            self._loaded[changed] = 0
            for row in changed.tolist():
                self._epoch[row] = -2
                self._queue_held(row)
        if self.account is None:
            return
        account = self.account
        # a reset row with prompts in flight reads them all; any other row only if it changed
        inflight = st.a("num_inflight_dispatch_prefill_requests")[changed]
        rows = set(changed[inflight > 0].tolist())
        index = st.index
        rows.update(index[i] for i in account.prefill_changes(self._serial) if i in index)
        self._serial = account.prefill_serial()
        for row in rows:
            self._load(row, account.prefill_log(self.ids[row]), stamped_ms[row])

    def _seq_limits(self, st: ClusterState) -> np.ndarray:
        """Per row, the engine's `max_num_seqs` from its metadata (0: unknown)."""
        if self._metadata is not st.metadata:
            self._metadata = st.metadata
            self._limits = np.array([m.max_num_seqs for m in st.metadata], float)
        return self._limits

    def _queue_held(self, row: int) -> None:
        """Queue the status's waiting prompts that wait for a slot, at their slots' times."""
        tokens = float(self._waiting_tokens[row])
        slots = self._slots
        if not tokens > 0:
            return
        free, waiting = int(slots.free[row]), int(slots.waiting[row])
        at = slots.start_ms(row, np.arange(free, waiting, dtype=float))
        self.replay.append(row, at, np.full(len(at), tokens / len(at)))

    def _load(self, row: int, log: tuple[int, list[float], list[float]], stamped_ms: float
              ) -> None:
        epoch, times, tokens = log
        start = int(self._loaded[row])
        if start and (epoch != self._epoch[row] or len(times) < start):
            # not an append: replay the row again from its status. (Arrivals read after an
            # empty load are all new since the last advance, whatever the epoch, so they
            # append: `PrefillReplay.append` rewinds by itself if one is not.)
            self.replay.clear_arrivals([row])
            self._queue_held(row)
            start = 0
        if len(times) > start:
            at = np.array(times[start:], np.float64) * 1000.0 - stamped_ms
            if not np.isnan(self._slots.free[row]):  # no earlier than its slot
                waiting = self._slots.waiting[row]
                positions = waiting + np.arange(start, len(times), dtype=float)
                at = np.maximum(at, self._slots.start_ms(row, positions))
            self.replay.append(row, at, tokens[start:])
        self._loaded[row] = len(times)
        self._epoch[row] = epoch


def _head_start(st: ClusterState, rows: np.ndarray, backlog: np.ndarray, running: np.ndarray,
                priced: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Per row of `rows`: how far into its first replayed step the instance probably was when
    its status was taken (ms).

    An engine produces its status when it schedules a step, and the status is read some time
    into that step: uniformly, as far as the scheduler can tell, so half the step on average.
    Starting the replay's first step at the status instead (upstream) shifts every step of the
    replay late by that much, which under-predicts what an instance with a long chunk in flight
    computes by up to a whole chunk. Rows whose status shows no prefill tokens scheduled in the
    step (`running - unallocated`) start at the status: no prefill step is in flight.
    """
    a, b, c, max_b = (v[rows] for v in priced)
    ur, u = running[rows], np.maximum(backlog[rows], 0.0)
    scheduled = ur - st.s("num_unallocated_tokens_scheduler_running_prefills")[rows]
    batch = np.where((ur > 0) & (ur < max_b), ur, np.minimum(u, max_b))
    with np.errstate(over="ignore", invalid="ignore"):
        step_ms = a * batch * batch + b * batch + c
    usable = (scheduled > 0) & (step_ms >= MIN_PREDICTED_STEP_MS) & (
        step_ms <= MAX_PREDICTED_STEP_MS)
    return np.where(usable, step_ms / 2.0, 0.0)

