from __future__ import annotations

import numpy as np
import pytest

from prescient.errors import ConfigError
from prescient.model import InferType
from prescient.policy.filters import Failover, Fresh, MetricThreshold, OfInferType, Schedulable
from prescient.policy.framework import Pipeline
from prescient.policy.metrics import make_metric
from prescient.policy.selectors import MetricSelector
from prescient.policy.state import ClusterState

from .conftest import ctx_for, meta, state_of, status

PREFILLS = make_metric("all_prefills_tokens_num")


def loads(*tokens: int) -> ClusterState:
    return state_of(*[
        (meta(f"i{k}"), status(f"i{k}", num_uncomputed_tokens_all_waiting_prefills=t))
        for k, t in enumerate(tokens)])


def test_soft_threshold_is_dropped_in_the_fallback_pass_and_hard_is_not() -> None:
    state = loads(9000, 10000)
    everyone = np.ones(2, bool)
    soft = Pipeline([MetricThreshold(PREFILLS, 8192, soft=True)], MetricSelector([PREFILLS]))
    hard = Pipeline([MetricThreshold(PREFILLS, 8192, soft=False)], MetricSelector([PREFILLS]))
    assert soft.pick(ctx_for(state), everyone) == 0  # all over: the least loaded still wins
    assert hard.pick(ctx_for(state), everyone) is None
    assert soft.pick(ctx_for(loads(9000, 100)), everyone) == 1


def test_higher_is_better_thresholds_keep_values_above() -> None:
    ctx = ctx_for(loads(0, 0))
    ctx.prefix_hit_tokens = np.array([512.0, 0.0])
    assert MetricThreshold(make_metric("kv_cache_hit_len"), 256).keep(ctx).tolist() == [True, False]


def test_schedulability_and_staleness_mark_failover() -> None:
    state = state_of((meta("a"), status("a", schedulable=False)), (meta("b"), status("b", ts_ms=0)),
                     (meta("c"), status("c", ts_ms=59_000)))
    ctx = ctx_for(state, now=61.0)
    assert Schedulable().keep(ctx).tolist() == [False, True, True]
    assert Fresh(60.0).keep(ctx).tolist() == [True, False, True]  # b is 61 s old
    assert ctx.needs_failover.tolist() == [True, True, False]


def test_infer_type_filter() -> None:
    state = state_of((meta("p", InferType.PREFILL), status("p")),
                     (meta("d", InferType.DECODE), status("d")))
    assert OfInferType(InferType.DECODE).keep(ctx_for(state)).tolist() == [True, False]  # d, p


@pytest.mark.parametrize(("domain", "dp", "kept"), [
    ("instance", 1, ["b", "c", "d"]),
    ("node", 1, ["c", "d"]),               # b shares node n0 with the failed a
    ("instance-unit", 1, ["b", "c", "d"]),  # data parallelism off: like instance
    ("instance-unit", 2, ["c", "d"]),       # b shares unit u0 with the failed a
    ("node-unit", 2, ["d"]),               # node n0 = {a, b}, widened to units {u0, u1}
])
def test_failover_domains(domain: str, dp: int, kept: list[str]) -> None:
    units = {"a": "u0", "b": "u1", "c": "u0", "d": "u2"} if domain != "instance-unit" or dp == 1 \
        else {"a": "u0", "b": "u0", "c": "u1", "d": "u2"}
    nodes = {"a": "n0", "b": "n0", "c": "n1", "d": "n2"}
    state = state_of(*[(meta(i, node=nodes[i], unit=units[i], dp=dp),
                        status(i, schedulable=(i != "a"))) for i in "abcd"])
    pipeline = Pipeline([Schedulable()], MetricSelector([PREFILLS]), [Failover(domain)])
    ctx = ctx_for(state)
    keep = pipeline.filter(ctx, np.ones(4, bool), fallback=False)
    assert [state.ids[r] for r in np.flatnonzero(keep)] == kept


def test_unknown_failover_domain_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="failover-domain"):
        Failover("rack")
