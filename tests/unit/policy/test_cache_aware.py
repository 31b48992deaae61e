"""Cache-aware dispatch: prefix hits rank first, the zero-hit fix, the account net of hits."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from prescient.cache.index import ApproximateIndex, BlockIndex
from prescient.model import InferType, InstanceMetadata, Request
from prescient.policy import make_dispatcher
from prescient.policy.cache_aware import (
    IndexHits,
    PrefetchedHits,
    PrefixHits,
    SimHasher,
    VllmHasher,
)
from prescient.policy.dispatcher import SchedulingMode
from prescient.policy.metrics import make_metric
from prescient.policy.selectors import MetricSelector

from .conftest import Settings, ctx_for, meta, state_of, status

BS = 16


@dataclass
class CacheSettings(Settings):
    enable_cache_aware_scheduling: bool = True
    cache_aware_scheduling_min_tokens: int = 0
    dispatch_prefill_cache_locality_metric: str = "cache_aware_all_prefills_tokens_num"
    cache_aware_load_requests: float = 64.0


def prompt(rid: str, n: int = 2000, base: int = 0) -> Request:
    return Request(request_id=rid, prompt_len=n, output_len=5,
                   prompt_token_ids=tuple(range(base, base + n)))


def two_instances(load0: int, load1: int):
    return state_of(
        (meta("i0"), status("i0", num_uncomputed_tokens_all_waiting_prefills=load0)),
        (meta("i1"), status("i1", num_uncomputed_tokens_all_waiting_prefills=load1)))


def cached_on(holder: str, req: Request) -> PrefixHits:
    index = BlockIndex()
    index.store(holder, SimHasher().hashes(req, BS))
    return PrefixHits(IndexHits(index, block_size=BS))


CACHE_FIRST = MetricSelector([make_metric("cache_aware_all_prefills_tokens_num"),
                              make_metric("all_prefills_tokens_num")])


def test_an_instance_without_hits_counts_the_whole_prompt_as_missed() -> None:
    req = prompt("r")
    ctx = ctx_for(two_instances(0, 100), req)
    cached_on("i1", req).prepare(ctx)
    # 124 full blocks of 16 (the last token is never served from cache): 1984 tokens
    assert ctx.prefix_hit_tokens.tolist() == [0, 1984]
    values = ctx.metric(make_metric("cache_aware_all_prefills_tokens_num")).tolist()
    assert values == [2000, 16 + 100]  # upstream scored i0 as 0 (fully cached): §11.2
    assert CACHE_FIRST.select(ctx, np.arange(2)) == 1


def test_load_still_outweighs_a_hit_worth_less_than_it() -> None:
    req = prompt("r")
    ctx = ctx_for(two_instances(0, 5000), req)
    cached_on("i1", req).prepare(ctx)
    assert CACHE_FIRST.select(ctx, np.arange(2)) == 0


def test_kv_cache_hit_len_prefers_the_longest_hit() -> None:
    req = prompt("r")
    ctx = ctx_for(two_instances(0, 5000), req)
    cached_on("i1", req).prepare(ctx)
    by_hit = MetricSelector([make_metric("kv_cache_hit_len"),
                             make_metric("all_prefills_tokens_num")])
    assert by_hit.select(ctx, np.arange(2)) == 1


def test_short_prompts_skip_cache_awareness() -> None:
    req = prompt("r", n=500)
    ctx = ctx_for(two_instances(0, 100), req)
    feature = cached_on("i1", req)
    feature.min_tokens = 1024
    feature.prepare(ctx)
    assert ctx.prefix_hit_tokens is None
    assert CACHE_FIRST.select(ctx, np.arange(2)) == 0


def cluster(settings: CacheSettings):
    d = make_dispatcher("load-balance", settings, random.Random(0))
    md = {i: InstanceMetadata(instance_id=i, block_size=BS) for i in ("i0", "i1")}
    d.on_instances(md, 0.0)
    d.on_statuses({i: status(i) for i in md}, 0.1)
    return d


def uncomputed(d, iid: str) -> float:
    return float(d.state.a("num_uncomputed_tokens_inflight_dispatch_prefill_requests")[
        d.state.row(iid)])


def test_router_history_sends_a_shared_prefix_back_and_charges_only_the_miss() -> None:
    d = cluster(CacheSettings())
    first = d.schedule(prompt("a"), 1.0).instance_id
    assert uncomputed(d, first) == 2000
    # another prompt lands elsewhere (the first instance is loaded now)
    other = d.schedule(prompt("b", base=50_000), 1.1).instance_id
    assert other != first
    # the follow-up shares a's 2000 tokens and adds 500: back to a's instance, where it misses
    # 2500 - 1984 tokens (124 cached blocks of 16), not to b's, where it would miss all 2500
    follow = Request(request_id="c", prompt_len=2500, output_len=5,
                     prompt_token_ids=tuple(range(2000)) + tuple(range(90_000, 90_500)))
    assert d.schedule(follow, 1.2).instance_id == first
    assert uncomputed(d, first) == 2000 + (2500 - 1984)


def test_without_cache_awareness_the_load_decides() -> None:
    d = cluster(CacheSettings(enable_cache_aware_scheduling=False))
    first = d.schedule(prompt("a"), 1.0).instance_id
    assert d.schedule(prompt("c"), 1.2).instance_id != first
    assert not any(isinstance(f, PrefixHits) for f in d.features)


def test_decode_legs_rank_by_load_only() -> None:
    d = make_dispatcher("load-balance", CacheSettings(), random.Random(0))
    md = {"p": InstanceMetadata(instance_id="p", instance_type=InferType.PREFILL, block_size=BS),
          "d0": InstanceMetadata(instance_id="d0", instance_type=InferType.DECODE),
          "d1": InstanceMetadata(instance_id="d1", instance_type=InferType.DECODE)}
    d.on_instances(md, 0.0)
    d.on_statuses({"p": status("p"), "d0": status("d0", num_used_gpu_tokens=9000),
                   "d1": status("d1")}, 0.1)
    decision = d.schedule(prompt("a"), 1.0, SchedulingMode.PD_BATCH)
    assert [p.instance_id for p in decision.placements] == ["p", "d1"]
    feature = next(f for f in d.features if isinstance(f, PrefixHits))
    index = feature.source.index  # type: ignore[attr-defined]
    assert isinstance(index, ApproximateIndex) and index.size("p") == index.size("d1") == 124


def test_holders_by_ip_map_to_every_instance_on_that_ip() -> None:
    req = prompt("r")
    index = BlockIndex()
    index.store("10.0.0.1", SimHasher().hashes(req, BS)[:10])
    state = state_of((InstanceMetadata(instance_id="a0", ip_kvs="10.0.0.1"), status("a0")),
                     (InstanceMetadata(instance_id="a1", ip_kvs="10.0.0.1"), status("a1")),
                     (InstanceMetadata(instance_id="b", ip_kvs="10.0.0.2"), status("b")))
    ctx = ctx_for(state, req)
    PrefixHits(IndexHits(index, block_size=BS, by_ip=True)).prepare(ctx)
    assert ctx.prefix_hit_tokens.tolist() == [160, 160, 0]


def test_prefetched_hits_come_from_the_async_lookup() -> None:
    source = PrefetchedHits(capacity=2)
    req = prompt("r")
    source.put("r", {"i1": 1024, "gone": 5})
    ctx = ctx_for(two_instances(0, 0), req)
    PrefixHits(source).prepare(ctx)
    assert ctx.prefix_hit_tokens.tolist() == [0, 1024]
    source.put("x", {})
    source.put("y", {})
    assert source.hits(req, ctx.state, 0.0) == {}  # bounded: the oldest went


def test_vllm_hasher_names_the_blocks_of_the_token_ids() -> None:
    from prescient.cache.hashing import external_block_hash, vllm_block_hashes

    req = prompt("r", n=40)
    expected = [external_block_hash(d) for d in vllm_block_hashes(list(range(39)), 16)]
    assert VllmHasher().hashes(req, 16) == expected and len(expected) == 2
    assert VllmHasher().hashes(Request(request_id="x", prompt_len=40), 16) == []


def test_a_missed_token_counts_the_miss_weight() -> None:
    req = prompt("r")
    ctx = ctx_for(two_instances(0, 100), req)
    feature = cached_on("i1", req)
    feature.miss_weight = 2.0
    feature.prepare(ctx)
    values = ctx.metric(make_metric("cache_aware_all_prefills_tokens_num")).tolist()
    assert values == [4000, 2 * 16 + 100]


def test_balance_guard_drops_only_instances_over_both_thresholds() -> None:
    from prescient.policy.filters import BalanceGuard

    state = state_of(*[(meta(f"i{k}"), status(f"i{k}", num_running_requests=n))
                       for k, n in enumerate([10, 80, 14, 200])])
    ctx = ctx_for(state)
    guard = BalanceGuard(make_metric("num_requests"), 64, 1.5)
    keep = guard.apply(ctx, np.ones(4, bool))
    # 80 is 70 over 10 and 8x: out; 14 is within 64; 200 is out
    assert keep.tolist() == [True, False, True, False]
    keep = guard.apply(ctx, np.array([False, True, False, True]))
    assert keep.tolist() == [False, True, False, False]  # least loaded candidate is 80 now


def test_cache_aware_pipeline_weighs_the_hit_before_the_load_limit() -> None:
    d = cluster(CacheSettings())
    first = d.schedule(prompt("a"), 1.0).instance_id
    d.release("a", 1.2)
    # the holder is over --dispatch-neutral-load-threshold (8192) with queued prefill tokens;
    # upstream's filter would drop it before the hit is weighed
    other = "i1" if first == "i0" else "i0"
    d.on_statuses({first: status(first, ts_ms=1500,
                                 num_uncomputed_tokens_all_waiting_prefills=8500),
                   other: status(other, ts_ms=1500,
                                 num_uncomputed_tokens_all_waiting_prefills=6500)}, 1.5)
    follow = Request(request_id="c", prompt_len=2500, output_len=5,
                     prompt_token_ids=tuple(range(2000)) + tuple(range(90_000, 90_500)))
    # a mean backlog of 7500 tokens makes a miss weigh 2 x (1 + 7500 / 4096) = 5.66:
    # costs: holder 5.66 x 516 + 8500 = 11421, the other 5.66 x 2500 + 6500 = 20650
    assert d.schedule(follow, 1.6).instance_id == first


def test_the_guard_overrides_affinity_when_the_holder_is_far_busier() -> None:
    d = cluster(CacheSettings())
    first = d.schedule(prompt("a"), 1.0).instance_id
    other = "i1" if first == "i0" else "i0"
    d.on_statuses({first: status(first, ts_ms=1500, num_running_requests=150),
                   other: status(other, ts_ms=1500, num_running_requests=20)}, 1.5)
    follow = Request(request_id="c", prompt_len=2500, output_len=5,
                     prompt_token_ids=tuple(range(2000)) + tuple(range(90_000, 90_500)))
    assert d.schedule(follow, 1.6).instance_id == other


def test_the_miss_weight_grows_with_the_mean_prefill_backlog() -> None:
    req = prompt("r")
    feature = cached_on("i1", req)
    feature.miss_weight, feature.backlog_tokens = 2.0, 4096.0
    idle = ctx_for(two_instances(0, 0), req)
    feature.prepare(idle)
    assert idle.prefix_miss_weight == 2.0
    busy = ctx_for(two_instances(4096, 12_288), req)  # 8192 queued per instance on average
    feature.prepare(busy)
    assert busy.prefix_miss_weight == 2.0 * (1 + 8192 / 4096)


def test_a_fixed_weight_without_a_backlog_scale() -> None:
    req = prompt("r")
    feature = cached_on("i1", req)
    feature.miss_weight = 2.0  # backlog_tokens defaults to inf
    ctx = ctx_for(two_instances(4096, 12_288), req)
    feature.prepare(ctx)
    assert ctx.prefix_miss_weight == 2.0


def test_under_a_backlog_the_holder_keeps_a_request_a_fixed_weight_would_move() -> None:
    # 2000-token prompt, 1984 tokens held by i1, whose queue is 8000 tokens longer than i0's
    req = prompt("r")
    fixed, growing = cached_on("i1", req), cached_on("i1", req)
    fixed.miss_weight = growing.miss_weight = 2.0
    growing.backlog_tokens = 4096.0
    picks = []
    for feature in (fixed, growing):
        ctx = ctx_for(two_instances(6000, 14_000), req)
        feature.prepare(ctx)
        picks.append(CACHE_FIRST.select(ctx, np.arange(2)))
    # fixed: 2 x 2000 + 6000 = 10000 < 2 x 16 + 14000; growing (mean 10000 queued, weight
    # 6.88): 6.88 x 2000 + 6000 = 19766 > 6.88 x 16 + 14000 = 14110
    assert picks == [0, 1]


def test_equal_costs_go_to_the_least_kv_usage_not_the_first_instance() -> None:
    d = make_dispatcher("load-balance", CacheSettings(), random.Random(0))
    md = {i: InstanceMetadata(instance_id=i, block_size=BS) for i in ("i0", "i1", "i2")}
    d.on_instances(md, 0.0)
    used = {"i0": 6000, "i1": 1000, "i2": 3000}
    d.on_statuses({i: status(i, num_used_gpu_tokens=used[i]) for i in md}, 0.1)
    # nothing cached, nothing queued: every instance costs the same
    assert d.schedule(prompt("a"), 1.0).instance_id == "i1"
