"""The peers' cache-aware routers: each one's rule, checked on hand-made hit and load columns."""

from __future__ import annotations

import random

import numpy as np
import pytest

from prescient.cache.index import ApproximateIndex
from prescient.model import InstanceMetadata, Request
from prescient.policy import make_dispatcher
from prescient.policy.cache_peers import (
    CACHE_PEER_POLICIES,
    DynamoKvCost,
    LongestPrefix,
    SglangCacheAware,
    SglangLmetric,
    _llmd_prefix_score,
)

from .conftest import Settings, ctx_for, state_of, status


def ctx_with(hits: list[float], in_flight: list[int] | None = None, prompt: int = 1000,
             seed: int = 0, **columns: list[int]):
    n = len(hits)
    state = state_of(*[(InstanceMetadata(instance_id=f"i{k}", block_size=16),
                        status(f"i{k}", **{f: v[k] for f, v in columns.items()}))
                       for k in range(n)])
    if in_flight is not None:
        for row, count in enumerate(in_flight):
            state.set_lite(row, count, 0)
    ctx = ctx_for(state, Request(request_id="r", prompt_len=prompt), seed=seed)
    ctx.prefix_hit_tokens = np.array(hits, float)
    return ctx


ROWS3 = np.arange(3)


def test_sglang_goes_to_the_longest_match_above_the_cache_threshold() -> None:
    index = ApproximateIndex(float("inf"))
    index.store("i0", range(100))  # the biggest tree
    ctx = ctx_with([0, 400, 310], in_flight=[0, 5, 3])
    assert SglangCacheAware(index).select(ctx, ROWS3) == 1


def test_sglang_goes_to_the_smallest_tree_below_the_cache_threshold() -> None:
    index = ApproximateIndex(float("inf"))
    index.store("i0", range(100))
    index.store("i1", range(10))
    index.store("i2", range(50))
    ctx = ctx_with([0, 300, 0], in_flight=[0, 0, 0])  # match rate 0.3 is not above 0.3
    assert SglangCacheAware(index).select(ctx, ROWS3) == 1
    index.store("i1", range(10, 100))
    assert SglangCacheAware(index).select(ctx, ROWS3) == 2


def test_sglang_balances_when_both_thresholds_say_imbalanced() -> None:
    index = ApproximateIndex(float("inf"))
    # 70 apart and 71 > 1.5 x 1: imbalanced -> the least loaded, whatever the cache says
    assert SglangCacheAware(index).select(ctx_with([1000, 0, 0], [71, 1, 30]), ROWS3) == 1
    # 80 apart but 280 <= 1.5 x 200: balanced -> the cache decides
    assert SglangCacheAware(index).select(ctx_with([1000, 0, 0], [280, 200, 230]), ROWS3) == 0


def test_lmetric_multiplies_new_prefill_work_by_load_plus_one() -> None:
    # (1000-900)*(9+1)=1000, (1000-0)*(0+1)=1000, (1000-500)*(1+1)=1000 -> tie -> first
    ctx = ctx_with([900, 0, 500], [9, 0, 1])
    assert SglangLmetric().select(ctx, ROWS3) == 0
    ctx = ctx_with([900, 0, 500], [9, 0, 0])  # 1000, 1000, 500
    assert SglangLmetric().select(ctx, ROWS3) == 2


def test_dynamo_cost_is_prefill_blocks_net_of_overlap_plus_decode_blocks() -> None:
    # prompt 1600 tokens = 100 blocks of 16
    ctx = ctx_with([1600, 0, 800], prompt=1600,
                   num_uncomputed_tokens_all_waiting_prefills=[3200, 0, 0],
                   num_used_gpu_tokens=[0, 0, 1600])
    # i0: max(200+100-100,0)=200 + 0+100 = 300; i1: 100 + 100 = 200; i2: 50 + 100+100 = 250
    assert DynamoKvCost().select(ctx, ROWS3) == 1


def test_production_stack_takes_the_longest_match_and_breaks_ties_at_random() -> None:
    assert LongestPrefix().select(ctx_with([10, 500, 20]), ROWS3) == 1
    picks = {LongestPrefix().select(ctx_with([0, 0, 0], seed=s), ROWS3) for s in range(30)}
    assert picks == {0, 1, 2}


def test_llm_d_prefix_score_is_the_matched_fraction() -> None:
    ctx = ctx_with([0, 250, 1000])
    assert _llmd_prefix_score(ctx, ROWS3).tolist() == [0.0, 0.25, 1.0]


@pytest.mark.parametrize("name", sorted(CACHE_PEER_POLICIES))
def test_each_peer_learns_from_its_own_routing(name: str) -> None:
    d = make_dispatcher(name, Settings(), random.Random(0))
    md = {f"i{k}": InstanceMetadata(instance_id=f"i{k}", block_size=16) for k in range(4)}
    d.on_instances(md, 0.0)
    d.on_statuses({i: status(i) for i in md}, 0.05)
    tokens = tuple(range(4000))
    first = d.schedule(Request(request_id="a", prompt_len=4000, prompt_token_ids=tokens),
                       1.0).instance_id
    d.release("a", 1.5)
    again = Request(request_id="b", prompt_len=4100, prompt_token_ids=tokens + (7,) * 100)
    assert d.schedule(again, 2.0).instance_id == first
