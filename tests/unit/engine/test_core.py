from __future__ import annotations

import random

import msgspec
import pytest

from prescient.engine import AnalyticStepTime, EngineConfig, SimEngine
from prescient.model import Request

# 10 ms per step plus 1 ms per scheduled token: easy to compute by hand.
SIMPLE = AnalyticStepTime(c0=10.0, c_tok=1.0, c_attn=0.0, c_kv=0.0)
H100ISH = AnalyticStepTime(c0=5.6, c_tok=0.02, c_attn=1e-6, c_kv=5e-5, c_seq=0.006)


def make(blocks: int = 1000, model: AnalyticStepTime = SIMPLE, **kw: object) -> SimEngine:
    return SimEngine("i0", EngineConfig(num_gpu_blocks=blocks, **kw), model)  # type: ignore[arg-type]


def req(rid: str, prompt: int, output: int, t: float = 0.0, **kw: object) -> Request:
    return Request(request_id=rid, prompt_len=prompt, output_len=output, arrival_time=t, **kw)  # type: ignore[arg-type]


def random_requests(
    n: int, seed: int, *, shared: bool = False, rate: float = 20.0
) -> list[Request]:
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        ids = tuple(rng.randint(0, 3) for _ in range(3)) if shared else ()
        out.append(req(f"r{i}", rng.randint(10, 600), rng.randint(1, 300), t,
                       prefix_block_ids=ids, prefix_block_size=64))
    return out


def test_single_request_timing_by_hand(run) -> None:
    done = run(make(), [req("a", 100, 5)])
    a = done["a"]
    # prefill: 10 + 100 ms; then 4 decode steps of 10 + 1 ms each
    assert a.first_scheduled_time == 0.0
    assert a.first_token_time == pytest.approx(0.110)
    assert a.finish_time == pytest.approx(0.110 + 4 * 0.011)
    assert a.num_output == 5


def test_chunked_prefill_splits_the_prompt_by_token_budget(run) -> None:
    engine = make(max_num_seqs=8, max_num_batched_tokens=64)
    done = run(engine, [req("a", 100, 1)])
    # two chunks: 64 then 36 tokens
    assert done["a"].first_token_time == pytest.approx(0.074 + 0.046)
    assert engine.num_steps == 2


def test_decodes_run_first_then_waiting_prefills_share_the_budget(run) -> None:
    engine = make(max_num_seqs=8, max_num_batched_tokens=64)
    done = run(engine, [req("a", 10, 3, 0.0), req("b", 100, 1, 0.025)])
    # a: prefill [0, 0.020]; b arrives during a's first decode [0.020, 0.031];
    # next step: a's decode (1 token) + 63 tokens of b -> 10 + 64 = 74 ms
    assert done["b"].first_scheduled_time == pytest.approx(0.031)
    assert done["a"].finish_time == pytest.approx(0.031 + 0.074)
    # b's last 37 tokens: 10 + 37 ms
    assert done["b"].first_token_time == pytest.approx(0.031 + 0.074 + 0.047)


def test_every_request_gets_its_output_and_the_pool_is_whole_again(run) -> None:
    engine = make(blocks=300, model=H100ISH, max_num_seqs=16, max_num_batched_tokens=512)
    requests = random_requests(150, seed=3)
    done = run(engine, requests)
    assert set(done) == {r.request_id for r in requests}
    for r in requests:
        assert done[r.request_id].num_output == r.output_len
    assert engine.pool.num_free == engine.pool.num_blocks
    assert sum(d.num_preemptions for d in done.values()) > 0  # the pool was tight


def test_skipping_decode_runs_matches_stepping_one_by_one(run) -> None:
    for shared in (False, True):
        results = []
        for skip in (True, False):
            engine = SimEngine("i0", EngineConfig(num_gpu_blocks=400, max_num_seqs=32,
                                                  max_num_batched_tokens=512),
                               H100ISH, skip_decode_runs=skip)
            done = run(engine, random_requests(200, seed=1, shared=shared))
            results.append((engine.num_steps, {
                k: (v.first_token_time, v.finish_time, v.num_preemptions, v.num_cached_tokens)
                for k, v in done.items()}))
        (steps_a, a), (steps_b, b) = results
        assert steps_a == steps_b
        assert a.keys() == b.keys()
        for k in a:
            assert a[k][0] == pytest.approx(b[k][0], rel=1e-9, abs=1e-12)
            assert a[k][1] == pytest.approx(b[k][1], rel=1e-9, abs=1e-12)
            assert a[k][2:] == b[k][2:]


