"""Cache-aware backends in the simulator, connected through existing seams.

A simulated cluster builds its policy from settings alone, so a cache-aware `load-balance`
starts with the router-history index (`ApproximateIndex`). `use_kv_events(sim)` switches it to
the engines' own truth: every simulated engine's block pool reports its stored and evicted
blocks (`BlockPool.listener`, vLLM's BlockStored / BlockRemoved) straight into one
`KvEventsIndex`, in virtual time, and the policy's hits come from that index, hashed as the
simulated engines hash (`SimHasher`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prescient.cache.kv_events import KvEventsIndex
from prescient.errors import ConfigError
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
