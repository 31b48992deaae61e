"""PRISM (NexusSched's ELRAR router): its four terms, picks, local load, affinity, staleness."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from prescient.cms.view import ProfilingSample
from prescient.model import InstanceMetadata, Request
from prescient.policy import make_dispatcher
from prescient.policy.prism import AGENT_PUSH_INTERVAL_S, PrismRouter

from .conftest import Settings, ctx_for, state_of, status

FULL_CHUNK_MS = 8.7 + 0.0215 * 8192  # upstream's H100 line at one full chunk
CAPACITY = 8192 / FULL_CHUNK_MS * 1000  # tokens/s


def meta(iid: str) -> InstanceMetadata:
    return InstanceMetadata(instance_id=iid, unit_id=iid, max_num_batched_tokens=8192)


def cluster(*rows: dict[str, int], ts_ms: int = 1000):
    return state_of(*[(meta(f"i{k}"), status(f"i{k}", ts_ms=ts_ms, **fields))
                      for k, fields in enumerate(rows)])


IDLE: dict[str, int] = {}
# 10 running, 1,000 prefill tokens in this step: S = 1,010 (balanced); one second of waiting work
BUSY = {"num_running_requests": 10, "num_uncomputed_tokens_scheduler_running_prefills": 2000,
        "num_unallocated_tokens_scheduler_running_prefills": 1000,
        "num_uncomputed_tokens_all_waiting_prefills": round(CAPACITY)}
# 4 decodes and a 2,000-token chunk: S = 2,004 (throughput mode, 51.8 ms), nothing waiting
CHUNKY = {"num_running_requests": 4, "num_uncomputed_tokens_scheduler_running_prefills": 2000}


def req(prompt: int = 100, rid: str = "r", session: str = "") -> Request:
    return Request(request_id=rid, prompt_len=prompt, output_len=10, session_id=session)


def test_scores_are_the_four_term_sum_by_hand() -> None:
    router = PrismRouter(50.0)
    state = cluster(IDLE, BUSY, CHUNKY)
    scores = router.scores(ctx_for(state, req(), now=1.0), np.arange(3))
    idle = (1 - 8.7 / 50) + 1.0 + 1.0 + 0.0  # latency, load, mode, kv
    busy = (1 - (8.7 + 0.0215 * 1010) / 50) + (1 - math.tanh(1.0)) + 0.5
    chunky = 0.0 + 1.0 + 0.0  # 51.8 ms predicted: over the SLO, the latency term is 0
    assert scores == pytest.approx([idle, busy, chunky], rel=1e-4)
    assert router.select(ctx_for(state, req()), np.arange(3)) == 0


def test_a_predicted_step_over_five_slos_scores_no_latency_at_all() -> None:
    router = PrismRouter(10.0)  # 8.7 + 0.0215 * 8192 ms is far over 5 x 10 ms
    huge = {"num_running_requests": 1, "num_uncomputed_tokens_scheduler_running_prefills": 8191}
    assert router.scores(ctx_for(cluster(huge)), np.arange(1)) == pytest.approx([0.0 + 1 + 0])


def test_ties_go_to_the_first_instance_as_the_authors_strict_greater_than() -> None:
    router = PrismRouter(50.0)
    state = cluster(IDLE, IDLE, IDLE)
    assert router.select(ctx_for(state, req()), np.arange(3)) == 0
    assert router.select(ctx_for(state, req()), np.array([1, 2])) == 1


def test_sent_tokens_count_as_load_until_a_fresh_state_arrives() -> None:
    router = PrismRouter(50.0)
    state = cluster(IDLE, IDLE)
    router.on_statuses(state, [], 1.0)
    big = round(CAPACITY)  # one second of work
    router.on_placed(req(big), "i0", state, 1.0)
    ctx = ctx_for(state, req(), now=1.1)
    s0, s1 = router.scores(ctx, np.arange(2))
    assert s1 - s0 == pytest.approx(math.tanh(1.0), rel=1e-3)
    assert router.select(ctx, np.arange(2)) == 1  # the tie is broken by the local count
    router.on_statuses(state, [], 1.2)  # the same states again: the count stays
    assert router.select(ctx_for(state, req(), now=1.2), np.arange(2)) == 1
    fresh = cluster(IDLE, IDLE, ts_ms=1300)
    router.on_statuses(fresh, [], 1.3)  # newer states include what was sent: reset
    assert router.select(ctx_for(fresh, req(), now=1.3), np.arange(2)) == 0


def test_a_session_sticks_to_its_last_engine_for_300_seconds() -> None:
    router = PrismRouter(50.0)
    state = cluster(IDLE, {"num_uncomputed_tokens_all_waiting_prefills": 2000})
    router.on_placed(req(session="s"), "i1", state, 1.0)
    # i1 scores ~0.045 less for its load, but 1.0 more for the session's KV
    assert router.select(ctx_for(state, req(session="s"), now=2.0), np.arange(2)) == 1
    assert router.select(ctx_for(state, req(session="t"), now=2.0), np.arange(2)) == 0
    assert router.select(ctx_for(state, req(session="s"), now=301.5), np.arange(2)) == 0
    for k in range(64):  # the table forgets expired sessions every 64 placements
        router.on_placed(req(rid=f"x{k}", session="u"), "i0", state, 302.0)
    assert set(router._sessions) == {"u"}


def test_stale_states_are_not_scored_and_none_fresh_falls_back_to_the_fewest_sent() -> None:
    router = PrismRouter(50.0)
    state = state_of((meta("i0"), status("i0", ts_ms=1000)),
                     (meta("i1"), status("i1", ts_ms=5000, **BUSY)))
    # at 5.5 s i0's state is 4.5 s old: only the busy i1 is scored
    assert router.select(ctx_for(state, req(), now=5.5), np.arange(2)) == 1
    # at 9 s both are stale: the instance this router sent fewer requests to
    for k in range(3):
        router.on_placed(req(rid=f"a{k}"), "i0", state, 8.0)
    router.on_placed(req(rid="b"), "i1", state, 8.0)
    assert router.select(ctx_for(state, req(), now=9.0), np.arange(2)) == 1


def test_the_latency_model_learns_from_profiling_samples() -> None:
    router = PrismRouter(50.0, num_warmup_samples=20)
    state = cluster(IDLE)
    rng = random.Random(0)
    samples = [ProfilingSample("i0", s, 20.0 + 0.05 * s)
               for s in (rng.randint(16, 8192) for _ in range(40))]
    assert router._model("i0").predict(1, 1000) == pytest.approx(8.7 + 21.5)
    router.on_statuses(state, samples, 1.0)
    assert router._model("i0").predict(1, 1000) == pytest.approx(70.0, rel=0.05)
    assert router._model("i1").predict(1, 1000) == pytest.approx(8.7 + 21.5)  # per instance


def test_prism_is_registered_and_reads_states_every_200_ms() -> None:
    d = make_dispatcher("prism", Settings(), random.Random(0))
    assert d.scrape_interval_s == AGENT_PUSH_INTERVAL_S == 0.2
    d.on_instances({"i0": meta("i0"), "i1": meta("i1")}, 0.0)
    d.on_statuses({"i0": status("i0", **BUSY), "i1": status("i1")}, 1.0)
    assert d.schedule(req(rid="a"), 1.1).instance_id == "i1"
    d.on_statuses({"i0": status("i0", ts_ms=1300), "i1": status("i1", ts_ms=1300)}, 1.3)
    # equal fresh states: the tie goes to i0, then its sent tokens send the next one to i1
    assert [d.schedule(req(rid=f"r{k}"), 1.35).instance_id for k in range(3)] == [
        "i0", "i1", "i0"]
