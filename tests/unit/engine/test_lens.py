"""LENS (NexusSched's engine batching): the target ramp, chunk sizing, and the engine with it."""

from __future__ import annotations

import pytest
from tests.unit.engine.test_core import H100ISH, SIMPLE, make, random_requests, req

from prescient.engine import AnalyticStepTime, EngineConfig, SimEngine
from prescient.engine.lens import LensStep, lens_target_s

ATTN = AnalyticStepTime(c0=10.0, c_tok=0.0, c_attn=0.001, c_kv=0.0)  # 1 us per token pair


def test_target_ramps_from_the_floor_to_the_slo_with_the_queue() -> None:
    assert lens_target_s(0, 15.0, 50.0, 5) == pytest.approx(0.015)  # idle: short steps
    assert lens_target_s(2, 15.0, 50.0, 5) == pytest.approx(0.029)  # 15 + 35 * 2/5
    assert lens_target_s(5, 15.0, 50.0, 5) == pytest.approx(0.050)  # backlog: the TPOT SLO
    assert lens_target_s(40, 15.0, 50.0, 5) == pytest.approx(0.050)  # clamped


def step(model: AnalyticStepTime = SIMPLE, target_ms: float = 50.0, decodes: int = 0,
         max_chunk: int = 512) -> LensStep:
    return LensStep(model, target_ms / 1000, num_decodes=decodes, decode_kv_tokens=0,
                    max_chunk=max_chunk, min_start_tokens=16)


def test_chunks_fill_the_target_left_after_the_decodes() -> None:
    s = step(decodes=2)  # 10 ms + 2 decode tokens: 38 ms of the 50 are left for prefill
    assert s.size(0, 4000, starting=True) == 38
    s.take(0, 38)
    assert s.size(0, 4000, starting=False) == 0  # the step is full
    assert s.size(0, 4000, starting=True) == 0


def test_chunk_size_prices_the_attention_pairs() -> None:
    # 10 ms + 0.001 ms * n * (p + n/2) <= 20 ms; p = 0: n^2 / 2 <= 10,000, n = 141
    s = step(ATTN, target_ms=20.0)
    assert s.size(0, 4000, starting=True) == 141
    assert s.predicted_s(0, 141) <= 0.020 < s.predicted_s(0, 142)
    # behind 3,000 computed tokens each new token costs 3 us: n * (3000 + n/2) <= 10,000 -> 3,
    # but a step's first chunk always gets at least 16 tokens (liveness)
    assert s.size(3000, 4000, starting=False) == 16


def test_chunks_are_at_most_512_and_waiting_requests_start_with_16() -> None:
    roomy = step(target_ms=10_000.0)
    assert roomy.size(0, 4000, starting=True) == 512
    s = step(target_ms=50.0)  # 40 tokens fit
    s.take(0, 30)  # 10 left
    assert s.size(0, 100, starting=True) == 0  # too little to start a waiting request
    assert s.size(0, 100, starting=False) == 10  # a running prefill takes what is left
    assert s.size(0, 5, starting=True) == 5  # a remainder shorter than 16 may start


def test_engine_steps_follow_the_queue_and_decodes_always_run() -> None:
    idle = make(max_num_seqs=8, batching="lens")
    idle.add_request(req("a", 4000, 2), 0.0)
    # one request waits when the step is sized: target 22 ms, 12 tokens fit, floored at 16
    assert idle.start_step(0.0) == pytest.approx(0.026)
    busy = make(max_num_seqs=8, batching="lens")
    for k in range(7):
        busy.add_request(req(f"r{k}", 4000, 2), 0.0)
    assert busy.start_step(0.0) == pytest.approx(0.050)  # >= 5 waiting: the 50 ms target
    heavy = make(max_num_seqs=64, max_num_batched_tokens=8192, batching="lens")
    for k in range(60):  # 60 one-token prompts: prefill, then decode together
        heavy.add_request(req(f"d{k}", 1, 5), 0.0)
    heavy.start_step(0.0)  # target 50 ms: 40 one-token prompts start
    heavy.complete_step()
    # 40 decodes fill the 50 ms target alone; the step's first chunk still runs (a whole
    # one-token prompt), no more
    assert heavy.start_step(1.0) == pytest.approx(1.0 + 0.051)
    heavy.complete_step()
    # 41 decodes (51 ms) exceed the target: all of them run, plus the floored first chunk
    assert heavy.start_step(2.0) == pytest.approx(2.0 + 0.052)


