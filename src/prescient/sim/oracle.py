"""The oracle: a measuring stick, never a product policy.

It sees every engine's true state at the instant of dispatch (no push or poll lag) and sends a
request to the instance with the least outstanding work, priced in seconds by that instance's own
step-time model: the time to prefill every uncomputed prompt token it holds, plus every decode
token it still owes at the marginal cost of one more sequence in a batch. A production router can
know neither the remaining output lengths nor the fresh state, so the gap between a policy and
the oracle is what better information could still buy.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np

from prescient.engine import SimEngine
from prescient.model import InferType
from prescient.policy.dispatcher import Dispatcher
from prescient.policy.framework import Pipeline, SchedulingContext
from prescient.policy.selectors import MetricSelector


class OutstandingWork:
    """Metric `true_outstanding_work_s`: seconds of work each instance truly has left."""

    name = "true_outstanding_work_s"
    lower_is_better = True

    def __init__(self, engines: Mapping[str, SimEngine]) -> None:
        self.engines = engines

    def compute(self, ctx: SchedulingContext) -> np.ndarray:
        return np.array([self._work(self.engines[iid], ctx.now) for iid in ctx.state.ids])

    @staticmethod
    def _work(engine: SimEngine, now: float) -> float:
        prefill, decode = engine.outstanding_tokens(now)
        model = engine.model
        idle = model.step_time(0, 0.0, 0, 0)
        prefill_s = model.step_time(prefill, 0.0, 0, 0) - idle
        per_decode_s = model.step_time(0, 0.0, 1, 0) - idle
        return prefill_s + decode * per_decode_s


def oracle_policy(engines: Mapping[str, SimEngine], rng: random.Random) -> Dispatcher:
    """The oracle dispatch policy over these engines (needs no status: it reads the truth)."""
    pipeline = Pipeline([], MetricSelector([OutstandingWork(engines)]))
    return Dispatcher("oracle", {InferType.NEUTRAL: pipeline}, rng, full_mode=False)
