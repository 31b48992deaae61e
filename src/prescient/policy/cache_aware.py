"""Cache-aware scheduling as a dispatcher feature: per-instance prefix hits for each request.

`PrefixHits.prepare` fills `ctx.prefix_hit_tokens` (prompt tokens each instance already holds,
contiguously from the first token) for prompts of at least `min_tokens`
(`--cache-aware-scheduling-min-tokens`); the metrics `kv_cache_hit_len` and
`cache_aware_all_prefills_tokens_num` read it, and the dispatcher's local account charges the
chosen instance only the tokens it must compute (`prompt - hit`). Shorter prompts leave the
column unset: no hit anywhere, the whole prompt is a miss everywhere, so the load metric decides.

Four deliberate departures from upstream's cost, all settings (upstream: weight 1, no load
factor, no guard, ties to the first instance), chosen by bench/cache_aware.py:

- A missed token counts `miss_weight` (2) queued tokens, times `1 + backlog / backlog_tokens`
  (4096) where `backlog` is the mean prefill tokens queued per instance. The request waits
  for its own miss as for the queue ahead of it, but the miss also spends cluster capacity
  again (the prefix is recomputed and now cached twice) and, on multi-turn traffic, moves the
  session's history away from where its next turn would hit. With weight 1 a momentary queue
  on the instance holding a session drives the session elsewhere. What the recomputation
  costs others grows with the backlog: on an idle cluster it delays nobody, on a backlogged
  one it delays every queued request. A fixed weight of 2 moved sessions off queues near
  saturation, which fed the queues (bench/cache_aware.py, sessions at 4.25x: 61% prefix hits
  and 60% SLO attainment with the fixed weight, 75% and 94% with the growing one).
- On each instance the miss weight is also multiplied by `1 + num_requests / load_requests`
  (64, `--cache-aware-load-requests`): the miss's prefill stalls the decode steps of every
  request in flight there (SGLang's `lmetric`: `miss x (in-flight + 1)`). Ranking by prefill
  work alone, holders of popular prefixes kept their requests until their queues were
  `w x prefix` tokens longer than others', short enough for TTFT but long enough prefill
  streams to push their decodes past TPOT (bench/cache_aware.py, Mooncake-format workload at
  8.5x: 54% SLO attainment without the factor, 94% with it, TPOT misses 2,258 -> 215). The
  factor scales the miss, not the queue: a session's next turn (a small miss on its holder)
  stays put on a busier holder unless the load gap outgrows its history.
- The prefill / neutral pipelines drop instances whose in-flight requests exceed the least
  loaded one's by 64 and by 1.5x (`filters.BalanceGuard`, SGLang's imbalance rule): prefix
  affinity alone ignores decode load and would pile a popular prefix's requests onto one
  instance.
- Equal costs (e.g. a new prompt on idle instances) fall to the least
  `kv_cache_usage_ratio_projected`, not to the lowest instance id, which would collect every
  new session of a quiet spell and their later turns with them.

Where the hits come from is a `HitSource`:

- `IndexHits(index, hasher)`: hash the request's blocks and ask a synchronous `KvIndex`
  (`ApproximateIndex`: the router's history, which `on_placed` feeds; `KvEventsIndex`: the
  engines' KV events). Holders are instance ids, or KV-store IPs mapped to instances through
  the metadata's `ip_kvs` when `by_ip` (all DP ranks on that IP hit).
- `PrefetchedHits`: hits an async caller looked up before scheduling (the Mooncake metadata
  service is a network call; the core never does I/O), stored by request id.

Hashers name blocks as the engines do: `SimHasher` as the simulated engine, `VllmHasher` as a
vLLM engine's prefix cache and KV events (`prescient.cache.hashing`). The block size is the
instances' `block_size` from their metadata unless fixed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np

from prescient.cache.hashing import (
    HashMemo,
    VllmHashAlgo,
    external_block_hash,
    iter_vllm_block_hashes,
    sim_block_hashes,
    sim_prompt_blocks,
)
from prescient.cache.index import ApproximateIndex, BlockKey, KvIndex
from prescient.cms.view import ProfilingSample
from prescient.model import Request
from prescient.policy.framework import SchedulingContext
from prescient.policy.metrics import make_metric, queued_prefill_tokens
from prescient.policy.state import ClusterState

DEFAULT_BLOCK_SIZE = 16  # vLLM's default, used when metadata gives none


class BlockHasher(Protocol):
    """A request's prompt blocks as its engine names them (full blocks only)."""

    def hashes(self, request: Request, block_size: int) -> Sequence[BlockKey]: ...


