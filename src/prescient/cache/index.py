"""Which instances hold a prompt's prefix: one lookup rule over every KV-cache index.

Every backend answers `hit_lengths(block_hashes)`: for each holder, how many of the prompt's
blocks it holds **contiguously from the first block**. A block further in is useless without
the ones before it (an engine reuses a cached prefix, never a cached middle), so counting starts
at block 0 and stops at a holder's first gap. Upstream Llumnix counts a run that starts later as
a hit (reference §11.3); here it is not.

`BlockIndex` is the shared core: block hash -> a bitmask of holders (one bit per instance, so a
lookup is one dict probe and one integer AND per block, and stops as soon as nobody is left),
bounded to `max_blocks` entries by least-recent store (evicting an entry only forgets a hit: the
index stays conservative). Holders are instance ids, or KV-store IPs for the Mooncake backend.

`ApproximateIndex` learns from the router's own decisions (what it sent where), with a TTL per
(block, instance) pair since that pair was last routed (Dynamo's `ApproxKvIndexer` assumes a
routed prefix cached for 120 s) and the same LRU bound. The KV-events backend is in
`kv_events.py`, the Mooncake metadata-service client in `mooncake.py`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Sequence
from itertools import repeat
from typing import Protocol

BlockKey = Hashable  # an engine block hash (int or bytes) or a KV-store key (str)


class KvIndex(Protocol):
    """A KV-cache index the router can ask synchronously."""

    def hit_lengths(self, block_hashes: Iterable[BlockKey]) -> dict[str, int]:
        """Per holder with a hit: its contiguous run of held blocks from the first block."""
        ...

    def advance(self, now: float) -> None:
        """Time moved to `now` (seconds); indexes with expiry drop what has expired."""
        ...


class BlockIndex:
    """Block hash -> holders bitmask, bounded by least-recent store.

    Args:
        max_blocks: most block entries kept; the least recently stored go first.
    """

    def __init__(self, max_blocks: int = 1_000_000) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        self.num_evictions = 0
        self._blocks: OrderedDict[BlockKey, int] = OrderedDict()
        self._bit: dict[str, int] = {}
        self._holder: list[str | None] = []
        self._sizes: list[int] = []

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def holders(self) -> list[str]:
        return [h for h in self._holder if h is not None]

    def size(self, holder: str) -> int:
        """Blocks `holder` holds (its "tree size")."""
        bit = self._bit.get(holder)
        return 0 if bit is None else self._sizes[bit]

    def holds(self, holder: str, key: BlockKey) -> bool:
        bit = self._bit.get(holder)
        return bit is not None and bool(self._blocks.get(key, 0) >> bit & 1)

    # ---- updates ---------------------------------------------------------------------------

    def store(self, holder: str, keys: Iterable[BlockKey]) -> None:
        """`holder` now holds `keys` (they become the most recently stored)."""
        bit = self._bit_of(holder)
        flag = 1 << bit
        blocks = self._blocks
        added = 0
        for key in keys:
            mask = blocks.get(key)
            if mask is None:
                blocks[key] = flag
                added += 1
            else:
                if not mask & flag:
                    blocks[key] = mask | flag
                    added += 1
                blocks.move_to_end(key)
        self._sizes[bit] += added
        while len(blocks) > self.max_blocks:
            _, mask = blocks.popitem(last=False)
            self._forget(mask)
            self.num_evictions += 1

    def remove(self, holder: str, keys: Iterable[BlockKey]) -> None:
        """`holder` no longer holds `keys` (unknown keys are ignored)."""
        bit = self._bit.get(holder)
        if bit is None:
            return
        flag, blocks = 1 << bit, self._blocks
        removed = 0
        for key in keys:
            mask = blocks.get(key, 0)
            if mask & flag:
                removed += 1
                if mask == flag:
                    del blocks[key]
                else:
                    blocks[key] = mask & ~flag
        self._sizes[bit] -= removed

    def clear(self, holder: str) -> None:
        """Forget everything `holder` holds (one pass over the index; a rare event)."""
        bit = self._bit.get(holder)
        if bit is None:
            return
        flag = 1 << bit
        blocks = self._blocks
        for key in [k for k, m in blocks.items() if m & flag]:
            mask = blocks[key] & ~flag
            if mask:
                blocks[key] = mask
            else:
                del blocks[key]
        self._sizes[bit] = 0

    def drop_holder(self, holder: str) -> None:
        """Forget `holder` entirely; its bit is reused by the next new holder."""
        if holder in self._bit:
            self.clear(holder)
            self._holder[self._bit.pop(holder)] = None

    def _bit_of(self, holder: str) -> int:
        bit = self._bit.get(holder)
        if bit is None:
            free = [i for i, h in enumerate(self._holder) if h is None]
            bit = free[0] if free else len(self._holder)
            if bit == len(self._holder):
                self._holder.append(holder)
                self._sizes.append(0)
            else:
                self._holder[bit] = holder
                self._sizes[bit] = 0
            self._bit[holder] = bit
        return bit

    def _forget(self, mask: int) -> None:
        while mask:
            low = mask & -mask
            self._sizes[low.bit_length() - 1] -= 1
            mask ^= low

    # ---- lookup ----------------------------------------------------------------------------

    def hit_lengths(self, block_hashes: Iterable[BlockKey]) -> dict[str, int]:
        return contiguous_hits(map(self._blocks.get, block_hashes, repeat(0)), self._holder)

    def advance(self, now: float) -> None:
        """Nothing expires here."""


def contiguous_hits(masks: Iterable[int], holders: Sequence[str | None]) -> dict[str, int]:
    """Per holder, the number of leading masks that have its bit (0s left out)."""
    hits: dict[str, int] = {}
    alive = -1
    i = 0
    for i, mask in enumerate(masks):
        kept = alive & mask
        if kept != alive:
            if i:
                _record(hits, holders, alive & ~mask, i)
            alive = kept
            if not alive:
                return hits
    else:
        if alive != -1:
            _record(hits, holders, alive, i + 1)
    return hits


def _record(hits: dict[str, int], holders: Sequence[str | None], bits: int, length: int
            ) -> None:
    while bits:
        low = bits & -bits
        holder = holders[low.bit_length() - 1]
        if holder is not None:
            hits[holder] = length
        bits ^= low


class ApproximateIndex(BlockIndex):
    """The router's own history: blocks it sent to each instance, held for `ttl_s`.

    Each (block, instance) pair expires `ttl_s` after the router last sent that block there; a
    block sent again refreshes only its pair with that instance. `ttl_s = inf` never expires
    (SGLang's and production-stack's trees, bounded only by size).
    """

    def __init__(self, ttl_s: float = 120.0, max_blocks: int = 1_000_000) -> None:
        super().__init__(max_blocks)
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.ttl_s = ttl_s
        self._last: dict[str, dict[BlockKey, float]] = {}  # holder -> block -> last routed
        self._queue: deque[tuple[float, float, str, tuple[BlockKey, ...]]] = deque()

    def record(self, holder: str, keys: Sequence[BlockKey], now: float) -> None:
        """The router sent a request with blocks `keys` to `holder` at `now`."""
        self.advance(now)
        keys = tuple(keys)
        if not keys:
            return
        self.store(holder, keys)
        if self.ttl_s == float("inf"):
            return
        last = self._last.setdefault(holder, {})
        for key in keys:
            last[key] = now
        self._queue.append((now + self.ttl_s, now, holder, keys))

    def advance(self, now: float) -> None:
        queue = self._queue
        while queue and queue[0][0] <= now:
            _, routed_at, holder, keys = queue.popleft()
            last = self._last.get(holder, {})
            stale = [k for k in keys if last.get(k) == routed_at]
            for key in stale:
                del last[key]
            self.remove(holder, stale)
