"""Migration in the simulated engine: the source's and the destination's side, step by step."""

from __future__ import annotations

import pytest

from prescient.engine import AnalyticStepTime, EngineConfig, EngineRequest, SimEngine
from prescient.model import Request
from prescient.rescheduler.migration import final_blocks, full_blocks

H100ISH = AnalyticStepTime(c0=5.6, c_tok=0.02, c_attn=1e-6, c_kv=5e-5, c_seq=0.006)
BS = 16


def make(iid: str = "a", blocks: int = 1000, *, skip: bool = True, **kw: object) -> SimEngine:
    config = EngineConfig(num_gpu_blocks=blocks, block_size=BS, **kw)  # type: ignore[arg-type]
    return SimEngine(iid, config, H100ISH, skip_decode_runs=skip)


def req(rid: str, prompt: int, output: int, t: float = 0.0, **kw: object) -> Request:
    return Request(request_id=rid, prompt_len=prompt, output_len=output, arrival_time=t, **kw)  # type: ignore[arg-type]


def check_pool(engine: SimEngine) -> None:
    """Decode aggregates agree with the decoding requests; between steps, the blocks in use are
    exactly those the requests, the reservations and the arrivals hold."""
    decoding = [r for r in engine._running.values() if r.g0 >= 0]
    assert engine._dec_count == len(decoding)
    assert engine._dec_a_sum == sum(r.a for r in decoding)
    assert sum(engine._dec_residue) == len(decoding)
    assert 0 <= engine.pool.num_free <= engine.pool.num_blocks
    if engine.busy:
        return
    step = engine.num_steps
    held = sum(-(-(r.a + step - 1) // BS) if r.g0 >= 0 else r.num_blocks
               for r in engine._running.values())  # (no shared prefix blocks in these tests)
    held += sum(engine._reserved.values()) + sum(r.num_blocks for r in engine._arrived.values())
    assert engine.pool.num_blocks - engine.pool.num_free == held


class Driver:
    """Steps one engine through time; `end` is the step (or run) in flight's end, if any."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.now = 0.0
        self.end: float | None = None
        self.done: dict[str, EngineRequest] = {}

    def run_until(self, t: float) -> None:
        """Complete the steps that end by `t`; leave the next one in flight."""
        while True:
            if self.end is None:
                self.end = self.engine.start_step(self.now)
                if self.end is None:
                    return
            if self.end > t:
                return
            self._complete()

    def boundary(self, t: float) -> float:
        """Reach the first step boundary at or after `t` (a forced interrupt), as a driver
        does before a migration call; returns its time."""
        if self.end is not None:
            self.end = self.engine.interrupt(t, force=True)
            self._complete()
        else:
            self.now = max(self.now, t)
        return self.now

    def run_to_end(self, start: float = 0.0) -> dict[str, EngineRequest]:
        if self.end is None:
            self.now = max(self.now, start)
        while True:
            if self.end is None:
                self.end = self.engine.start_step(self.now)
                if self.end is None:
                    return self.done
            self._complete()

    def _complete(self) -> None:
        assert self.end is not None
        for r in self.engine.complete_step().finished:
            self.done[r.request_id] = r
        self.now, self.end = self.end, None
        check_pool(self.engine)


def migrate(src: Driver, dst: Driver, rid: str, t: float, copy_s: float) -> tuple[
        EngineRequest, float, float]:
    """Llumnix's last stage at `t`: reserve, stop at the source's next boundary, copy, commit.

    Returns the request, the stop time and the commit time.
    """
    tokens = src.engine.migration_kv_tokens(rid, t)
    assert tokens is not None
    dst.boundary(t)
    assert dst.engine.reserve_migrate_in(rid, final_blocks(tokens, BS))
    stop = src.boundary(t)
    moved = src.engine.migrate_out_stop(rid)
    assert moved is not None
    dst.engine.commit_migrate_in(moved)
    return moved, stop, stop + copy_s


@pytest.mark.parametrize("skip", [True, False])
def test_a_migrated_request_finishes_exactly_one_downtime_later(skip: bool) -> None:
    alone = make(skip=skip)
    alone.add_request(req("r", 300, 120), 0.0)
    base = Driver(alone).run_to_end()["r"]

    src, dst = Driver(make("a", skip=skip)), Driver(make("b", skip=skip))
    src.engine.add_request(req("r", 300, 120), 0.0)
    src.run_until(0.4)
    before = src.now
    assert src.engine.select_migrating_out("NUM_REQ", "FCR", 1, max_requests=1, now=0.4) == ["r"]
    produced = src.engine.num_output_tokens("r", 0.4)
    moved, stop, commit = migrate(src, dst, "r", 0.4, copy_s=0.003)
    assert before < stop
    at_stop = moved.num_output
    assert 0 < produced <= at_stop <= produced + 1  # the step in flight finished
    assert src.engine.pool.num_free == src.engine.pool.num_blocks and not src.engine.has_work
    got = dst.run_to_end(start=commit)["r"]
    assert got is moved  # the same request: its first token and output so far carry over
    assert got.num_output == base.num_output == 120
    assert got.first_token_time == base.first_token_time
    assert got.num_preemptions == 0
    assert got.finish_time == pytest.approx(base.finish_time + (commit - stop), rel=1e-9)
    assert dst.engine.num_steps == 120 - at_stop  # decodes only: nothing recomputed
    assert dst.engine.pool.num_free == dst.engine.pool.num_blocks


def test_memory_is_held_on_both_sides_while_copying() -> None:
    src, dst = Driver(make("a")), make("b")
    src.engine.add_request(req("r", 1000, 200), 0.0)
    src.run_until(0.3)
    assert src.engine.select_migrating_out("TOKEN", "SR", 4096, max_requests=1, now=0.3) == ["r"]
    tokens = src.engine.migration_kv_tokens("r", 0.3)
    assert tokens is not None and tokens > 1000
    held_before = src.engine.pool.num_blocks - src.engine.pool.num_free
    assert dst.reserve_migrate_in("r", full_blocks(tokens, BS))  # a pre-copy stage
    assert dst.pool.num_blocks - dst.pool.num_free == full_blocks(tokens, BS)
    assert src.engine.pool.num_blocks - src.engine.pool.num_free == held_before  # all still held
    status = dst.snapshot(0.3, 300)
    assert status.num_loading_requests == 1
    assert status.num_tokens_loading_requests == full_blocks(tokens, BS) * BS
    assert status.num_used_gpu_tokens == full_blocks(tokens, BS) * BS
    check_pool(dst)


def test_abort_mid_migration_frees_the_destination_reservation() -> None:
    src, dst = Driver(make("a")), make("b")
    src.engine.add_request(req("r", 500, 100), 0.0)
    src.engine.add_request(req("s", 200, 100), 0.0)
    src.run_until(0.2)
    assert src.engine.select_migrating_out("NUM_REQ", "FCR", 1, max_requests=1, now=0.2) == ["r"]
    tokens = src.engine.migration_kv_tokens("r", 0.2)
    assert tokens is not None
    assert dst.reserve_migrate_in("r", full_blocks(tokens, BS))
    end = src.boundary(0.2)
    assert src.engine.abort("r", end)  # the client went away mid-copy
    assert src.engine.migration_kv_tokens("r", end) is None
    assert src.engine.migrate_out_stop("r") is None
    assert dst.release_migrate_in("r") == full_blocks(tokens, BS)
    assert dst.pool.num_free == dst.pool.num_blocks
    assert src.engine.num_migrating_out == 0 and dst.num_migrating_in == 0
    assert set(src.run_to_end()) == {"s"}


def test_a_preempted_or_finished_request_can_no_longer_leave() -> None:
    src = Driver(make("a", blocks=20, watermark=0.0))  # 320 tokens: two requests of 250
    src.engine.add_request(req("x", 100, 150), 0.0)
    src.engine.add_request(req("y", 100, 150), 0.0)
    src.run_until(0.05)
    assert src.engine.select_migrating_out("NUM_REQ", "LCR", 1, max_requests=1, now=0.05) == ["y"]
    done = src.run_to_end()  # y, admitted last, is preempted on the way
    assert done["y"].num_preemptions >= 1
    assert src.engine.num_migrating_out == 0

    short = Driver(make("b"))
    short.engine.add_request(req("z", 10, 3), 0.0)
    short.run_until(0.012)
    chosen = short.engine.select_migrating_out("NUM_REQ", "FCR", 1, max_requests=1, now=0.012)
    assert chosen == ["z"]
    short.run_to_end()
    assert short.engine.num_migrating_out == 0


def test_selection_skips_prefilling_and_chosen_requests_and_marks_its_choice() -> None:
    engine = make(max_num_batched_tokens=256, max_num_seqs=8)
    engine.add_request(req("long", 2000, 10), 0.0)  # prefills in 8 chunks
    engine.add_request(req("w", 100, 10), 0.0)
    engine.start_step(0.0)
    engine.complete_step()
    cands = {c.request_id: c for c in engine.migration_candidates(0.0)}
    assert cands["long"].decoding is False and cands["long"].waiting is False
    assert cands["w"].waiting is True
    assert engine.select_migrating_out("NUM_REQ", "LR", -1, max_requests=1, now=0.0) == []
    assert engine.select_migrating_out("NUM_REQ", "FCW", 1, max_requests=1, now=0.0) == ["w"]
    taken = engine.select_migrating_out("NUM_REQ", "FCW", 1, max_requests=1, now=0.0)
    assert taken == []  # chosen already
    assert engine.num_migrating_out == 1


def test_a_waiting_request_moves_without_kv_and_starts_from_its_prompt() -> None:
    src, dst = Driver(make("a", max_num_seqs=1)), Driver(make("b"))
    src.engine.add_request(req("busy", 100, 50), 0.0)
    src.engine.add_request(req("w", 100, 5), 0.0)
    src.run_until(0.05)
    assert src.engine.select_migrating_out("NUM_REQ", "FCW", 1, max_requests=1, now=0.05) == ["w"]
    assert src.engine.migration_kv_tokens("w", 0.05) == 0
    end = src.boundary(0.05)
    moved = src.engine.migrate_out_stop("w")
    assert moved is not None and moved.num_blocks == 0
    dst.engine.commit_migrate_in(moved)
    assert dst.engine.snapshot(end, 0).num_waiting_requests == 1
    done = dst.run_to_end(start=end + 0.001)
    assert done["w"].num_output == 5
    assert done["w"].first_scheduled_time is not None and done["w"].first_scheduled_time > end
    assert set(src.run_to_end()) == {"busy"}


def test_reservation_is_refused_without_room_and_holds_nothing_when_refused() -> None:
    dst = Driver(make("b", blocks=100, watermark=0.0))
    dst.engine.add_request(req("big", 1200, 10), 0.0)  # 76 blocks once prefilled
    dst.run_until(0.1)
    dst.boundary(0.1)
    free = dst.engine.pool.num_free - dst.engine._decode_need(dst.engine.num_steps, 1)
    assert not dst.engine.reserve_migrate_in("r", free + 1)
    assert dst.engine.num_migrating_in == 0
    assert dst.engine.reserve_migrate_in("r", free)
    assert dst.engine.release_migrate_in("r") == free


def test_an_engine_blocked_only_by_reservations_waits_instead_of_failing() -> None:
    engine = make(blocks=40, watermark=0.0)
    assert engine.reserve_migrate_in("in", 30)
    engine.add_request(req("w", 300, 5), 0.0)  # needs 19 blocks, 10 free
    assert engine.start_step(0.0) is None
    assert engine.has_work and not engine.busy
    engine.release_migrate_in("in")
    assert Driver(engine).run_to_end(start=0.1)["w"].num_output == 5


def test_an_arrived_request_waits_for_a_batch_slot_holding_its_kv() -> None:
    src, dst = Driver(make("a")), Driver(make("b", max_num_seqs=1))
    src.engine.add_request(req("r", 200, 40), 0.0)
    dst.engine.add_request(req("other", 100, 30), 0.0)
    src.run_until(0.1)
    dst.run_until(0.1)
    src.engine.select_migrating_out("NUM_REQ", "FCR", 1, max_requests=1, now=0.1)
    moved, _, commit = migrate(src, dst, "r", 0.1, copy_s=0.0)
    status = dst.engine.snapshot(dst.now, 0)
    assert status.num_running_requests == 1 and status.num_loading_requests == 1
    done = dst.run_to_end(start=commit)
    assert done["r"] is moved and done["r"].num_output == 40
    assert done["r"].finish_time > done["other"].finish_time


def test_migration_calls_need_a_step_boundary() -> None:
    engine = make()
    engine.add_request(req("r", 100, 50), 0.0)
    engine.start_step(0.0)
    with pytest.raises(RuntimeError, match="step in flight"):
        engine.reserve_migrate_in("x", 1)
    with pytest.raises(RuntimeError, match="step in flight"):
        engine.migrate_out_stop("r")
