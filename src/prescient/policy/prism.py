"""PRISM, NexusSched's cluster layer: the authors' `ELRARRouter`, reproduced (papers.md §1.4).

Each engine's agent pushes a state (every 200 ms, `AGENT_PUSH_INTERVAL_S`: here the policy
reads each engine's status that often, as the peers' scrapes do); the router scores every engine
whose state is fresh and sends the request to the highest score, the first engine on ties (the
authors' strict `>`, which is their documented cold-start hotspot):

    score = w1·s_latency + w2·s_load + w3·s_mode + w4·s_kv           (w1..w4 = 1)
    s_latency = max(0, 1 − min(latency_pred_ms / slo_tpot_ms, 5))    (SLO 50 ms: --tpot-slo)
    s_load    = 1 − tanh(pending_tokens / capacity_tokens_per_s / load_scale_s)   (scale 1 s)
    s_mode    = 1 latency-optimised (< 256 tokens a step), 0 throughput-optimised (> 1024),
                0.5 balanced
    s_kv      = kv_beta (1) if this session's last request went to this engine within
                the affinity window (300 s), else 0

The agent's fields, from what a Llumnix status carries:

- `latency_pred_ms`: the engine's predicted duration of its current step, `T(B, S)` of
  NexusSched's structural step model (`predict/structural.py`) with `B` the running requests and
  `S` the step's scheduled tokens (its prefill chunk plus one per running request). The model is
  fitted online per instance from the profiling samples (upstream's H100 line
  `8.7 + 0.0215·S` ms until it has warmed up). The paper's engine fits `B` too; CMS samples
  carry `S` only, so the router's model is fitted at `B = 1`.
- `pending_tokens_total`: the waiting queue's uncomputed prompt tokens, plus (the later
  version of the router) the prompt tokens this router sent there since that state; a fresh
  state (a new status timestamp) resets the local count.
- `engine_capacity`: tokens per second of a full chunk, `M / T(1, M)` with `M` the instance's
  `max_num_batched_tokens`.
- the mode: the agent's heuristic on its step sizes, here on the current step's tokens `S` (the
  agent averages its last ten steps).

Staleness: a state older than `STALE_S` (3 s, `VLLM_ELRAR_STALE_MS`) is not scored; with no
fresh state at all the router falls back to QPS routing (the fewest requests it sent in the last
`QPS_WINDOW_S`, the first engine on ties).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

import numpy as np

from prescient.cms.view import ProfilingSample
from prescient.model import InferType, Request
from prescient.policy.dispatcher import Dispatcher
from prescient.policy.framework import Pipeline, SchedulingContext
from prescient.policy.state import ClusterState
from prescient.predict.structural import StructuralBank, StructuralStepModel

AGENT_PUSH_INTERVAL_S = 0.2  # ELRARConfig.push_interval, ms -> s
STALE_S = 3.0  # VLLM_ELRAR_STALE_MS
KV_AFFINITY_WINDOW_S = 300.0  # VLLM_ELRAR_KV_AFFINITY_WINDOW
KV_BETA = 1.0  # VLLM_ELRAR_KV_BETA
LOAD_SCALE_S = 1.0  # VLLM_ELRAR_LOAD_SCALE_S
WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # VLLM_ELRAR_W1..W4: latency, load, mode, kv
LATENCY_CLIP = 5.0  # predicted latency / SLO is clipped here before 1 - x
LATENCY_MODE_TOKENS = 256  # the agent's mode heuristic: fewer tokens a step...
THROUGHPUT_MODE_TOKENS = 1024  # ...more tokens a step
QPS_WINDOW_S = 60.0  # the fallback's request-rate window
SESSION_CLEAN_EVERY = 64  # VLLM_ELRAR_SESSION_CLEAN_EVERY: forget expired sessions this often


def latency_score(pred_ms: np.ndarray, slo_ms: float) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.minimum(np.maximum(pred_ms, 0.0) / slo_ms, LATENCY_CLIP))


def load_score(pending_tokens: np.ndarray, capacity_tokens_s: np.ndarray) -> np.ndarray:
    """`1 − tanh(seconds of pending work / scale)`; no capacity counts as no load (later code)."""
    seconds = np.where(capacity_tokens_s > 1e-6,
                       pending_tokens / np.maximum(capacity_tokens_s, 1e-6), 0.0)
    return 1.0 - np.tanh(np.maximum(0.0, seconds / LOAD_SCALE_S))


def mode_score(step_tokens: np.ndarray) -> np.ndarray:
    return np.where(step_tokens < LATENCY_MODE_TOKENS, 1.0,
                    np.where(step_tokens > THROUGHPUT_MODE_TOKENS, 0.0, 0.5))


class PrismRouter:
    """The ELRAR score as a selector, with the router's own state (a feature and an observer).

    State: per instance, the step-time model, the status timestamp last seen and the prompt
    tokens sent since; per session, the last engine and when; the recent placements (for the
    QPS fallback).
    """

    def __init__(self, slo_tpot_ms: float, *, num_warmup_samples: int = 20) -> None:
        self.slo_tpot_ms = slo_tpot_ms
        self.models = StructuralBank(num_warmup_samples)
        self._default = StructuralStepModel()  # upstream's H100 line until a model is fitted
        self._seen_ts: dict[str, float] = {}
        self._local_pending: dict[str, int] = {}
        self._sessions: dict[str, tuple[str, float]] = {}  # session -> (instance, time)
        self._sent: deque[tuple[float, str]] = deque()
        self._num_placed = 0
        self._terms: dict[str, tuple[tuple[float, int, int], tuple[float, float, float]]] = {}

    # ---- feature and observer hooks ----------------------------------------------------------

    def on_statuses(self, state: ClusterState, samples: Sequence[ProfilingSample], now: float
                    ) -> None:
        self.models.add_all(samples)
        self.models.maybe_refit_all()
        stamps = state.s("timestamp_ms")
        for row, iid in enumerate(state.ids):
            if state.has_status[row] and self._seen_ts.get(iid) != stamps[row]:
                self._seen_ts[iid] = float(stamps[row])
                self._local_pending[iid] = 0  # the fresh state counts what was sent before it

    def prepare(self, ctx: SchedulingContext) -> None:
        """Nothing per request: the scores are computed when selecting."""

    def on_placed(self, request: Request, instance_id: str, state: ClusterState, now: float
                  ) -> None:
        self._local_pending[instance_id] = (self._local_pending.get(instance_id, 0)
                                            + request.prompt_len)
        if request.session_id:
            self._sessions[request.session_id] = (instance_id, now)
        self._sent.append((now, instance_id))
        self._num_placed += 1
        if self._num_placed % SESSION_CLEAN_EVERY == 0:  # the authors' amortised clean-up
            horizon = now - KV_AFFINITY_WINDOW_S
            self._sessions = {k: v for k, v in self._sessions.items() if v[1] >= horizon}
        while self._sent[0][0] < now - QPS_WINDOW_S:
            self._sent.popleft()

    # ---- scoring ---------------------------------------------------------------------------

    def _model(self, instance_id: str) -> StructuralStepModel:
        return self.models.get(instance_id) or self._default

    def scores(self, ctx: SchedulingContext, rows: np.ndarray) -> np.ndarray:
        """The four-term score of each of `rows`."""
        st, ids = ctx.state, ctx.state.ids
        engine = np.array([self._engine_terms(st, int(r)) for r in rows]).reshape(len(rows), 3)
        pred, capacity, step_tokens = engine[:, 0], engine[:, 1], engine[:, 2]
        pending = st.s("num_uncomputed_tokens_all_waiting_prefills")[rows] + np.array(
            [self._local_pending.get(ids[r], 0) for r in rows], float)
        kv = np.array([self._kv(ctx.request.session_id, ids[r], ctx.now) for r in rows])
        w1, w2, w3, w4 = WEIGHTS
        return (w1 * latency_score(pred, self.slo_tpot_ms) + w2 * load_score(pending, capacity)
                + w3 * mode_score(step_tokens) + w4 * kv)

    def _engine_terms(self, st: ClusterState, row: int) -> tuple[float, float, float]:
        """(latency_pred_ms, capacity tokens/s, step tokens) of a row: what its agent pushes.

        They change only with its status or its model, so they are kept until either does.
        """
        iid = st.ids[row]
        model = self._model(iid)
        key = (float(st.s("timestamp_ms")[row]), id(model), model.version)
        cached = self._terms.get(iid)
        if cached is not None and cached[0] == key:
            return cached[1]
        running = float(st.s("num_running_requests")[row])
        scheduled = (st.s("num_uncomputed_tokens_scheduler_running_prefills")[row]
                     - st.s("num_unallocated_tokens_scheduler_running_prefills")[row])
        step_tokens = max(float(scheduled), 0.0) + running
        m = max(st.metadata[row].max_num_batched_tokens, 1)
        terms = (model.predict(max(running, 1.0), step_tokens),
                 m / model.predict(1.0, m) * 1000.0, step_tokens)
        self._terms[iid] = (key, terms)
        return terms

    def _kv(self, session_id: str, instance_id: str, now: float) -> float:
        last = self._sessions.get(session_id) if session_id else None
        if last is None or last[0] != instance_id or now - last[1] > KV_AFFINITY_WINDOW_S:
            return 0.0
        return KV_BETA

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        age_s = ctx.now - ctx.state.s("timestamp_ms")[rows] / 1000.0
        fresh = rows[age_s <= STALE_S]
        if not len(fresh):
            return self._qps_fallback(ctx, rows)
        return int(fresh[int(np.argmax(self.scores(ctx, fresh)))])  # first max: strict `>`

    def _qps_fallback(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        counts: dict[str, int] = {}
        for t, iid in self._sent:
            if t < ctx.now - QPS_WINDOW_S:
                continue
            counts[iid] = counts.get(iid, 0) + 1
        ids = ctx.state.ids
        return int(min(rows, key=lambda r: counts.get(ids[r], 0)))


def prism(settings: object, rng: random.Random) -> Dispatcher:
    """The `prism` policy: one ELRAR router for every leg, reading engine states every 200 ms."""
    router = PrismRouter(float(getattr(settings, "tpot_slo", 50.0)),
                         num_warmup_samples=int(getattr(settings, "num_predictor_warmup_samples",
                                                        20)))
    pipelines = {t: Pipeline([], router) for t in InferType}
    dispatcher = Dispatcher("prism", pipelines, rng, full_mode=True, features=[router],
                            observers=[router])
    dispatcher.scrape_interval_s = AGENT_PUSH_INTERVAL_S
    return dispatcher


PRISM_POLICIES = {"prism": prism}