class SimHasher:
    """The simulated engine's chain over the blocks it could find cached."""

    def hashes(self, request: Request, block_size: int) -> list[int]:
        return sim_block_hashes(request, block_size, sim_prompt_blocks(request, block_size))


class VllmHasher:
    """vLLM's block hashes of the prompt token ids, as its KV events publish them.

    `as_int` gives the 64-bit ints of `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1` (the default);
    `seed` is the engines' `PYTHONHASHSEED`. A request without token ids has no blocks.
    """

    def __init__(self, algo: VllmHashAlgo = "sha256_cbor", seed: str = "0",
                 as_int: bool = True, memo: HashMemo | None = None) -> None:
        self.algo = algo
        self.seed = seed
        self.as_int = as_int
        self.memo = memo  # digests of blocks seen before (see `iter_vllm_block_hashes`)

    def hashes(self, request: Request, block_size: int) -> list[BlockKey]:
        return list(self.iter_hashes(request, block_size))

    def iter_hashes(self, request: Request, block_size: int) -> Iterator[BlockKey]:
        """The same, block by block: a lookup stops hashing where nobody holds the prefix."""
        if request.prompt_token_ids is None:
            return iter(())
        # the engine never serves the last prompt token from cache
        digests = iter_vllm_block_hashes(request.prompt_token_ids, block_size, algo=self.algo,
                                         seed=self.seed, length=request.prompt_len - 1,
                                         memo=self.memo)
        return map(external_block_hash, digests) if self.as_int else digests


class HitSource(Protocol):
    """Prompt tokens each instance holds for `request` (instances without hits left out)."""

    def hits(self, request: Request, state: ClusterState, now: float) -> Mapping[str, int]: ...

    def on_placed(self, request: Request, instance_id: str, state: ClusterState, now: float
                  ) -> None: ...


class IndexHits:
    """Hits from a synchronous `KvIndex`; feeds it placements when it learns from routing.

    Args:
        index: the index to ask.
        hasher: names the request's blocks.
        block_size: tokens per block; None: `learned_block_size()` when it says (e.g. the
            engines' BlockStored events), else the first instance's metadata.
        by_ip: the index's holders are `ip_kvs` addresses, not instance ids.
        lazy: hash block by block during the lookup (a hasher with `iter_hashes`; the index
            must not learn from placements), so a prompt costs its hit length to hash.
    """

    def __init__(self, index: KvIndex, hasher: BlockHasher | None = None, *,
                 block_size: int | None = None, by_ip: bool = False, lazy: bool = False,
                 learned_block_size: Callable[[], int] | None = None) -> None:
        self.index = index
        self.hasher = hasher or SimHasher()
        self.block_size = block_size
        self.by_ip = by_ip
        self.learned_block_size = learned_block_size
        self._lazy = getattr(self.hasher, "iter_hashes", None) if lazy else None
        if lazy and (self._lazy is None or isinstance(index, ApproximateIndex)):
            raise ValueError("lazy hashing needs a hasher with iter_hashes and an index that "
                             "does not learn from placements")
        self._memo: tuple[str, int, Sequence[BlockKey]] | None = None
        self._sizes: tuple[object, int] = (None, DEFAULT_BLOCK_SIZE)  # (metadata list, size)

    def hits(self, request: Request, state: ClusterState, now: float) -> dict[str, int]:
        self.index.advance(now)
        bs = self._block_size(state)
        hashes = (self._lazy(request, bs) if self._lazy is not None
                  else self._hashes(request, bs))
        blocks = self.index.hit_lengths(hashes)
        if self.by_ip:
            blocks = {md.instance_id: blocks[md.ip_kvs]
                      for md in state.metadata if md.ip_kvs in blocks}
        cap = request.prompt_len
        return {iid: min(n * bs, cap) for iid, n in blocks.items()}

    def on_placed(self, request: Request, instance_id: str, state: ClusterState, now: float
                  ) -> None:
        if isinstance(self.index, ApproximateIndex):
            hashes = self._hashes(request, self._block_size(state))
            self.index.record(instance_id, hashes, now)

    def _block_size(self, state: ClusterState) -> int:
        if self.block_size:
            return self.block_size
        if self.learned_block_size is not None and (learned := self.learned_block_size()):
            return learned
        if self._sizes[0] is not state.metadata:  # a new list whenever the instance set changes
            sizes = [md.block_size for md in state.metadata if md.block_size]
            self._sizes = (state.metadata, sizes[0] if sizes else DEFAULT_BLOCK_SIZE)
        return self._sizes[1]

    def _hashes(self, request: Request, block_size: int) -> Sequence[BlockKey]:
        """The request's hashes, computed once per request (its legs and its placement)."""
        memo = self._memo
        if memo is not None and memo[0] == request.request_id and memo[1] == block_size:
            return memo[2]
        hashes = self.hasher.hashes(request, block_size)
        self._memo = (request.request_id, block_size, hashes)
        return hashes


