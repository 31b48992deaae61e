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

The bank is upstream's quadratic `PredictorBank` or, with `--step-predictor structural`, a
`StructuralBank` (NexusSched's model, fed `B = 1` per profiling sample since samples carry no
request count, priced for the replay through its quadratic approximation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prescient.model import InferType
from prescient.policy.account import LocalAccount
from prescient.policy.framework import SchedulingContext
from prescient.policy.state import INFER_CODES, ClusterState
from prescient.predict.bank import ProfilingSampleLike
from prescient.predict.prefill_sim import predict_computed_prefill_tokens
from prescient.predict.quadratic import PredictorBank
from prescient.predict.structural import StructuralBank

_DECODE = INFER_CODES[InferType.DECODE]  # every other instance computes prefills


class PredictorEnhancement:
    """Fills `ctx.predicted_computed_tokens` from per-instance step-time predictors.

    Args:
        bank: the step-time predictors.
        max_num_batched_tokens: tokens per step where an instance reports none.
        account: the dispatcher's local account, whose in-flight prefills are replayed behind
            each status's backlog; None replays the statuses alone.
    """

    def __init__(self, bank: PredictorBank | StructuralBank, max_num_batched_tokens: int,
                 account: LocalAccount | None = None) -> None:
        if max_num_batched_tokens <= 0:
            raise ValueError("--max-num-batched-tokens must be > 0")
        self.bank = bank
        self.max_num_batched_tokens = max_num_batched_tokens
        self.account = account
        self._cache: tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None
        self._cache = None

    def on_statuses(self, state: ClusterState, samples: Sequence[ProfilingSampleLike],
                    now: float) -> None:
        if samples:
            self.bank.add_all(samples)
            self.bank.maybe_refit_all()
            self._cache = None

    def prepare(self, ctx: SchedulingContext) -> None:
        st = ctx.state
        if not len(st):
            return
        _, a, b, c, max_batched = self._coefficients(st)
        stamped_ms = st.s("timestamp_ms")
        elapsed_ms = ctx.now * 1000.0 - stamped_ms
        replayed = st.has_status & (st.infer_type != _DECODE) & (elapsed_ms > 0)
        elapsed_ms = np.where(replayed, elapsed_ms, 0.0)
        uncomputed = (st.s("num_uncomputed_tokens_all_waiting_prefills")
                      + st.s("num_uncomputed_tokens_scheduler_running_prefills"))
        running = st.s("num_uncomputed_tokens_scheduler_running_prefills")
        arrival_ms, arrival_tokens = self._arrivals(st, replayed, stamped_ms)
        ctx.predicted_computed_tokens = predict_computed_prefill_tokens(
            elapsed_ms, uncomputed, running, a, b, c, max_batched, arrival_ms=arrival_ms,
            arrival_tokens=arrival_tokens).astype(float)

    def _arrivals(self, st: ClusterState, replayed: np.ndarray, stamped_ms: np.ndarray
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The account's in-flight prefills as padded (rows, arrivals) arrays: ms after each
        row's status (+inf pads) and uncomputed tokens; (None, None) when there are none."""
        if self.account is None:
            return None, None
        rows = np.flatnonzero(replayed & (st.a("num_inflight_dispatch_prefill_requests") > 0))
        if not len(rows):
            return None, None
        queues = [self.account.inflight_prefills(st.ids[row]) for row in rows]
        lengths = np.array([len(times) for times, _ in queues])
        width = int(lengths.max())
        if not width:
            return None, None
        # scatter all queues at once: entry k of row r goes to column k of row r
        owner = np.repeat(rows, lengths)
        column = np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        at = np.full((len(st), width), np.inf)
        tokens = np.zeros((len(st), width))
        at[owner, column] = np.concatenate([t for t, _ in queues]) * 1000.0 - stamped_ms[owner]
        tokens[owner, column] = np.concatenate([x for _, x in queues])
        return at, tokens

    def _coefficients(self, st: ClusterState
                      ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-row coefficients and chunk budgets, rebuilt only when fits or instances change."""
        if self._cache is None or self._cache[0] != st.ids:
            a, b, c = self.bank.coefficient_arrays(st.ids)
            budgets = np.array([m.max_num_batched_tokens or self.max_num_batched_tokens
                                for m in st.metadata], float)
            self._cache = (st.ids, a, b, c, budgets)
        return self._cache