def test_prefix_hits_cut_prefill_tokens(run) -> None:
    tokens = tuple(range(200))
    first, second = req("a", 200, 2, 0.0, prompt_token_ids=tokens), req(
        "b", 200, 2, 1.0, prompt_token_ids=tokens)
    done = run(make(), [first, second])
    # 12 full blocks of 16 are cached (the last token is always computed)
    assert done["b"].num_cached_tokens == 192
    assert done["a"].first_token_time == pytest.approx(0.210)
    assert done["b"].first_token_time - 1.0 == pytest.approx(0.010 + 0.008)


def test_prefix_block_ids_share_only_the_common_prefix(run) -> None:
    a = req("a", 256, 1, 0.0, prefix_block_ids=(7, 8), prefix_block_size=128)
    b = req("b", 256, 1, 1.0, prefix_block_ids=(7, 9), prefix_block_size=128)
    done = run(make(), [a, b])
    assert done["b"].num_cached_tokens == 128


def test_preemption_recomputes_and_still_finishes(run) -> None:
    # 20 blocks = 320 tokens; two requests that each grow to 250 tokens cannot both fit
    engine = make(blocks=20, watermark=0.0)
    done = run(engine, [req("a", 100, 150, 0.0), req("b", 100, 150, 0.001)])
    assert done["a"].num_output == done["b"].num_output == 150
    assert done["b"].num_preemptions >= 1  # the most recently admitted is the victim
    assert done["a"].num_preemptions == 0
    assert engine.pool.num_free == 20


def test_requests_that_can_never_fit_are_refused() -> None:
    engine = make(blocks=10, watermark=0.0)
    assert "KV cache capacity" in engine.add_request(req("big", 150, 20), 0.0)
    assert engine.add_request(req("ok", 100, 60), 0.0) == ""
    assert "max_model_len" in make(max_model_len=100).add_request(req("x", 90, 20), 0.0)


def test_arrival_interrupts_a_decode_run_at_the_next_step_boundary() -> None:
    engine = make()
    engine.add_request(req("a", 10, 100), 0.0)
    end = engine.start_step(0.0)
    assert end == pytest.approx(0.020)
    engine.complete_step()
    end = engine.start_step(0.020)  # a run of 99 decode steps of 11 ms
    assert end == pytest.approx(0.020 + 99 * 0.011)
    engine.add_request(req("b", 10, 1), 0.050)
    end = engine.interrupt(0.050)
    assert end == pytest.approx(0.020 + 3 * 0.011)  # the step in flight at 0.050 completes
    engine.complete_step()
    engine.start_step(end)
    assert engine.snapshot(end, 0).num_running_requests == 2


def test_snapshot_reports_the_state_after_scheduling() -> None:
    engine = make(max_num_seqs=1)
    engine.add_request(req("a", 100, 3), 0.0)
    engine.add_request(req("b", 50, 3), 0.0)
    engine.start_step(0.0)
    engine.add_request(req("c", 20, 3), 0.05)  # after the schedule: not in this status
    st = engine.snapshot(0.05, 50)
    assert st.timestamp_ms == 50
    assert st.num_running_requests == 1
    assert st.num_waiting_requests == 1
    assert st.waiting_requests == ("b",)
    assert st.recent_waiting_requests == ("a", "b")  # seen waiting at the step begin
    assert st.num_uncomputed_tokens_scheduler_running_prefills == 100
    assert st.num_unallocated_tokens_scheduler_running_prefills == 0
    assert st.num_uncomputed_tokens_all_waiting_prefills == 50
    assert st.num_used_gpu_tokens == 7 * 16  # ceil(100 / 16) blocks
    assert st.num_total_gpu_tokens == 1000 * 16


def test_snapshot_inside_a_decode_run_is_computed_in_closed_form() -> None:
    engine = make()
    engine.add_request(req("a", 16, 50), 0.0)
    engine.start_step(0.0)
    engine.complete_step()  # prefill: 26 ms, one block
    engine.start_step(0.026)
    # decode steps take 11 ms; at 0.026 + 3 * 0.011 + 0.001 the 4th decode step runs
    st = engine.snapshot(0.026 + 0.034, 60)
    assert st.step_id == 1 + 3
    assert st.scheduler_running_to_decode_tokens_num == 16 + 4  # prompt + sampled so far
    assert st.num_used_gpu_tokens == 2 * 16
    assert st.profiling_id == -1  # decode steps carry no prefill sample


