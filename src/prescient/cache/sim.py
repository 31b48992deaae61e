"""Cache-aware backends in the simulator, connected through existing seams.

A simulated cluster builds its policy from settings alone, so a cache-aware `load-balance`
starts with the router-history index (`ApproximateIndex`). `use_kv_events(sim)` switches it to
the engines' own truth: every simulated engine's block pool reports its stored and evicted
blocks (`BlockPool.listener`, vLLM's BlockStored / BlockRemoved) straight into one
`KvEventsIndex`, in virtual time, and the policy's hits come from that index, hashed as the
simulated engines hash (`SimHasher`). `use_mooncake(sim)` puts a simulated Mooncake metadata
service in between instead: chunk granularity (`--kvs-chunk-size`), outages in virtual time and
upstream's retry and down-window client.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prescient.cache.hashing import sim_block_hashes, sim_prompt_blocks
from prescient.cache.index import BlockIndex, BlockKey
from prescient.cache.kv_events import EngineListener, KvEventsIndex
from prescient.errors import ConfigError
from prescient.model import Request
from prescient.policy.cache_aware import IndexHits, PrefixHits, SimHasher

if TYPE_CHECKING:
    from prescient.sim.cluster import ClusterSim


def prefix_feature(sim: ClusterSim) -> PrefixHits:
    """The policy's cache-aware feature; `ConfigError` if the policy has none."""
    for feature in sim.policy.features:
        if isinstance(feature, PrefixHits):
            return feature
    raise ConfigError(f"policy {sim.policy.name!r} is not cache-aware "
                      "(use load-balance with --enable-cache-aware-scheduling)")


def use_kv_events(sim: ClusterSim, max_blocks: int = 10_000_000) -> KvEventsIndex:
    """Feed the policy's prefix hits from the simulated engines' block events."""
    feature = prefix_feature(sim)
    index = KvEventsIndex(max_blocks)
    for iid, engine in sim.engines.items():
        engine.pool.listener = index.listener(iid)
    feature.source = IndexHits(index, SimHasher())
    return index


class SimChunkHasher:
    """A request's KV-store chunks as the simulated engines name them: a chunk of
    `chunk_size` tokens is the engine's chain hash of the chunk's last block (the chain names
    the whole prefix up to it)."""

    def __init__(self, engine_block_size: int, chunk_size: int) -> None:
        if chunk_size % engine_block_size:
            raise ConfigError(f"--kvs-chunk-size {chunk_size} must be a multiple of the engines' "
                              f"block size {engine_block_size} in the simulator")
        self.engine_block_size = engine_block_size
        self.blocks_per_chunk = chunk_size // engine_block_size

    def hashes(self, request: Request, block_size: int) -> list[int]:
        bs = self.engine_block_size
        chain = sim_block_hashes(request, bs, sim_prompt_blocks(request, bs))
        return chain[self.blocks_per_chunk - 1::self.blocks_per_chunk]


class SimMooncakeService:
    """Mooncake's metadata service and upstream's client of it, in virtual time.

    The service knows which node holds each chunk (fed by the engines' block pools, so it is
    as exact as KV events, at chunk granularity); `outages` are `(start, end)` virtual-time
    intervals when it answers nothing. The client is upstream's: a query fails when every one
    of its `retry_times` attempts (`retry_interval_s` apart) falls in an outage, and then the
    service is skipped, answering "no hits" at once, for `down_duration_s`. The retries' delay
    is not added to the dispatch (the simulator decides at arrival).
    """

    def __init__(self, *, outages: Sequence[tuple[float, float]] = (), retry_times: int = 5,
                 retry_interval_s: float = 0.1, down_duration_s: float = 30.0,
                 max_blocks: int = 10_000_000) -> None:
        self.blocks = BlockIndex(max_blocks)
        self.outages = sorted(outages)
        self.retry_span_s = (retry_times - 1) * retry_interval_s
        self.down_duration_s = down_duration_s
        self.num_queries = self.num_failed = self.num_skipped = 0
        self._now = 0.0
        self._down_since: float | None = None

    def listener(self, instance_id: str) -> EngineListener:
        return EngineListener(self.blocks, instance_id)

    def advance(self, now: float) -> None:
        self._now = now

    def _out(self, t: float) -> bool:
        return any(start <= t < end for start, end in self.outages)

    def hit_lengths(self, block_hashes: Iterable[BlockKey]) -> dict[str, int]:
        now = self._now
        if self._down_since is not None:
            if now - self._down_since < self.down_duration_s:
                self.num_skipped += 1
                return {}
            self._down_since = None  # the window is over: ask again
        self.num_queries += 1
        if self._out(now) and self._out(now + self.retry_span_s):
            self.num_failed += 1
            self._down_since = now + self.retry_span_s
            return {}
        return self.blocks.hit_lengths(block_hashes)


def use_mooncake(sim: ClusterSim, outages: Sequence[tuple[float, float]] = ()
                 ) -> SimMooncakeService:
    """Feed the policy's prefix hits from a simulated Mooncake metadata service, with the
    scheduler's `--kvs-*` settings (chunk size, retries, down window)."""
    feature = prefix_feature(sim)
    s = sim.settings.scheduler
    service = SimMooncakeService(
        outages=outages, retry_times=s.kvs_retry_times,
        retry_interval_s=s.kvs_retry_interval_ms / 1000,
        down_duration_s=s.kvs_metadata_service_down_duration_s)
    sizes = {engine.config.block_size for engine in sim.engines.values()}
    if len(sizes) != 1:
        raise ConfigError("the simulated Mooncake service needs one block size on every engine")
    for iid, engine in sim.engines.items():
        engine.pool.listener = service.listener(iid)
    feature.source = IndexHits(service, SimChunkHasher(sizes.pop(), s.kvs_chunk_size),
                               block_size=s.kvs_chunk_size)
    return service


def use_cache_index(sim: ClusterSim) -> KvEventsIndex | SimMooncakeService | None:
    """The backend the scenario's `--cache-index` names, for a cache-aware policy: `kv-events`
    or `mooncake`; the router's history (`approximate`) and cache-blind policies get nothing."""
    s = sim.settings.scheduler
    if s.cache_index == "approximate" or not any(
            isinstance(f, PrefixHits) for f in sim.policy.features):
        return None
    if s.cache_index == "kv-events":
        return use_kv_events(sim, max_blocks=s.cache_index_max_blocks)
    return use_mooncake(sim)
