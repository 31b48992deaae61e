"""`SimEngine.abort` and `num_output_tokens`: the live driver's between-step surface."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from prescient.engine import AnalyticStepTime, EngineConfig, EngineRequest, SimEngine
from prescient.model import Request

SIMPLE = AnalyticStepTime(c0=10.0, c_tok=1.0, c_attn=0.0, c_kv=0.0)
H100ISH = AnalyticStepTime(c0=5.6, c_tok=0.02, c_attn=1e-6, c_kv=5e-5, c_seq=0.006)


def make(blocks: int = 1000, *, skip: bool = True, **kw: object) -> SimEngine:
    config = EngineConfig(num_gpu_blocks=blocks, **kw)  # type: ignore[arg-type]
    return SimEngine("i0", config, H100ISH, skip_decode_runs=skip)


def req(rid: str, prompt: int, output: int, t: float = 0.0, **kw: object) -> Request:
    return Request(request_id=rid, prompt_len=prompt, output_len=output, arrival_time=t, **kw)  # type: ignore[arg-type]


def check_invariants(engine: SimEngine) -> None:
    """Decode aggregates agree with the decoding requests; an idle engine holds no block."""
    decoding = [r for r in engine._running.values() if r.g0 >= 0]
    assert engine._dec_count == len(decoding)
    assert engine._dec_a_sum == sum(r.a for r in decoding)
    assert engine._dec_finish_sum == sum(r.finish_step for r in decoding)
    assert sum(engine._dec_residue) == len(decoding)
    assert 0 <= engine.pool.num_free <= engine.pool.num_blocks
    if not engine.has_work:
        assert engine.pool.num_free == engine.pool.num_blocks
        assert not engine._live


def step_until_idle(engine: SimEngine, now: float) -> float:
    while (end := engine.start_step(now)) is not None:
        engine.complete_step()
        now = end
    return now


def test_abort_a_waiting_request_leaves_the_others_untouched() -> None:
    engine = make(max_num_seqs=1)
    engine.add_request(req("a", 100, 5), 0.0)
    engine.add_request(req("b", 100, 5), 0.0)
    end = engine.start_step(0.0)
    assert end is not None
    engine.complete_step()
    assert engine.abort("b", end)
    assert not engine.abort("b", end)  # gone already
    status = engine.snapshot(end, 0)
    assert status.num_waiting_requests == 0 and status.num_running_requests == 1
    step_until_idle(engine, end)
    check_invariants(engine)


def test_abort_mid_prefill_and_mid_decode_frees_every_block() -> None:
    engine = make(blocks=200, skip=False, max_num_seqs=4, max_num_batched_tokens=64)
    engine.add_request(req("d", 10, 400), 0.0)
    engine.add_request(req("p", 500, 10), 0.0)  # chunked over 9 steps
    now = 0.0
    for _ in range(3):
        now = engine.start_step(now) or now
        engine.complete_step()
    assert engine.num_output_tokens("p") == 0
    assert engine.num_output_tokens("d") >= 1
    used = engine.pool.num_blocks - engine.pool.num_free
    assert used > 0
    assert engine.abort("p", now)
    check_invariants(engine)
    for _ in range(40):
        now = engine.start_step(now) or now
        engine.complete_step()
    produced = engine.num_output_tokens("d")
    assert 1 < produced < 400
    assert engine.abort("d", now)
    check_invariants(engine)
    assert not engine.has_work and engine.pool.num_free == engine.pool.num_blocks
    assert engine.snapshot(now, 0).num_running_requests == 0


def test_abort_with_a_step_in_flight_is_refused() -> None:
    engine = make()
    engine.add_request(req("a", 10, 5), 0.0)
    engine.start_step(0.0)
    with pytest.raises(RuntimeError, match="in flight"):
        engine.abort("a", 0.001)


def test_aborting_to_idle_produces_a_new_status_update() -> None:
    engine = make()
    engine.add_request(req("a", 10, 50), 0.0)
    end = engine.start_step(0.0)
    assert end is not None
    engine.complete_step()
    before = engine.snapshot(end, 0).update_id
    engine.abort("a", end)
    assert engine.snapshot(end, 0).update_id == before + 1


def test_duplicate_live_ids_are_refused() -> None:
    engine = make()
    assert engine.add_request(req("a", 10, 5), 0.0) == ""
    assert "already" in engine.add_request(req("a", 10, 5), 0.0)


def test_num_output_tokens_counts_one_token_per_step_while_decoding() -> None:
    engine = make(skip=False)
    engine.add_request(req("a", 20, 6), 0.0)
    now, counts = 0.0, []
    while (end := engine.start_step(now)) is not None:
        finished = engine.complete_step().finished
        now = end
        counts.append(finished[0].num_output if finished else engine.num_output_tokens("a"))
    assert counts == [1, 2, 3, 4, 5, 6]
    with pytest.raises(KeyError):
        engine.num_output_tokens("a")


# ---- property-style: random adds, steps and aborts ------------------------------------------


def random_workload(rng: random.Random, n: int, shared: bool) -> list[Request]:
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(40.0)
        ids = tuple(rng.randint(0, 2) for _ in range(3)) if shared else ()
        out.append(req(f"r{i}", rng.randint(5, 400), rng.randint(1, 120), t,
                       prefix_block_ids=ids, prefix_block_size=32))
    return out


Hook = Callable[[SimEngine, float], None]


def drive(engine: SimEngine, requests: list[Request], between_steps: Hook
          ) -> dict[str, EngineRequest]:
    """Arrivals and step ends in time order; `between_steps` runs before every schedule, as
    the live driver applies aborts."""
    pending = sorted(requests, key=lambda r: r.arrival_time)
    done: dict[str, EngineRequest] = {}
    end: float | None = None
    i = 0
    while i < len(pending) or engine.has_work:
        arrival = pending[i].arrival_time if i < len(pending) else float("inf")
        if end is not None and end <= arrival:
            for r in engine.complete_step().finished:
                done[r.request_id] = r
            between_steps(engine, end)
            check_invariants(engine)
            end = engine.start_step(end)
        else:
            assert engine.add_request(pending[i], arrival) == ""
            i += 1
            if end is None:
                between_steps(engine, arrival)
                end = engine.start_step(arrival)
            else:
                end = engine.interrupt(arrival)
    check_invariants(engine)
    return done


@pytest.mark.parametrize("seed", range(12))
def test_random_aborts_keep_every_invariant(seed: int) -> None:
    rng = random.Random(seed)
    engine = make(blocks=120, max_num_seqs=8, max_num_batched_tokens=256,
                  skip=bool(seed % 2))
    requests = random_workload(rng, 60, shared=seed % 3 == 0)
    aborted: set[str] = set()

    def maybe_abort(engine: SimEngine, now: float) -> None:
        live = sorted(engine._live)
        if live and rng.random() < 0.3:
            rid = rng.choice(live)
            assert engine.num_output_tokens(rid) < engine._live[rid].request.output_len
            assert engine.abort(rid, now)
            aborted.add(rid)

    done = drive(engine, requests, maybe_abort)
    assert aborted
    assert set(done) | aborted == {r.request_id for r in requests}
    assert not set(done) & aborted
    for rid, r in done.items():
        assert r.num_output == r.request.output_len, rid


@pytest.mark.parametrize("seed", range(6))
def test_aborting_unscheduled_newcomers_changes_nothing(seed: int) -> None:
    """Requests aborted before any step could schedule them leave the others' timing alone."""
    rng = random.Random(100 + seed)
    keep = random_workload(rng, 40, shared=seed % 2 == 0)
    ghosts = [req(f"g{i}", rng.randint(5, 300), rng.randint(1, 50), rng.uniform(0, 1.5))
              for i in range(15)]

    def abort_ghosts(engine: SimEngine, now: float) -> None:
        for rid in [rid for rid in engine._live if rid.startswith("g")]:
            assert engine._live[rid].first_scheduled_time is None
            engine.abort(rid, now)

    with_ghosts = drive(make(blocks=150, max_num_seqs=6), keep + ghosts, abort_ghosts)
    without = drive(make(blocks=150, max_num_seqs=6), keep, lambda e, now: None)
    assert set(with_ghosts) == set(without)
    for rid, r in without.items():
        assert with_ghosts[rid].first_token_time == pytest.approx(r.first_token_time), rid
        assert with_ghosts[rid].finish_time == pytest.approx(r.finish_time), rid


