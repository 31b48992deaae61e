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

The bank is upstream's quadratic `PredictorBank` or, with `--step-predictor structural`, a
`StructuralBank` (NexusSched's model, fed `B = 1` per profiling sample since samples carry no
request count, priced for the replay through its quadratic approximation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prescient.model import InferType
from prescient.policy.framework import SchedulingContext
from prescient.policy.state import INFER_CODES, ClusterState
from prescient.predict.bank import ProfilingSampleLike
from prescient.predict.prefill_sim import predict_computed_prefill_tokens
from prescient.predict.quadratic import PredictorBank
from prescient.predict.structural import StructuralBank

_COMPUTES_PREFILL = (INFER_CODES[InferType.PREFILL], INFER_CODES[InferType.NEUTRAL])


class PredictorEnhancement:
    """Fills `ctx.predicted_computed_tokens` from per-instance step-time predictors."""

    def __init__(self, bank: PredictorBank | StructuralBank, max_num_batched_tokens: int) -> None:
        if max_num_batched_tokens <= 0:
            raise ValueError("--max-num-batched-tokens must be > 0")
        self.bank = bank
        self.max_num_batched_tokens = max_num_batched_tokens
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
        elapsed_ms = ctx.now * 1000.0 - st.s("timestamp_ms")
        elapsed_ms = np.where(st.has_status & np.isin(st.infer_type, _COMPUTES_PREFILL),
                              elapsed_ms, 0.0)
        # Only what the status showed can have been computed since it was taken; upstream also
        # counts the local account's later dispatches, which over-predicts progress exactly on
        # the instances that just received work, and so piles more work on them.
        uncomputed = (st.s("num_uncomputed_tokens_all_waiting_prefills")
                      + st.s("num_uncomputed_tokens_scheduler_running_prefills"))
        running = st.s("num_uncomputed_tokens_scheduler_running_prefills")
        ctx.predicted_computed_tokens = predict_computed_prefill_tokens(
            elapsed_ms, uncomputed, running, a, b, c, max_batched).astype(float)

    def _coefficients(self, st: ClusterState
                      ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-row coefficients and chunk budgets, rebuilt only when fits or instances change."""
        if self._cache is None or self._cache[0] != st.ids:
            a, b, c = self.bank.coefficient_arrays(st.ids)
            budgets = np.array([m.max_num_batched_tokens or self.max_num_batched_tokens
                                for m in st.metadata], float)
            self._cache = (st.ids, a, b, c, budgets)
        return self._cache