class PrefetchedHits:
    """Hits an async caller looked up before scheduling, by request id (bounded)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._hits: OrderedDict[str, Mapping[str, int]] = OrderedDict()

    def put(self, request_id: str, hits: Mapping[str, int]) -> None:
        self._hits[request_id] = hits
        self._hits.move_to_end(request_id)
        while len(self._hits) > self.capacity:
            self._hits.popitem(last=False)

    def hits(self, request: Request, state: ClusterState, now: float) -> Mapping[str, int]:
        return self._hits.get(request.request_id, {})

    def on_placed(self, request: Request, instance_id: str, state: ClusterState, now: float
                  ) -> None:
        """Kept: a PD request's second leg is placed after its first."""


class PrefixHits:
    """The cache-aware feature: fills `ctx.prefix_hit_tokens` from a `HitSource`.

    A missed prompt token counts `miss_weight x (1 + backlog / backlog_tokens)` queued ones in
    `cache_aware_all_prefills_tokens_num`, the backlog being the mean prefill tokens queued
    per instance (upstream: 1; `backlog_tokens` inf: a fixed `miss_weight`), times
    `1 + load / load_requests` on each instance, `load` its in-flight requests (`load_metric`;
    `load_requests` inf: the same weight everywhere, a scalar).
    """

    def __init__(self, source: HitSource, min_tokens: int = 0, miss_weight: float = 1.0,
                 backlog_tokens: float = float("inf"), load_requests: float = float("inf"),
                 load_metric: str = "num_requests") -> None:
        if backlog_tokens <= 0:
            raise ValueError("backlog_tokens must be > 0")
        if load_requests <= 0:
            raise ValueError("load_requests must be > 0")
        self.source = source
        self.min_tokens = min_tokens
        self.miss_weight = miss_weight
        self.backlog_tokens = backlog_tokens
        self.load_requests = load_requests
        self.load_metric = make_metric(load_metric)

    def weight(self, state: ClusterState) -> float:
        """What one missed token counts now against a queued one."""
        if not len(state) or self.backlog_tokens == float("inf"):
            return self.miss_weight
        # the raw queues: a prediction feature may not have run yet, and the backlog is the
        # cluster's, not this request's view of it
        backlog = float(np.maximum(queued_prefill_tokens(state), 0.0).mean())
        return self.miss_weight * (1.0 + backlog / self.backlog_tokens)

    def prepare(self, ctx: SchedulingContext) -> None:
        request, state = ctx.request, ctx.state
        if request.prompt_len < self.min_tokens:
            return
        column = np.zeros(len(state))
        for iid, tokens in self.source.hits(request, state, ctx.now).items():
            row = state.row(iid)
            if row is not None:
                column[row] = tokens
        ctx.prefix_hit_tokens = column
        weight = self.weight(state)
        if self.load_requests != float("inf"):
            # the miss's prefill time stalls every request on the instance (its decodes, and
            # the queued prefills' later decodes), so it costs more where more are in flight
            load = np.maximum(ctx.metric(self.load_metric), 0.0)
            ctx.prefix_miss_weight = weight * (1.0 + load / self.load_requests)
        else:
            ctx.prefix_miss_weight = weight

    def on_statuses(self, state: ClusterState, samples: Sequence[ProfilingSample], now: float
                    ) -> None:
        """Statuses carry no cache content."""

    def on_placed(self, request: Request, instance_id: str, state: ClusterState, now: float
                  ) -> None:
        self.source.on_placed(request, instance_id, state, now)
