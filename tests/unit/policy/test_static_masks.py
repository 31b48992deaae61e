"""The pipeline keeps its static filters' mask per state version and clock: never a different
answer from computing every filter on every call."""

from __future__ import annotations

import random

import numpy as np

from prescient.model import InferType
from prescient.policy.filters import Failover, Fresh, MetricThreshold, OfInferType, Schedulable
from prescient.policy.framework import Pipeline, SchedulingContext
from prescient.policy.metrics import make_metric
from prescient.policy.selectors import MetricSelector

from .conftest import meta, request, state_of, status

LOAD = make_metric("all_prefills_tokens_num")


def pipelines() -> tuple[Pipeline, Pipeline]:
    """The same filters twice: one pipeline caches, the other cannot (a non-static global)."""
    class Uncached(Failover):
        static = False

    def make(failover: Failover) -> Pipeline:
        return Pipeline([Schedulable(), Fresh(60.0), OfInferType(InferType.NEUTRAL),
                         MetricThreshold(LOAD, 500.0, soft=True)],
                        MetricSelector([LOAD]), [failover])
    return make(Failover("node")), make(Uncached("node"))


def test_cached_masks_equal_fresh_computation_over_random_states_and_clocks() -> None:
    rng = random.Random(7)
    cached, plain = pipelines()
    assert cached._static and not plain._static
    for trial in range(200):
        pairs = []
        for i in range(rng.randint(1, 6)):
            kind = rng.choice([InferType.NEUTRAL, InferType.PREFILL])
            st = None if rng.random() < 0.15 else status(
                f"i{i}", ts_ms=rng.choice([1_000, 30_000, 90_000]),
                schedulable=rng.random() < 0.8,
                num_uncomputed_tokens_all_waiting_prefills=rng.choice([0, 300, 900]))
            pairs.append((meta(f"i{i}", kind, node=str(rng.randint(0, 2))), st))
        state = state_of(*pairs)
        for now in sorted(rng.uniform(0, 160) for _ in range(4)):  # staleness crossings
            for fallback in (False, True):
                candidates = np.ones(len(state), bool)
                got = [p.filter(SchedulingContext(request(), state, now, rng), candidates,
                                fallback=fallback) for p in (cached, plain, cached)]
                assert (got[0] == got[1]).all() and (got[2] == got[1]).all(), (trial, now)


def test_a_new_status_and_the_clock_invalidate_the_kept_mask() -> None:
    cached, _ = pipelines()
    state = state_of((meta("a", node="n1"), status("a", ts_ms=1_000)),
                     (meta("b", node="n2"), status("b", ts_ms=50_000)))
    rng = random.Random(0)

    def keep(now: float) -> list[bool]:
        ctx = SchedulingContext(request(), state, now, rng)
        return cached.filter(ctx, np.ones(2, bool), fallback=False).tolist()

    assert keep(10.0) == [True, True]
    assert keep(61.5) == [False, True]  # a's status turned stale at 61 s
    state.set_status(0, status("a", ts_ms=61_000))  # a new status: a new version
    assert keep(61.5) == [True, True]
    state.set_status(1, status("b", ts_ms=50_000, schedulable=False))
    assert keep(61.6) == [True, False]
