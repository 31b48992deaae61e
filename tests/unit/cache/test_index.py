"""Index semantics: contiguous hits from the first block, bounds, and router-history expiry."""

from __future__ import annotations

import pytest

from prescient.cache.index import ApproximateIndex, BlockIndex, contiguous_hits


def test_hits_count_only_the_run_that_starts_at_the_first_block() -> None:
    index = BlockIndex()
    index.store("a", [1, 2, 3])
    index.store("b", [2, 3, 4])  # holds a later run: upstream would count 2 blocks (§11.3)
    index.store("c", [1, 3, 4])  # a gap at block 2 stops its run
    assert index.hit_lengths([1, 2, 3, 4]) == {"a": 3, "c": 1}


def test_no_hit_is_absent_and_an_empty_prompt_hits_nothing() -> None:
    index = BlockIndex()
    index.store("a", [1, 2])
    assert index.hit_lengths([9, 1, 2]) == {}
    assert index.hit_lengths([]) == {}
    assert index.hit_lengths([1, 2]) == {"a": 2}


def test_contiguous_hits_on_bitmasks() -> None:
    # holders x (bit 0), y (bit 1), z (bit 2)
    assert contiguous_hits([0b111, 0b011, 0b011, 0b001], ["x", "y", "z"]) == {
        "x": 4, "y": 3, "z": 1}
    assert contiguous_hits([0b100, 0b100], ["x", None, "z"]) == {"z": 2}


def test_removal_and_clear_update_hits_and_sizes() -> None:
    index = BlockIndex()
    index.store("a", [1, 2, 3])
    index.store("b", [1, 2])
    index.remove("a", [2, 99])
    assert index.hit_lengths([1, 2, 3]) == {"a": 1, "b": 2}
    assert (index.size("a"), index.size("b")) == (2, 2)
    index.clear("b")
    assert index.hit_lengths([1, 2, 3]) == {"a": 1}
    assert index.size("b") == 0 and len(index) == 2  # blocks 1 and 3 (a's)


def test_memory_bound_forgets_the_least_recently_stored() -> None:
    index = BlockIndex(max_blocks=4)
    index.store("a", [1, 2, 3])
    index.store("b", [4, 5])  # 5 entries > 4: block 1 goes
    assert len(index) == 4 and index.num_evictions == 1
    assert index.hit_lengths([1, 2, 3]) == {}  # forgetting only loses hits, never invents them
    index.store("a", [2])  # refreshed: 3 is now the oldest
    index.store("b", [6])
    assert not index.holds("a", 3) and index.holds("a", 2)
    assert index.size("a") == 1 and index.size("b") == 3


def test_a_dropped_holder_frees_its_bit_for_the_next() -> None:
    index = BlockIndex()
    index.store("a", [1])
    index.store("b", [1])
    index.drop_holder("a")
    index.store("c", [1, 2])
    assert index.hit_lengths([1, 2]) == {"c": 2, "b": 1}
    assert sorted(index.holders) == ["b", "c"]


def test_many_holders_use_wide_masks() -> None:
    index = BlockIndex()
    for k in range(200):
        index.store(f"i{k}", range(k + 1))
    hits = index.hit_lengths(range(300))
    assert hits == {f"i{k}": k + 1 for k in range(200)}


def test_router_history_expires_each_pair_ttl_after_it_was_last_routed() -> None:
    index = ApproximateIndex(ttl_s=10.0)
    index.record("a", [1, 2, 3], now=0.0)
    index.record("b", [1, 2], now=5.0)
    index.record("a", [1], now=8.0)  # refreshes only (1, a)
    index.advance(10.0)
    assert index.hit_lengths([1, 2, 3]) == {"a": 1, "b": 2}
    index.advance(15.0)
    assert index.hit_lengths([1, 2, 3]) == {"a": 1}
    index.advance(18.0)
    assert index.hit_lengths([1, 2, 3]) == {}
    assert len(index) == 0


def test_router_history_without_ttl_keeps_until_the_size_bound() -> None:
    index = ApproximateIndex(ttl_s=float("inf"), max_blocks=3)
    index.record("a", [1, 2], now=0.0)
    index.record("b", [3, 4], now=1e9)
    assert index.hit_lengths([2]) == {"a": 1} and index.hit_lengths([1]) == {}


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        BlockIndex(max_blocks=0)
    with pytest.raises(ValueError):
        ApproximateIndex(ttl_s=0)


def test_the_package_loads_no_io_module() -> None:
    import subprocess
    import sys

    code = ("import sys, prescient.cache, prescient.policy.cache_aware\n"
            "print([m for m in ('aiohttp', 'zmq', 'asyncio', 'socket') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
