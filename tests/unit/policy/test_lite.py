"""Lite-mode local real-time state: allocation, raised counts, release and wipe-outs."""

from __future__ import annotations

import random

from prescient.policy.lite import LiteState


def state(*instances: str) -> LiteState:
    lite = LiteState()
    for iid in instances:
        lite.add_instance(iid)
    return lite


def test_allocate_counts_requests_and_tokens() -> None:
    lite = state("i1")
    assert lite.allocate("r1", "i1", 100)
    assert lite.allocate("r2", "i1", 50)
    assert (lite.num_requests("i1"), lite.num_tokens("i1")) == (2, 150)
    assert (lite.num_requests("nope"), lite.num_tokens("nope")) == (0, 0)


def test_allocate_fails_for_duplicates_and_unknown_instances() -> None:
    lite = state("i1")
    assert lite.allocate("r1", "i1", 100)
    assert not lite.allocate("r1", "i1", 999)
    assert not lite.allocate("r1", "unknown", 100)
    assert (lite.num_requests("i1"), lite.num_tokens("i1")) == (1, 100)


def test_update_only_raises() -> None:
    lite = state("i1")
    lite.allocate("r1", "i1", 100)
    assert lite.update("r1", "i1", 130)
    assert lite.update("r1", "i1", 110)
    assert lite.num_tokens("i1") == 130
    assert not lite.update("r1", "other", 500)
    assert not lite.update("ghost", "i1", 500)


def test_release_frees_every_instance() -> None:
    lite = state("p1", "d1")
    lite.allocate("r1", "p1", 100)
    lite.allocate("r1", "d1", 100)
    assert lite.release("r1") == ["d1", "p1"]
    assert lite.num_requests("p1") == lite.num_requests("d1") == 0
    assert lite.release("r1") == []


def test_mark_prefill_complete_changes_only_the_waiting_counts() -> None:
    lite = state("i1")
    lite.allocate("r1", "i1", 100)
    lite.allocate("r2", "i1", 40)
    assert lite.mark_prefill_complete("r1", "i1")
    assert lite.mark_prefill_complete("r1", "i1")  # idempotent
    assert not lite.mark_prefill_complete("ghost", "i1")
    assert (lite.num_requests("i1"), lite.num_tokens("i1")) == (2, 140)
    assert (lite.num_waiting_requests("i1"), lite.num_waiting_tokens("i1")) == (1, 40)
    lite.update("r1", "i1", 150)
    assert (lite.num_tokens("i1"), lite.num_waiting_tokens("i1")) == (190, 40)
    lite.release("r1")
    assert (lite.num_requests("i1"), lite.num_tokens("i1")) == (1, 40)
    assert (lite.num_waiting_requests("i1"), lite.num_waiting_tokens("i1")) == (1, 40)


def test_higher_version_wipes_and_equal_version_keeps() -> None:
    lite = state("i1")
    lite.allocate("r1", "i1", 100, gateway_id="gw")
    lite.add_instance("i1", version=0)
    assert lite.num_requests("i1") == 1
    lite.add_instance("i1", version=1)
    assert (lite.num_requests("i1"), lite.num_tokens("i1")) == (0, 0)
    assert lite.release("r1") == []
    assert lite.release_gateway("gw") == []
    assert lite.allocate("r1", "i1", 10)


def test_remove_instance_forgets_its_requests() -> None:
    lite = state("i1", "i2")
    lite.allocate("r1", "i1", 100)
    lite.allocate("r1", "i2", 100)
    lite.remove_instance("i1")
    assert lite.instance_ids() == ["i2"]
    assert not lite.allocate("r2", "i1", 10)
    assert lite.release("r1") == ["i2"]
    lite.remove_instance("never-seen")


def test_release_gateway_frees_only_its_requests() -> None:
    lite = state("i1", "i2")
    lite.allocate("a", "i1", 10, gateway_id="gw1")
    lite.allocate("a", "i2", 10, gateway_id="gw1")
    lite.allocate("b", "i1", 20, gateway_id="gw2")
    assert lite.release_gateway("gw1") == ["a"]
    assert (lite.num_requests("i1"), lite.num_tokens("i1")) == (1, 20)
    assert lite.num_requests("i2") == 0
    assert lite.release_gateway("gw1") == []
    assert lite.release("b") == ["i1"]
    assert lite.release_gateway("gw2") == []


def test_counts_return_to_zero_after_many_requests() -> None:
    rng = random.Random(7)
    instances = [f"i{k}" for k in range(5)]
    lite = state(*instances)
    live: list[str] = []
    for n in range(1500):
        rid = f"r{n}"
        for iid in rng.sample(instances, rng.randint(1, 2)):
            lite.allocate(rid, iid, rng.randint(1, 1000), gateway_id=rng.choice(("g1", "g2")))
            lite.update(rid, iid, rng.randint(1, 2000))
            if rng.random() < 0.5:
                lite.mark_prefill_complete(rid, iid)
        live.append(rid)
        if rng.random() < 0.6:
            lite.release(live.pop(rng.randrange(len(live))))
        for iid in instances:
            assert lite.num_tokens(iid) >= lite.num_waiting_tokens(iid) >= 0
            assert lite.num_requests(iid) >= lite.num_waiting_requests(iid) >= 0
    lite.release_gateway("g1")
    for rid in live:
        lite.release(rid)
    for iid in instances:
        assert (lite.num_requests(iid), lite.num_tokens(iid)) == (0, 0)
        assert (lite.num_waiting_requests(iid), lite.num_waiting_tokens(iid)) == (0, 0)
