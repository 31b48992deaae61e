"""Peer routers' cache-aware policies, reproduced for side-by-side comparison.

Each learns cache contents as the peer does by default, from its own routing history (an
`ApproximateIndex` fed by its placements), except where noted, and reads the load signal the
peer reads: its own in-flight request counts, or engine metrics scraped every 50 ms
(`SCRAPE_INTERVAL_S`). Rules and defaults are from shared/reference/peers.md; the only
deliberate change is granularity: the peers match raw text (characters) or token blocks of
their own size, while here every index matches token blocks (`block_tokens`, noted per policy),
because simulated requests have no text.

- `sglang-cache-aware` (peers.md §2.4, SGLang model gateway `cache_aware`, Python CLI
  defaults): imbalanced iff `max_load - min_load > 64` and `max_load > 1.5 * min_load` (load:
  the router's in-flight requests per worker) -> the least loaded worker. Otherwise
  `match_rate = longest match / prompt`; above `0.3` -> the worker with the longest match, else
  the worker with the smallest tree (fewest indexed blocks; most free cache). The chosen
  worker's tree gets the prompt either way. Tree bound `max_tree_size = 2**26` characters
  (~1M blocks of 16 tokens at ~4 characters per token), no TTL. Matching at the engine's
  block size (SGLang matches characters).
- `sglang-lmetric` (peers.md §2.4): `(prompt - matched) * (load + 1)`, the least wins, load
  the router's in-flight requests. The same tree.
- `llm-d-prefix` (peers.md §2.3, the default chart's scheduling profile): `prefix-cache-scorer`
  weight 3 (`matched blocks / prompt blocks`, `matchLengthWeight` 0), `queue-scorer` weight 2
  (`(maxQ - q) / (maxQ - minQ)`, 1 when all equal), `kv-cache-utilization-scorer` weight 2
  (`1 - usage`); max score, random tie-break. Approximate prefix producer: 64-token blocks, an
  LRU of 31,250 blocks per pod (here one bound of 31,250 x 16 blocks), no TTL.
- `dynamo-kv` (peers.md §2.5, `router-concepts.md` cost):
  `cost = prefill_load_scale * max(active_prefill_blocks + prompt_blocks - overlap_blocks, 0)
  + active_decode_blocks + prompt_blocks`, scale 1, the least wins, random tie-break. Dynamo
  tracks active blocks in its router; here they come from the scraped engine status (prefill:
  uncomputed waiting and running prefill tokens; decode: KV blocks in use). Cache knowledge:
  `--no-kv-events` mode (`ApproxKvIndexer`, TTL 120 s) at the engine's block size;
  `prescient.cache.sim.use_kv_events` switches it to KV events, Dynamo's default.
- `production-stack-prefixaware` (peers.md §2.1): the longest match among endpoints, ties at
  random (so no match at all is a uniform random pick); no load term, no eviction
  (`--prefix-min-match-length` 0). Matching 32-token blocks (it hashes 128-character chunks).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from prescient.cache.index import ApproximateIndex
from prescient.model import InferType
from prescient.policy.cache_aware import IndexHits, PrefixHits
from prescient.policy.dispatcher import Dispatcher
from prescient.policy.framework import Pipeline, SchedulingContext, Selector
from prescient.policy.peers import SCRAPE_INTERVAL_S, WeightedScorePicker, _kv_usage, _queue_score

ENGINE_BLOCK = None  # IndexHits reads the instances' block size from their metadata
SGLANG_MAX_BLOCKS = 2**26 // 4 // 16
LLMD_BLOCK_TOKENS = 64
LLMD_BLOCKS_PER_POD = 31_250
PRODUCTION_STACK_BLOCK_TOKENS = 32
DYNAMO_APPROX_TTL_S = 120.0


def _hits(ctx: SchedulingContext, rows: np.ndarray) -> np.ndarray:
    hits = ctx.prefix_hit_tokens
    return np.zeros(len(rows)) if hits is None else hits[rows]


def _in_flight(ctx: SchedulingContext, rows: np.ndarray) -> np.ndarray:
    return ctx.state.lite[rows, 0]


def _random_min(ctx: SchedulingContext, rows: np.ndarray, values: np.ndarray) -> int:
    best = np.flatnonzero(values == values.min())
    return int(rows[best[ctx.rng.randrange(len(best))]])


class SglangCacheAware:
    """SGLang's `cache_aware`: balance thresholds, match-rate threshold, smallest tree."""

    def __init__(self, index: ApproximateIndex, cache_threshold: float = 0.3,
                 balance_abs_threshold: float = 64, balance_rel_threshold: float = 1.5) -> None:
        self.index = index
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        load = _in_flight(ctx, rows)
        lo, hi = load.min(), load.max()
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            return int(rows[np.argmin(load)])
        hits = _hits(ctx, rows)
        if hits.max() / ctx.request.prompt_len > self.cache_threshold:
            return int(rows[np.argmax(hits)])
        ids = ctx.state.ids
        sizes = np.array([self.index.size(ids[r]) for r in rows])
        return int(rows[np.argmin(sizes)])