def test_profiling_samples_are_prefill_steps_only_and_at_most_profiling_steps() -> None:
    engine = make(enable_profiling=True, profiling_steps=2)
    ids = []
    for k in range(3):
        engine.add_request(req(f"r{k}", 100, 3), k * 1.0)
        t = engine.start_step(k * 1.0)
        engine.complete_step()  # the prefill step: 10 + 100 ms
        st = engine.snapshot(t, 0)
        ids.append((st.profiling_id, st.num_scheduled_prefill_tokens, st.step_duration))
        engine.start_step(t)
        engine.complete_step()  # decode steps: no sample
        assert engine.snapshot(t + 0.5, 0).profiling_id == -1
        while engine.has_work:
            engine.start_step(t)
            engine.complete_step()
    assert ids == [(0, 100, pytest.approx(110.0)), (1, 100, pytest.approx(110.0)), (-1, 0, 0.0)]
    assert make().snapshot(0.0, 0).profiling_id == -1  # profiling is off by default


def test_engine_config_rejects_impossible_limits() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(num_gpu_blocks=10, max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="watermark"):
        EngineConfig(num_gpu_blocks=10, watermark=1.0)


def test_waiting_prefill_tokens_in_the_status_are_net_of_prefix_hits(run) -> None:
    tokens = tuple(range(200))
    engine = make(max_num_seqs=1)
    run(engine, [req("a", 200, 2, 0.0, prompt_token_ids=tokens)])
    engine.add_request(req("c", 50, 20), 1.0)
    engine.add_request(req("b", 200, 2, prompt_token_ids=tokens), 1.0)
    engine.start_step(1.0)
    st = engine.snapshot(1.0, 1000)
    assert st.waiting_requests == ("b",)
    assert st.num_uncomputed_tokens_all_waiting_prefills == 200 - 192


def test_shortest_predicted_first_with_aging_and_preempted_in_front(run) -> None:
    def waiting_request(rid: str, t: float, predicted: int) -> Request:
        return req(rid, 50, 5, t, predicted_output_len=predicted)

    engine = make(max_num_seqs=1, queue_policy="spf", aging_tokens_per_s=100.0)
    done = run(engine, [req("busy", 50, 20, 0.0), waiting_request("long", 0.01, 300),
                        waiting_request("short", 0.02, 10), waiting_request("old", 0.03, 150)])
    order = sorted(done, key=lambda r: done[r].first_scheduled_time)
    # keys: long 300 + 1, short 10 + 2, old 150 + 3 -> short, old, long
    assert order == ["busy", "short", "old", "long"]
    fcfs = run(make(max_num_seqs=1), [req("busy", 50, 20, 0.0), waiting_request("long", 0.01, 300),
                                       waiting_request("short", 0.02, 10)])
    assert sorted(fcfs, key=lambda r: fcfs[r].first_scheduled_time) == ["busy", "long", "short"]


def test_skipping_decode_runs_stays_exact_with_a_shortest_first_queue(run) -> None:
    rng = random.Random(4)
    requests = [msgspec.structs.replace(r, predicted_output_len=rng.randint(1, 400))
                for r in random_requests(200, seed=2)]
    results = []
    for skip in (True, False):
        engine = SimEngine("i0", EngineConfig(num_gpu_blocks=400, max_num_seqs=8,
                                              max_num_batched_tokens=512, queue_policy="spf"),
                           H100ISH, skip_decode_runs=skip)
        done = run(engine, requests)
        results.append({k: (v.first_token_time, v.finish_time) for k, v in done.items()})
    for k, (first, finish) in results[0].items():
        assert first == pytest.approx(results[1][k][0], rel=1e-9, abs=1e-12)
        assert finish == pytest.approx(results[1][k][1], rel=1e-9, abs=1e-12)


def test_lens_aims_steps_at_a_latency_that_grows_with_the_queue() -> None:
    lens = make(max_num_seqs=8, max_num_batched_tokens=8192, batching="lens",
                lens_min_step_ms=15.0, lens_target_step_ms=50.0, lens_queue_threshold=5)
    lens.add_request(req("a", 4000, 2), 0.0)
    end = lens.start_step(0.0)
    # one request waits: the target is 15 + 35 / 5 = 22 ms; SIMPLE prices 10 ms + 1 ms per
    # token, so 12 prefill tokens fit, floored at one block (16 tokens): a 26 ms step
    assert end == pytest.approx(0.026)
    busy = make(max_num_seqs=8, max_num_batched_tokens=8192, batching="lens")
    for k in range(6):
        busy.add_request(req(f"r{k}", 4000, 2), 0.0)
    assert busy.start_step(0.0) == pytest.approx(0.050)  # backlog: the 50 ms target
    vllm = make(max_num_seqs=8, max_num_batched_tokens=8192)
    vllm.add_request(req("a", 4000, 2), 0.0)
    assert vllm.start_step(0.0) == pytest.approx(4.010)  # vLLM takes the whole budget
