from __future__ import annotations

from prescient.engine import BlockPool


def test_allocate_takes_uncached_blocks_before_evicting_cached_ones() -> None:
    pool = BlockPool(num_blocks=4, block_size=16)
    pool.allocate(2)
    assert pool.register(11) and pool.register(12)
    pool.release([11, 12], num_anonymous=0)
    assert pool.num_free == 4 and pool.num_cached == 2
    pool.allocate(2)  # the two uncached blocks
    assert pool.num_evictions == 0 and pool.hit_blocks([11, 12]) == (2, 2)
    pool.allocate(1)  # evicts the least recently freed: the tail block 12 went in first
    assert pool.num_evictions == 1
    assert pool.hit_blocks([11, 12]) == (1, 1)


def test_shared_blocks_are_freed_when_the_last_holder_releases() -> None:
    pool = BlockPool(num_blocks=8, block_size=16)
    pool.allocate(2)
    pool.register(1)
    pool.register(2)
    assert pool.hit_blocks([1, 2, 3]) == (2, 0)  # in use: hits that cost no free block
    pool.acquire([1, 2])
    pool.release([1, 2], num_anonymous=0)
    assert pool.num_free == 6
    pool.release([1, 2], num_anonymous=0)
    assert pool.num_free == 8


def test_register_refuses_duplicate_content() -> None:
    pool = BlockPool(num_blocks=4, block_size=16)
    pool.allocate(2)
    assert pool.register(5)
    assert not pool.register(5)  # the second copy stays anonymous
    pool.release([5], num_anonymous=1)
    assert pool.num_free == 4 and pool.num_cached == 1
