"""The cache-aware cost's load factor: a miss weighs more where more requests are in flight."""

from __future__ import annotations

import random

import numpy as np

from prescient.cache.index import BlockIndex
from prescient.model import InstanceMetadata, Request
from prescient.policy import make_dispatcher
from prescient.policy.cache_aware import IndexHits, PrefixHits, SimHasher
from prescient.policy.metrics import make_metric
from prescient.policy.selectors import MetricSelector

from .conftest import ctx_for, meta, state_of, status
from .test_cache_aware import BS, CACHE_FIRST, CacheSettings, prompt

COST = make_metric("cache_aware_all_prefills_tokens_num")


def loaded(*instances: tuple[int, int]):
    """Instances i0, i1, ... with (in-flight requests, queued prefill tokens) each."""
    return state_of(*[(meta(f"i{k}"), status(f"i{k}", num_running_requests=n,
                                             num_uncomputed_tokens_all_waiting_prefills=q))
                      for k, (n, q) in enumerate(instances)])


def feature(load_requests: float, holder: str | None = None, req: Request | None = None,
            blocks: int | None = None) -> PrefixHits:
    index = BlockIndex()
    if holder is not None and req is not None:
        index.store(holder, SimHasher().hashes(req, BS)[:blocks])
    return PrefixHits(IndexHits(index, block_size=BS), miss_weight=2.0,
                      load_requests=load_requests)


def test_the_weight_scales_each_instances_miss_by_its_in_flight_requests() -> None:
    req = prompt("r")
    ctx = ctx_for(loaded((0, 0), (8, 0), (24, 0)), req)
    feature(8.0).prepare(ctx)
    assert ctx.prefix_miss_weight.tolist() == [2.0, 4.0, 8.0]
    assert ctx.metric(COST).tolist() == [4000, 8000, 16000]


def test_without_a_load_scale_the_weight_is_one_number() -> None:
    req = prompt("r")
    ctx = ctx_for(loaded((0, 0), (24, 0)), req)
    feature(float("inf")).prepare(ctx)
    assert ctx.prefix_miss_weight == 2.0


def test_a_prompt_nobody_holds_goes_to_the_fewest_in_flight_at_equal_queues() -> None:
    req = prompt("r")
    ctx = ctx_for(loaded((30, 1000), (10, 1000), (20, 1000)), req)
    feature(4.0).prepare(ctx)
    assert CACHE_FIRST.select(ctx, np.arange(3)) == 1


def test_the_load_factor_outweighs_a_shorter_queue_on_a_crowded_instance() -> None:
    # i0: an empty prefill queue but 40 requests decoding; i1: 1000 queued tokens, 4 requests.
    # Prefill work alone picks i0 (4000 < 5000); the factor charges i0's 40 stalled requests:
    # 2 x (1 + 40/8) x 2000 = 24000 against 2 x (1 + 4/8) x 2000 + 1000 = 7000
    req = prompt("r")
    picks = []
    for scale in (float("inf"), 8.0):
        ctx = ctx_for(loaded((40, 0), (4, 1000)), req)
        feature(scale).prepare(ctx)
        picks.append(CACHE_FIRST.select(ctx, np.arange(2)))
    assert picks == [0, 1]


def test_a_long_hit_keeps_its_request_on_a_busier_holder() -> None:
    # a session's next turn: i0 holds 1984 of its 2000 tokens and runs 3x the requests of i1;
    # its miss (16 tokens) is so small that no load factor outweighs the 2000-token recompute
    req = prompt("r")
    ctx = ctx_for(loaded((60, 0), (20, 0)), req)
    feature(4.0, "i0", req).prepare(ctx)
    costs = ctx.metric(COST)
    assert costs[0] < costs[1]  # 2 x 16 x 16 = 512 vs 2 x 6 x 2000 = 24000
    assert CACHE_FIRST.select(ctx, np.arange(2)) == 0


def test_a_short_hit_on_a_crowded_holder_moves_like_lmetric() -> None:
    # i0 holds the first 1008 tokens (63 blocks): it misses 992 where i1 misses 2000. With a
    # load scale of 1 the choice is lmetric's, miss x (load + 1): 992 x 61 > 2000 x 21
    req = prompt("r")
    ctx = ctx_for(loaded((60, 0), (20, 0)), req)
    feature(1.0, "i0", req, blocks=63).prepare(ctx)
    assert ctx.prefix_hit_tokens.tolist() == [1008, 0]
    assert CACHE_FIRST.select(ctx, np.arange(2)) == 1
    even = ctx_for(loaded((20, 0), (20, 0)), req)  # at equal load the hit decides
    feature(1.0, "i0", req, blocks=63).prepare(even)
    assert CACHE_FIRST.select(even, np.arange(2)) == 0


def test_the_flag_reaches_the_dispatcher() -> None:
    picks = []
    for scale in (float("inf"), 2.0):
        d = make_dispatcher("load-balance", CacheSettings(cache_aware_load_requests=scale),
                            random.Random(0))
        assert next(f for f in d.features if isinstance(f, PrefixHits)).load_requests == scale
        md = {i: InstanceMetadata(instance_id=i, block_size=BS) for i in ("i0", "i1")}
        d.on_instances(md, 0.0)
        d.on_statuses({"i0": status("i0", num_running_requests=10),
                       "i1": status("i1", num_uncomputed_tokens_all_waiting_prefills=1500)}, 0.1)
        picks.append(d.schedule(prompt("a"), 1.0).instance_id)
    # prefill work: i0 4000 < i1 5500; with the factor i0 costs 2 x (1 + 10/2) x 2000 = 24000
    assert picks == ["i0", "i1"]


def test_the_load_metric_is_the_balance_guards_in_flight_count() -> None:
    f = feature(8.0)
    assert f.load_metric.name == "num_requests"
    assert MetricSelector([f.load_metric]).select(ctx_for(loaded((5, 0), (3, 0))),
                                                  np.arange(2)) == 1
