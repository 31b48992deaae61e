"""Paged KV blocks with a prefix cache, counted rather than stored.

The pool does not track which physical block holds what; only the numbers matter to timing and
scheduling. A block is one of:

    free, uncached      counted in `_num_free_uncached`
    free, cached        a key in `_cached_free` (LRU order, oldest first); evicted on demand
    in use, cached      a key in `_refs` with its reference count
    in use, anonymous   held by a request but not shareable (partial, duplicate or unique content)

A request asks for fresh blocks with `allocate` (taking uncached ones first, then evicting the
least recently freed cached ones, as vLLM's free-block queue does), shares cached blocks with
`acquire`, offers a block that just became full with `register`, and gives blocks back with
`release`.

An optional `listener` hears every change of the cache's content, as a vLLM engine publishes KV
events: `stored(h)` when a block enters the cache (`register`), `removed(h)` when a cached block
is evicted for reuse (`allocate`). The simulator feeds a router's KV-events index from it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol


class BlockListener(Protocol):
    """Hears the prefix cache's content change (vLLM's BlockStored / BlockRemoved)."""

    def stored(self, block_hash: int) -> None: ...

    def removed(self, block_hash: int) -> None: ...


class BlockPool:
    """KV blocks of one engine. Invariant: free + in use == num_blocks."""

    __slots__ = ("_cached_free", "_num_free_uncached", "_refs", "block_size", "listener",
                 "num_blocks", "num_evictions")

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_evictions = 0
        self._num_free_uncached = num_blocks
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._refs: dict[int, int] = {}
        self.listener: BlockListener | None = None

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached free blocks are evictable)."""
        return self._num_free_uncached + len(self._cached_free)

    @property
    def num_cached(self) -> int:
        """Blocks whose content is in the prefix cache, in use or not."""
        return len(self._cached_free) + len(self._refs)

    def allocate(self, n: int) -> None:
        """Take `n` fresh blocks. The caller has checked `num_free >= n`."""
        take = min(n, self._num_free_uncached)
        self._num_free_uncached -= take
        for _ in range(n - take):
            h, _ = self._cached_free.popitem(last=False)
            self.num_evictions += 1
            if self.listener is not None:
                self.listener.removed(h)

    def hit_blocks(self, hashes: Sequence[int]) -> tuple[int, int]:
        """How many leading blocks of `hashes` are cached, and how many of those are free.

        Sharing a free cached block takes it out of the free pool, so admission must count it.
        """
        n = n_free = 0
        refs, cached_free = self._refs, self._cached_free
        for h in hashes:
            if h in refs:
                pass
            elif h in cached_free:
                n_free += 1
            else:
                break
            n += 1
        return n, n_free

    def acquire(self, hashes: Iterable[int]) -> None:
        """Share cached blocks (all of them must be cached)."""
        for h in hashes:
            if h in self._refs:
                self._refs[h] += 1
            else:
                del self._cached_free[h]
                self._refs[h] = 1

    def register(self, h: int) -> bool:
        """Enter a full block the caller already holds into the cache.

        Returns False when the content is cached already: the caller's copy stays anonymous.
        """
        if h in self._refs or h in self._cached_free:
            return False
        self._refs[h] = 1
        if self.listener is not None:
            self.listener.stored(h)
        return True

    def release(self, hashes: Sequence[int], num_anonymous: int) -> None:
        """Give back a request's blocks: its cached ones (in block order) and anonymous ones.

        Cached blocks are freed tail first, so a request's last blocks are evicted before its
        first ones, which other requests are likelier to share.
        """
        self._num_free_uncached += num_anonymous
        refs = self._refs
        for h in reversed(hashes):
            left = refs[h] - 1
            if left:
                refs[h] = left
            else:
                del refs[h]
                self._cached_free[h] = None
