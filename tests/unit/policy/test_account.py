"""The instance-status local account: counting, merging, reconciling and id normalisation."""

from __future__ import annotations

import random

import pytest

from prescient.model import InferType
from prescient.policy.account import AccountTotals, LocalAccount, normalize_request_id

P, D, N = InferType.PREFILL, InferType.DECODE, InferType.NEUTRAL


def totals(account: LocalAccount, iid: str) -> tuple[int, ...]:
    t = account.totals(iid)
    return (t.num_inflight_dispatch_prefill_requests, t.num_inflight_dispatch_decode_requests,
            t.num_inflight_dispatch_requests,
            t.num_uncomputed_tokens_inflight_dispatch_prefill_requests,
            t.num_tokens_inflight_dispatch_decode_requests)


ZERO = (0, 0, 0, 0, 0)


def recomputed(account: LocalAccount, iid: str) -> tuple[int, ...]:
    """The totals summed from the entries themselves, to check the running sums."""
    inst = account._accounts.get(iid)
    counted = [e for e in inst.entries.values() if not e.found_in_cms] if inst else []
    prefill = [e for e in counted if e.infer_type in (P, N)]
    decode = [e for e in counted if e.infer_type in (D, N)]
    return (len(prefill), len(decode), len(counted),
            sum(e.num_uncomputed_tokens for e in prefill), sum(e.num_tokens for e in decode))


@pytest.mark.parametrize(("infer_type", "expected"), [
    (P, (1, 0, 1, 60, 0)),
    (D, (0, 1, 1, 0, 100)),
    (N, (1, 1, 1, 60, 100)),
])
def test_add_counts_the_legs_sides(infer_type: InferType, expected: tuple[int, ...]) -> None:
    account = LocalAccount()
    assert account.add("r1", "i1", infer_type, 100, 60, now=0.0)
    assert totals(account, "i1") == expected
    assert account.release("r1") == ["i1"]
    assert totals(account, "i1") == ZERO


def test_unknown_instance_has_zero_totals() -> None:
    assert LocalAccount().totals("nope") == AccountTotals()


def test_duplicate_add_is_ignored() -> None:
    account = LocalAccount()
    assert account.add("r1", "i1", P, 100, 60, now=0.0)
    assert not account.add("r1", "i1", P, 100, 60, now=0.0)
    assert not account.add("r1", "i1", N, 100, 60, now=0.0)
    assert totals(account, "i1") == (1, 0, 1, 60, 0)


def test_prefill_and_decode_on_one_instance_merge_into_neutral() -> None:
    account = LocalAccount()
    assert account.add("r1", "i1", P, 100, 60, now=0.0)
    assert account.add("r1", "i1", D, 100, 60, now=0.0)
    assert totals(account, "i1") == (1, 1, 1, 60, 100)
    assert not account.add("r1", "i1", D, 100, 60, now=0.0)  # both sides present now
    assert account.release("r1") == ["i1"]
    assert totals(account, "i1") == ZERO


def test_decode_then_prefill_also_merges() -> None:
    account = LocalAccount()
    account.add("r1", "i1", D, 100, 100, now=0.0)
    account.add("r1", "i1", P, 100, 40, now=0.0)
    assert totals(account, "i1") == (1, 1, 1, 40, 100)
    account.reconcile("i1", ["r1"], [], now=0.1)
    assert totals(account, "i1") == ZERO


def test_revert_prefill_removes_the_leg_and_the_request() -> None:
    account = LocalAccount()
    account.add("r1", "p1", P, 100, 60, now=0.0)
    account.revert_prefill("r1", "p1")
    assert totals(account, "p1") == ZERO
    assert account.release("r1") == []


def test_revert_prefill_of_a_neutral_entry_keeps_the_decode_side() -> None:
    account = LocalAccount()
    account.add("r1", "i1", P, 100, 60, now=0.0)
    account.add("r1", "i1", D, 100, 60, now=0.0)
    account.revert_prefill("r1", "i1")
    assert totals(account, "i1") == (0, 1, 1, 0, 100)
    account.revert_prefill("r1", "i1")  # decode-only: nothing to revert
    account.revert_prefill("r1", "other")
    assert totals(account, "i1") == (0, 1, 1, 0, 100)


