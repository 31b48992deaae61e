"""Request selection: budgets, orders, the greedy fill and slot limits (reference §7.3)."""

from __future__ import annotations

import pytest

from prescient.rescheduler.migration import (
    MigrationSettings,
    Stage,
    copy_time_s,
    final_blocks,
    full_blocks,
    next_stage,
)
from prescient.rescheduler.selection import Candidate, budget, ordered, refuse, select


def running(rid: str, seq: int, *, decoding: bool = True, migrating: bool = False) -> Candidate:
    return Candidate(rid, seq, False, decoding, migrating)


def waiting(rid: str, seq: int) -> Candidate:
    return Candidate(rid, seq, True, False, False)


# arrival order: a, w1, b, c, w2, d
REQUESTS = [running("a", 300), waiting("w1", 50), running("b", 100), running("c", 700),
            waiting("w2", 20), running("d", 200)]


@pytest.mark.parametrize(("order", "expected"), [
    ("LCR", ["d", "c", "b", "a"]),
    ("FCR", ["a", "b", "c", "d"]),
    ("SR", ["b", "d", "a", "c"]),
    ("LR", ["c", "a", "d", "b"]),
    ("FCW", ["w1", "w2"]),
    ("FCWSR", ["w1", "w2", "b", "d", "a", "c"]),
])
def test_orders(order: str, expected: list[str]) -> None:
    assert [c.request_id for c in ordered(REQUESTS, order)] == expected  # type: ignore[arg-type]
    drained = select(REQUESTS, "NUM_REQ", order, -1, num_gpu_tokens=10_000)  # type: ignore[arg-type]
    assert drained == expected


def test_ties_keep_arrival_order() -> None:
    tied = [running("x", 100), running("y", 100), running("z", 100)]
    assert [c.request_id for c in ordered(tied, "SR")] == ["x", "y", "z"]
    assert [c.request_id for c in ordered(tied, "LR")] == ["x", "y", "z"]


def test_num_req_takes_that_many_requests() -> None:
    assert select(REQUESTS, "NUM_REQ", "LCR", 2, num_gpu_tokens=10_000) == ["d", "c"]
    assert select(REQUESTS, "NUM_REQ", "FCW", 5, num_gpu_tokens=10_000) == ["w1", "w2"]


def test_token_budget_fills_greedily_and_stops_once_reached() -> None:
    # SR: b 100, d 200 (300 so far), a 300 (600 >= 500: stop)
    assert select(REQUESTS, "TOKEN", "SR", 500, num_gpu_tokens=10_000) == ["b", "d", "a"]
    assert select(REQUESTS, "TOKEN", "SR", 300, num_gpu_tokens=10_000) == ["b", "d"]


def test_a_request_costing_more_than_the_whole_budget_is_skipped_not_a_stop() -> None:
    # LR: c (700 > 400) is skipped, a 300, d 200 -> 500 >= 400
    assert select(REQUESTS, "TOKEN", "LR", 400, num_gpu_tokens=10_000) == ["a", "d"]


def test_ratio_budget_is_a_fraction_of_the_kv_capacity() -> None:
    assert budget("RATIO", 0.05, 10_000) == 500
    assert select(REQUESTS, "RATIO", "SR", 0.05, num_gpu_tokens=10_000) == ["b", "d", "a"]
    assert budget("NUM_REQ", -1, 10_000) == float("inf")


def test_migrating_and_prefilling_requests_are_skipped() -> None:
    reqs = [running("a", 100, migrating=True), running("p", 50, decoding=False),
            running("b", 200)]
    assert select(reqs, "NUM_REQ", "SR", 5, num_gpu_tokens=10_000) == ["b"]
    assert select(reqs, "NUM_REQ", "SR", -1, num_gpu_tokens=10_000) == ["b"]


def test_slots_cap_the_selection_but_not_a_drain() -> None:
    assert select(REQUESTS, "TOKEN", "SR", 10_000, num_gpu_tokens=0, max_requests=1) == ["b"]
    assert select(REQUESTS, "NUM_REQ", "SR", -1, num_gpu_tokens=0, max_requests=1) == [
        "b", "d", "a", "c"]


def test_the_slot_pre_check_refuses_commands_it_cannot_serve() -> None:
    assert refuse("NUM_REQ", 1, free_out_slots=1) == ""
    assert "slots" in refuse("NUM_REQ", 2, free_out_slots=1)
    assert "no free" in refuse("TOKEN", 1024, free_out_slots=0)
    assert refuse("NUM_REQ", -1, free_out_slots=0) == ""  # a drain goes anyway


# ---- the multi-stage protocol's arithmetic -----------------------------------------------------

def test_stages_pre_copy_until_few_blocks_are_new_then_stop_and_copy() -> None:
    s = MigrationSettings()  # last stage at <= 4 blocks, at most 3 stages
    assert next_stage(100, 0, s) is Stage.PRECOPY
    assert next_stage(5, 1, s) is Stage.PRECOPY
    assert next_stage(4, 1, s) is Stage.FINAL
    assert next_stage(0, 0, s) is Stage.FINAL  # short request: straight to the last stage
    assert next_stage(50, 3, s) is Stage.ABORT  # did not converge in 3 stages
    assert next_stage(1, 3, s) is Stage.ABORT


def test_block_arithmetic_leaves_the_block_being_written_for_the_last_stage() -> None:
    assert full_blocks(33, 16) == 2
    assert final_blocks(33, 16) == 3  # 33 tokens + the one the step in flight adds
    assert final_blocks(31, 16) == 2
    assert final_blocks(32, 16) == 3


def test_copy_time_is_handshake_plus_bytes_over_bandwidth() -> None:
    s = MigrationSettings(bandwidth_gb_s=10.0, rpc_latency_ms=2.0)
    # 10 blocks x 16 tokens x 128 KiB = 20.97 MB over 10 GB/s = 2.097 ms, plus 2 ms
    assert copy_time_s(10, 16, 131072, s) == pytest.approx(0.002 + 10 * 16 * 131072 / 1e10)
    assert copy_time_s(0, 16, 131072, s) == pytest.approx(0.002)


def test_migration_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        MigrationSettings(bandwidth_gb_s=0.0)
    with pytest.raises(ValueError, match="slots"):
        MigrationSettings(max_req_mig_in=0)