def test_lens_shortens_the_decodes_a_long_prompt_would_stall(run) -> None:
    # a decodes 20 tokens; a 4000-token prompt arrives: vLLM prefills it in one 4 s step, LENS
    # in short steps that keep a's tokens coming
    requests = [req("a", 10, 20, 0.0), req("b", 4000, 1, 0.03)]
    vllm = run(make(max_num_seqs=8, max_num_batched_tokens=8192), requests)
    lens = run(make(max_num_seqs=8, max_num_batched_tokens=8192, batching="lens"), requests)
    assert vllm["a"].finish_time > 4.0
    assert lens["a"].finish_time < 0.6  # 19 decode steps of at most 27 ms (22 ms target)
    assert lens["b"].first_token_time > vllm["b"].first_token_time  # the price: b's TTFT


def test_predicted_steps_stay_under_the_target_unless_floored() -> None:
    cfg = EngineConfig(num_gpu_blocks=600, max_num_seqs=32, max_num_batched_tokens=2048,
                       batching="lens")
    engine = SimEngine("i0", cfg, H100ISH)
    pending = sorted(random_requests(300, seed=7, rate=60.0), key=lambda r: r.arrival_time)
    now, i, checked = 0.0, 0, 0
    while i < len(pending) or engine.has_work:
        while i < len(pending) and pending[i].arrival_time <= now:
            engine.add_request(pending[i], now)
            i += 1
        waiting = len(engine._waiting)
        end = engine.start_step(now)
        if end is None:
            now = pending[i].arrival_time
            continue
        plan = engine._plan
        assert plan is not None
        if plan.chunks:
            target = lens_target_s(waiting, 15.0, 50.0, 5)
            floored = plan.chunks[0][1] <= 16
            assert all(n <= 512 for _, n in plan.chunks)
            assert end - now <= target + 1e-12 or floored
            checked += 1
        engine.complete_step()
        now = end
    assert checked > 100


@pytest.mark.parametrize("shared", [False, True])
def test_skipping_decode_runs_stays_exact_with_lens(run, shared: bool) -> None:
    requests = random_requests(200, seed=5, shared=shared)
    results = []
    for skip in (True, False):
        engine = SimEngine("i0", EngineConfig(num_gpu_blocks=400, max_num_seqs=8,
                                              max_num_batched_tokens=512, batching="lens"),
                           H100ISH, skip_decode_runs=skip)
        done = run(engine, requests)
        results.append({k: (v.first_token_time, v.finish_time) for k, v in done.items()})
    assert results[0].keys() == results[1].keys()
    for k, (first, finish) in results[0].items():
        assert first == pytest.approx(results[1][k][0], rel=1e-9, abs=1e-12)
        assert finish == pytest.approx(results[1][k][1], rel=1e-9, abs=1e-12)


def test_lens_changes_nothing_when_its_target_is_never_binding(run) -> None:
    # a target above any step and chunks as large as the budget: LENS is vLLM's budget again
    requests = random_requests(80, seed=11)
    vllm = run(make(model=H100ISH, max_num_seqs=8, max_num_batched_tokens=512), requests)
    lens = run(make(model=H100ISH, max_num_seqs=8, max_num_batched_tokens=512, batching="lens",
                    lens_min_step_ms=1e6, lens_target_step_ms=1e6, lens_max_chunk=512,
                    lens_min_start_tokens=1), requests)
    for k, v in vllm.items():
        assert lens[k].finish_time == pytest.approx(v.finish_time, rel=1e-12)