def test_reconcile_found_uncounts_but_keeps_while_waiting() -> None:
    account = LocalAccount()
    account.add("r1", "i1", P, 100, 60, now=0.0)
    account.reconcile("i1", recent_waiting=["r1"], waiting=["r1"], now=0.1)
    assert totals(account, "i1") == ZERO
    assert account.waiting_uncomputed_tokens("i1", ["r1"]) == 60  # entry kept
    account.reconcile("i1", recent_waiting=["r1"], waiting=["r1"], now=0.2)
    assert totals(account, "i1") == ZERO  # not uncounted twice


def test_reconcile_deletes_a_found_entry_once_it_stops_waiting() -> None:
    account = LocalAccount()
    account.add("r1", "i1", P, 100, 60, now=0.0)
    account.reconcile("i1", ["r1"], ["r1"], now=0.1)
    account.reconcile("i1", [], [], now=0.2)
    assert account.waiting_uncomputed_tokens("i1", ["r1"]) == 0
    assert account.release("r1") == []


def test_reconcile_found_and_gone_in_one_status_deletes() -> None:
    account = LocalAccount()
    account.add("r1", "i1", P, 100, 60, now=0.0)
    account.reconcile("i1", ["r1"], [], now=0.1)
    assert totals(account, "i1") == ZERO
    assert account.release("r1") == []


def test_reconcile_expires_unseen_entries_after_the_staleness() -> None:
    account = LocalAccount(staleness_s=10.0)
    account.add("old", "i1", P, 100, 60, now=0.0)
    account.add("young", "i1", P, 50, 50, now=5.0)
    account.reconcile("i1", [], [], now=10.0)
    assert totals(account, "i1") == (1, 0, 1, 50, 0)
    assert account.release("old") == []
    assert account.release("young") == ["i1"]


def test_reconcile_keeps_an_unseen_entry_still_in_waiting() -> None:
    account = LocalAccount(staleness_s=1.0)
    account.add("r1", "i1", P, 100, 60, now=0.0)
    account.reconcile("i1", [], ["r1"], now=100.0)
    assert totals(account, "i1") == (1, 0, 1, 60, 0)


def test_reconcile_normalises_engine_ids() -> None:
    account = LocalAccount()
    account.add("req7", "i1", P, 100, 60, now=0.0)
    account.reconcile("i1", ["cmpl-req7-0"], ["cmpl-req7-0"], now=0.1)
    assert totals(account, "i1") == ZERO
    assert account.waiting_uncomputed_tokens("i1", ["chatcmpl-req7-1a2b3c4d"]) == 60


def test_reconcile_of_an_unknown_instance_is_a_no_op() -> None:
    LocalAccount().reconcile("nope", ["r1"], [], now=0.0)


def test_release_touches_every_instance() -> None:
    account = LocalAccount()
    account.add("r1", "p1", P, 100, 60, now=0.0)
    account.add("r1", "d1", D, 100, 100, now=0.0)
    account.add("r2", "d1", D, 10, 10, now=0.0)
    assert account.release("r1") == ["d1", "p1"]
    assert totals(account, "p1") == ZERO
    assert totals(account, "d1") == (0, 1, 1, 0, 10)
    assert account.release("r1") == []


def test_release_of_a_found_entry_does_not_uncount_again() -> None:
    account = LocalAccount()
    account.add("r1", "i1", N, 100, 60, now=0.0)
    account.add("r2", "i1", N, 10, 10, now=0.0)
    account.reconcile("i1", ["r1"], ["r1"], now=0.1)
    assert account.release("r1") == ["i1"]
    assert totals(account, "i1") == (1, 1, 1, 10, 10)


def test_waiting_uncomputed_tokens_sums_known_waiting_entries() -> None:
    account = LocalAccount()
    account.add("a", "i1", P, 100, 60, now=0.0)
    account.add("b", "i1", P, 100, 30, now=0.0)
    account.add("c", "i1", P, 100, 7, now=0.0)
    assert account.waiting_uncomputed_tokens("i1", ["a", "b", "b", "preempted"]) == 90
    assert account.waiting_uncomputed_tokens("nope", ["a"]) == 0


