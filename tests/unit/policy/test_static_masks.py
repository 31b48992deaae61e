"""The pipeline keeps its static filters' mask per state version and clock: never a different
answer from computing every filter on every call."""

from __future__ import annotations

import random

import numpy as np
import pytest

from prescient.model import InferType
from prescient.policy.filters import Failover, Fresh, MetricThreshold, OfInferType, Schedulable
from prescient.policy.framework import PLAIN_ROWS, Pipeline, SchedulingContext
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


def test_the_argmin_shortcut_picks_what_the_filter_passes_pick() -> None:
    """Load-balance's shape (a soft bound and a selector on the same metric) is decided from
    the cached static rows; the answer must equal the full passes', on both sides of the bound
    (over it: the fallback pass), with ties, and when no row survives the static filters."""
    rng = random.Random(11)
    shortcut, _ = pipelines()
    assert shortcut._argmin is not None
    full, _ = pipelines()
    full._argmin = None
    for trial in range(300):
        pairs = []
        for i in range(rng.randint(1, 6)):
            st = None if rng.random() < 0.1 else status(
                f"i{i}", ts_ms=rng.choice([1_000, 90_000]), schedulable=rng.random() < 0.85,
                num_uncomputed_tokens_all_waiting_prefills=rng.choice([0, 200, 200, 700, 900]))
            pairs.append((meta(f"i{i}", rng.choice([InferType.NEUTRAL, InferType.PREFILL]),
                               node=str(rng.randint(0, 3))), st))
        state = state_of(*pairs)
        for row in range(len(state)):  # in-flight prompts, some just over the bound
            if rng.random() < 0.5:
                state.set_account(row, (1, 1, 1, rng.choice([100, 300, 450]), 100))
        for now in (10.0, 100.0):
            candidates = rng.choice([np.ones(len(state), bool),
                                     np.array([rng.random() < 0.7 for _ in range(len(state))])])
            got = [p.pick(SchedulingContext(request(), state, now, rng), candidates)
                   for p in (shortcut, full)]
            assert got[0] == got[1], (trial, now)


@pytest.mark.parametrize("instances", [3, PLAIN_ROWS + 5])
def test_the_shortcut_reads_few_rows_in_plain_python_and_many_in_numpy(instances: int) -> None:
    """Up to PLAIN_ROWS static rows the metric is read in plain Python, past it as a numpy
    column: the same first least row either way, and the same as the filter passes'."""
    rng = random.Random(5)
    shortcut, _ = pipelines()
    full, _ = pipelines()
    full._argmin = None
    state = state_of(*[(meta(f"i{i:02d}"), status(f"i{i:02d}", ts_ms=1_000))
                       for i in range(instances)])
    for trial in range(100):
        for row in range(instances):
            state.set_account(row, (1, 0, 1, rng.choice([0, 100, 100, 200, 600]), 0))
        candidates = np.ones(instances, bool)
        ctx = SchedulingContext(request(), state, 10.0, rng)
        got = shortcut.pick(ctx, candidates)
        kept = shortcut._static_entry(ctx, candidates, False)
        assert (kept.few_rows is not None) == (instances <= PLAIN_ROWS)
        loads = state.account[:, 3]
        expected = int(np.argmin(loads)) if loads.min() < 500 else full.pick(
            SchedulingContext(request(), state, 10.0, rng), candidates)
        assert got == expected == full.pick(SchedulingContext(request(), state, 10.0, rng),
                                            candidates), trial


def test_the_shortcut_needs_the_same_metric_and_a_soft_bound() -> None:
    other = make_metric("num_waiting_requests")
    hard = Pipeline([Schedulable(), MetricThreshold(LOAD, 500.0, soft=False)],
                    MetricSelector([LOAD]), [Failover("node")])
    mismatched = Pipeline([Schedulable(), MetricThreshold(other, 5.0)],
                          MetricSelector([LOAD]), [Failover("node")])
    two_metrics = Pipeline([Schedulable(), MetricThreshold(LOAD, 500.0)],
                           MetricSelector([LOAD, other]), [Failover("node")])
    assert hard._argmin is None and mismatched._argmin is None and two_metrics._argmin is None


def test_the_shortcut_serves_lite_pipelines_without_static_filters() -> None:
    lite_metric = make_metric("num_tokens", full_mode=False)
    lite = Pipeline([MetricThreshold(lite_metric, 1e9)], MetricSelector([lite_metric]))
    assert lite._argmin is not None
    state = state_of((meta("a"), None), (meta("b"), None), (meta("c"), None))
    state.set_lite(0, 3, 900)
    state.set_lite(1, 1, 100)
    state.set_lite(2, 1, 100)
    rng = random.Random(0)
    ctx = SchedulingContext(request(), state, 0.0, rng)
    assert lite.pick(ctx, np.ones(3, bool)) == 1  # the first of the least
    assert lite.pick(SchedulingContext(request(), state, 0.0, rng),
                     np.array([True, False, True])) == 2


def test_kept_status_sums_follow_new_statuses_and_the_instance_set() -> None:
    """`status_sum` is kept between polls; a new status row or instance set recomputes it,
    and dispatch counts (which change without a new version) are added on every read."""
    a, b = meta("a"), meta("b")
    st = state_of((a, status("a", num_uncomputed_tokens_all_waiting_prefills=100)),
                  (b, status("b", num_uncomputed_tokens_scheduler_running_prefills=30)))
    metric = make_metric("all_prefills_tokens_num")
    ctx = SchedulingContext(request(), st, 1.0, random.Random(0))
    assert list(metric.compute(ctx)) == [100, 30]
    kept = st.status_sum("num_uncomputed_tokens_all_waiting_prefills",
                         "num_uncomputed_tokens_scheduler_running_prefills")
    assert not kept.flags.writeable
    st.set_account(1, (1, 0, 1, 500, 0))
    assert list(metric.compute(ctx)) == [100, 530]
    st.set_status(0, status("a", 2000, num_uncomputed_tokens_scheduler_running_prefills=7))
    assert list(metric.compute(ctx)) == [7, 530]
    st.set_instances([b])
    assert list(metric.compute(SchedulingContext(request(), st, 1.0, random.Random(0)))) == [530]


def test_count_rows_reach_the_numpy_columns_when_read_and_survive_a_new_instance_set() -> None:
    a, b, c = meta("a"), meta("b"), meta("c")
    st = state_of((a, status("a")), (b, status("b")))
    st.set_account(0, (1, 1, 1, 10, 20))
    st.set_lite(1, 2, 30)
    assert st.account[0].tolist() == [1, 1, 1, 10, 20] and st.lite[1].tolist() == [2, 30]
    st.set_account(1, (0, 1, 1, 0, 7))  # not read before the instance set changes
    st.set_lite(0, 5, 50)
    st.set_instances([c, b, a])
    assert st.ids == ("a", "b", "c")
    assert st.account.tolist() == [[1, 1, 1, 10, 20], [0, 1, 1, 0, 7], [0] * 5]
    assert st.account_rows == [(1, 1, 1, 10, 20), (0, 1, 1, 0, 7), (0,) * 5]
    assert st.lite.tolist() == [[5, 50], [2, 30], [0, 0]]
    assert st.lite_rows == [(5, 50), (2, 30), (0, 0)]
