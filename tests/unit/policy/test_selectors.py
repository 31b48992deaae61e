from __future__ import annotations

import numpy as np

from prescient.policy.metrics import make_metric
from prescient.policy.selectors import (
    FixedPreferenceSelector,
    MetricSelector,
    PowerOfTwoSelector,
    RandomSelector,
    RoundRobinSelector,
)
from prescient.policy.state import ClusterState

from .conftest import ctx_for, meta, state_of, status

PREFILLS = make_metric("all_prefills_tokens_num")
WAITING = make_metric("num_waiting_requests")


def cluster(prefills: list[int], waiting: list[int] | None = None):
    waiting = waiting or [0] * len(prefills)
    return state_of(*[(meta(f"i{k}"), status(f"i{k}", num_uncomputed_tokens_all_waiting_prefills=p,
                                              num_waiting_requests=w))
                      for k, (p, w) in enumerate(zip(prefills, waiting, strict=True))])


def test_ties_go_to_the_lowest_instance_id_and_fall_through_metrics() -> None:
    state = cluster([5, 3, 3, 3], waiting=[0, 2, 1, 1])
    rows = np.arange(4)
    assert MetricSelector([PREFILLS]).select(ctx_for(state), rows) == 1
    assert MetricSelector([PREFILLS, WAITING]).select(ctx_for(state), rows) == 2
    hit = make_metric("kv_cache_hit_len")
    ctx = ctx_for(state)
    ctx.prefix_hit_tokens = np.array([0.0, 16.0, 32.0, 32.0])
    assert MetricSelector([hit, PREFILLS]).select(ctx, rows) == 2  # higher hit is better


def test_narrowing_picks_what_the_full_sort_picks() -> None:
    class Column:
        def __init__(self, name: str, values: np.ndarray, lower: bool) -> None:
            self.name, self.values, self.lower_is_better = name, values, lower

        def compute(self, ctx: object) -> np.ndarray:
            return self.values

    rng = np.random.default_rng(3)
    state = cluster([0] * 40)
    for trial in range(300):
        cols = [rng.integers(0, 3, 40).astype(float) for _ in range(3)]
        for col in cols:
            col[rng.random(40) < 0.2] = rng.choice([np.nan, np.inf, -np.inf])
        metrics = [Column(f"m{trial}-{k}", col, lower=bool(k % 2 == 0))
                   for k, col in enumerate(cols)]
        rows = np.flatnonzero(rng.random(40) < 0.7)
        if not len(rows):
            continue
        keys = [c.values[rows] if c.lower_is_better else -c.values[rows] for c in metrics]
        expected = int(rows[np.lexsort([np.arange(len(rows)), *reversed(keys)])[0]])
        assert MetricSelector(metrics).select(ctx_for(state), rows) == expected


def test_top_k_picks_only_among_the_k_best_and_is_seeded() -> None:
    state = cluster([10, 1, 2, 30, 3])
    rows = np.arange(5)
    picks = [MetricSelector([PREFILLS], top_k=3).select(ctx_for(state, seed=s), rows)
             for s in range(40)]
    assert set(picks) == {1, 2, 4}
    again = [MetricSelector([PREFILLS], top_k=3).select(ctx_for(state, seed=s), rows)
             for s in range(40)]
    assert picks == again


def test_round_robin_resumes_after_the_last_pick_even_when_rows_change() -> None:
    selector = RoundRobinSelector()
    state = cluster([0, 0, 0])
    picks = [selector.select(ctx_for(state), np.arange(3)) for _ in range(4)]
    assert picks == [0, 1, 2, 0]
    # i1 disappears: the next after i0 is i2
    smaller = ClusterState([meta("i0"), meta("i2")])
    assert smaller.ids[selector.select(ctx_for(smaller), np.arange(2))] == "i2"


def test_power_of_two_keeps_the_better_of_the_two_it_draws() -> None:
    state = cluster([50, 10, 40, 20])
    rows = np.arange(4)
    for seed in range(30):
        ctx = ctx_for(state, seed=seed)
        a, b = ctx_for(state, seed=seed).rng.sample(range(4), 2)
        better = min((a, b), key=[50, 10, 40, 20].__getitem__)
        assert PowerOfTwoSelector(PREFILLS).select(ctx, rows) == better


def test_flood_sticks_to_its_instance_while_it_is_a_candidate() -> None:
    selector = FixedPreferenceSelector()
    state = cluster([0, 0, 0])
    assert selector.select(ctx_for(state), np.array([1, 2])) == 1
    assert selector.select(ctx_for(state), np.array([0, 1, 2])) == 1
    assert selector.select(ctx_for(state), np.array([0, 2])) == 0
    assert selector.select(ctx_for(state), np.array([0, 1])) == 0


def test_random_is_seeded() -> None:
    state = cluster([0] * 6)
    a = [RandomSelector().select(ctx_for(state, seed=s), np.arange(6)) for s in range(20)]
    b = [RandomSelector().select(ctx_for(state, seed=s), np.arange(6)) for s in range(20)]
    assert a == b and len(set(a)) > 1