@pytest.mark.parametrize("seed", range(6))
def test_aborting_a_decoding_request_equals_it_finishing_there(seed: int) -> None:
    """Stepping one by one, an abort after k tokens leaves the engine exactly as a request
    with output_len = k finishing at that step would."""
    rng = random.Random(200 + seed)
    requests = random_workload(rng, 40, shared=False)
    victims = {r.request_id for r in rng.sample(requests, 8)}
    abort_at_step = {rid: rng.randint(3, 60) for rid in victims}
    cut: dict[str, tuple[int, float]] = {}

    def abort_victims(engine: SimEngine, now: float) -> None:
        for rid in sorted(victims & engine._live.keys()):
            r = engine._live[rid]
            if r.g0 >= 0 and engine.num_steps >= abort_at_step[rid]:
                cut[rid] = (engine.num_output_tokens(rid), now)
                engine.abort(rid, now)

    aborted = drive(make(blocks=100, max_num_seqs=8, skip=False), requests, abort_victims)
    assert cut
    shortened = [req(r.request_id, r.prompt_len, cut[r.request_id][0], r.arrival_time)
                 if r.request_id in cut else r for r in requests]
    finished = drive(make(blocks=100, max_num_seqs=8, skip=False), shortened,
                     lambda e, now: None)
    for rid, r in finished.items():
        if rid in cut:
            assert r.finish_time == pytest.approx(cut[rid][1]), rid
        else:
            assert aborted[rid].finish_time == pytest.approx(r.finish_time), rid
            assert aborted[rid].num_preemptions == r.num_preemptions, rid