class SglangLmetric:
    """SGLang's `lmetric`: new prefill work times (load + 1), the least wins."""

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        work = ctx.request.prompt_len - _hits(ctx, rows)
        return int(rows[np.argmin(work * (_in_flight(ctx, rows) + 1))])


class DynamoKvCost:
    """Dynamo's KV router cost in blocks; the least wins, ties at random."""

    def __init__(self, prefill_load_scale: float = 1.0) -> None:
        self.prefill_load_scale = prefill_load_scale

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        st = ctx.state
        bs = np.array([max(st.metadata[r].block_size, 1) for r in rows], float)
        active_prefill = (st.s("num_uncomputed_tokens_all_waiting_prefills")[rows]
                          + st.s("num_uncomputed_tokens_scheduler_running_prefills")[rows]) / bs
        prompt = np.ceil(ctx.request.prompt_len / bs)
        overlap = np.floor(_hits(ctx, rows) / bs)
        prefill = np.maximum(active_prefill + prompt - overlap, 0)
        decode = st.s("num_used_gpu_tokens")[rows] / bs + prompt
        return _random_min(ctx, rows, self.prefill_load_scale * prefill + decode)


class LongestPrefix:
    """production-stack `prefixaware`: the longest match, ties at random, no load term."""

    def select(self, ctx: SchedulingContext, rows: np.ndarray) -> int:
        return _random_min(ctx, rows, -_hits(ctx, rows))


def _llmd_prefix_score(ctx: SchedulingContext, rows: np.ndarray) -> np.ndarray:
    return _hits(ctx, rows) / ctx.request.prompt_len


def _cache_peer(name: str, make: Callable[[ApproximateIndex], Selector], *, needs_status: bool,
                index: Callable[[], ApproximateIndex], block_tokens: int | None
                ) -> Callable[[object, random.Random], Dispatcher]:
    def factory(settings: object, rng: random.Random) -> Dispatcher:
        idx = index()
        feature = PrefixHits(IndexHits(idx, block_size=block_tokens))
        pipelines = {t: Pipeline([], make(idx)) for t in InferType}
        # as for the load-only peers: "full mode" means the policy reads a scraped status;
        # otherwise it keeps its own in-flight counts (the lite state)
        dispatcher = Dispatcher(name, pipelines, rng, full_mode=needs_status,
                                features=[feature], observers=[feature])
        dispatcher.scrape_interval_s = SCRAPE_INTERVAL_S
        return dispatcher

    return factory


CACHE_PEER_POLICIES = {
    "sglang-cache-aware": _cache_peer(
        "sglang-cache-aware", SglangCacheAware, needs_status=False,
        index=lambda: ApproximateIndex(float("inf"), SGLANG_MAX_BLOCKS), block_tokens=ENGINE_BLOCK),
    "sglang-lmetric": _cache_peer(
        "sglang-lmetric", lambda _: SglangLmetric(), needs_status=False,
        index=lambda: ApproximateIndex(float("inf"), SGLANG_MAX_BLOCKS), block_tokens=ENGINE_BLOCK),
    "llm-d-prefix": _cache_peer(
        "llm-d-prefix", lambda _: WeightedScorePicker([
            (3.0, _llmd_prefix_score), (2.0, _queue_score),
            (2.0, lambda ctx, rows: 1.0 - _kv_usage(ctx)[rows])]),
        needs_status=True, index=lambda: ApproximateIndex(float("inf"), LLMD_BLOCKS_PER_POD * 16),
        block_tokens=LLMD_BLOCK_TOKENS),
    "dynamo-kv": _cache_peer(
        "dynamo-kv", lambda _: DynamoKvCost(), needs_status=True,
        index=lambda: ApproximateIndex(DYNAMO_APPROX_TTL_S, 10_000_000), block_tokens=ENGINE_BLOCK),
    "production-stack-prefixaware": _cache_peer(
        "production-stack-prefixaware", lambda _: LongestPrefix(), needs_status=False,
        index=lambda: ApproximateIndex(float("inf"), 100_000_000),
        block_tokens=PRODUCTION_STACK_BLOCK_TOKENS),
}