def test_drop_instance_forgets_entries() -> None:
    account = LocalAccount()
    account.add("r1", "i1", P, 100, 60, now=0.0)
    account.add("r1", "i2", D, 100, 60, now=0.0)
    account.drop_instance("i1")
    assert totals(account, "i1") == ZERO
    assert account.release("r1") == ["i2"]
    account.drop_instance("never-seen")


def test_negative_tokens_are_rejected() -> None:
    with pytest.raises(ValueError, match="r1"):
        LocalAccount().add("r1", "i1", P, -1, 0, now=0.0)


@pytest.mark.parametrize(("engine_id", "expected"), [
    ("abc123-0", "abc123-0"),  # undecorated: the engine reported what it was sent
    ("req-000012", "req-000012"),
    ("cmpl-req-000012-0", "req-000012"),
    ("chatcmpl-abc123-1a2b3c4d", "abc123"),
    ("cmpl-req7-0", "req7"),
    ("cmpl-req7+0-3", "req7"),
    ("req7+dp1", "req7"),
    ("3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f", "3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f"),
    ("3f2b1c9e-8d7a-4b6c-9e5f-123456789012", "3f2b1c9e-8d7a-4b6c-9e5f-123456789012"),
    ("cmpl-3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f-0", "3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f"),
    ("chatcmpl-3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f-deadbeef",
     "3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f"),
    ("plain", "plain"),
    ("-0", "-0"),
    ("req-name", "req-name"),
    ("chatcmpl-xyz", "xyz"),
])
def test_normalize_request_id(engine_id: str, expected: str) -> None:
    assert normalize_request_id(engine_id) == expected


def test_counters_stay_exact_and_non_negative_over_random_operations() -> None:
    rng = random.Random(20240611)
    account = LocalAccount(staleness_s=1.0)
    instances = [f"i{k}" for k in range(4)]
    requests = [f"r{k}" for k in range(30)]
    now = 0.0
    for _ in range(2000):
        now += rng.uniform(0.0, 0.2)
        op = rng.random()
        rid, iid = rng.choice(requests), rng.choice(instances)
        if op < 0.45:
            tokens = rng.randint(1, 500)
            account.add(rid, iid, rng.choice((P, D, N)), tokens, rng.randint(0, tokens), now)
        elif op < 0.55:
            account.revert_prefill(rid, iid)
        elif op < 0.8:
            recent = rng.sample(requests, 5)
            waiting = rng.sample(requests, 8)
            account.reconcile(iid, [f"cmpl-{r}-0" for r in recent], waiting, now)
        elif op < 0.97:
            account.release(rid)
        else:
            account.drop_instance(iid)
        for inst in instances:
            assert all(v >= 0 for v in totals(account, inst)), inst
            assert totals(account, inst) == recomputed(account, inst), inst
    for rid in requests:
        account.release(rid)
    for inst in instances:
        assert totals(account, inst) == ZERO


def test_the_prefill_journal_tells_appends_from_other_changes() -> None:
    account = LocalAccount()
    start = account.prefill_serial()
    account.add("r1", "i0", InferType.NEUTRAL, 100, 80, 1.0)
    account.add("r2", "i1", InferType.DECODE, 100, 100, 1.5)  # no prefill side: no change
    epoch, times, tokens = account.prefill_log("i0")
    assert (times, tokens) == ([1.0], [80.0])
    assert account.prefill_changes(start) == ["i0"]
    seen = account.prefill_serial()
    account.add("r3", "i0", InferType.PREFILL, 50, 50, 2.0)
    assert account.prefill_changes(seen) == ["i0"]
    assert account.prefill_log("i0") == (epoch, [1.0, 2.0], [80.0, 50.0])  # appended
    seen = account.prefill_serial()
    account.release("r1")
    assert account.prefill_changes(seen) == ["i0"]
    new_epoch, times, tokens = account.prefill_log("i0")
    assert new_epoch != epoch and (times, tokens) == ([2.0], [50.0])
    account.drop_instance("i0")
    assert account.prefill_log("i0") == (-1, [], [])
    assert account.prefill_changes(seen) == ["i0"]
    assert account.prefill_changes(account.prefill_serial()) == []
