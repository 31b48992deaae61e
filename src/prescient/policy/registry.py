"""Every dispatch policy by name, in one place.

`make_policy(name, rng)` builds a fresh policy; unknown names raise `ConfigError` listing the
known ones. Baselines here need no engine internals:

| name             | what it does                                                          |
|------------------|-----------------------------------------------------------------------|
| `round-robin`    | cycles through instances in id order                                  |
| `random`         | uniform random instance                                               |
| `least-requests` | fewest requests this router has in flight (router-local counts)       |
| `power-of-two`   | two random instances, the one with fewer router-local requests        |
"""

from __future__ import annotations

import random
from collections.abc import Callable

from prescient.errors import ConfigError
from prescient.model import Decision, InferType, Request
from prescient.policy.framework import DispatchPolicy, Pipeline, PipelinePolicy, Selector
from prescient.policy.local_counts import LocalCounts, LocalRequests
from prescient.policy.selectors import (
    MetricSelector,
    PowerOfTwoSelector,
    RandomSelector,
    RoundRobinSelector,
)

PolicyFactory = Callable[[random.Random], DispatchPolicy]


class CountingPolicy(PipelinePolicy):
    """A pipeline policy that keeps router-local counts up to date through its hooks."""

    def __init__(
        self, name: str, counts: LocalCounts, selector: Selector, rng: random.Random
    ) -> None:
        super().__init__(name, {InferType.NEUTRAL: Pipeline((), selector)}, rng)
        self.counts = counts

    def on_dispatched(self, decision: Decision, request: Request, now: float) -> None:
        self.counts.on_dispatched(decision, request, now)

    def on_finished(self, request_id: str, now: float) -> None:
        self.counts.on_finished(request_id, now)


def _simple(name: str, selector: Selector) -> PolicyFactory:
    return lambda rng: PipelinePolicy(name, {InferType.NEUTRAL: Pipeline((), selector)}, rng)


def _least_requests(rng: random.Random) -> DispatchPolicy:
    counts = LocalCounts()
    return CountingPolicy("least-requests", counts, MetricSelector([LocalRequests(counts)]), rng)


def _power_of_two(rng: random.Random) -> DispatchPolicy:
    counts = LocalCounts()
    return CountingPolicy("power-of-two", counts, PowerOfTwoSelector(LocalRequests(counts)), rng)


POLICIES: dict[str, PolicyFactory] = {
    "round-robin": lambda rng: _simple("round-robin", RoundRobinSelector())(rng),
    "random": lambda rng: _simple("random", RandomSelector())(rng),
    "least-requests": _least_requests,
    "power-of-two": _power_of_two,
}


def make_policy(
    name: str, rng: random.Random, extra: dict[str, PolicyFactory] | None = None
) -> DispatchPolicy:
    """Build the policy called `name` (also looking in `extra`, e.g. the simulator's oracle)."""
    table = {**POLICIES, **(extra or {})}
    factory = table.get(name)
    if factory is None:
        raise ConfigError(f"unknown policy {name!r}; known policies: {', '.join(sorted(table))}")
    return factory(rng)
