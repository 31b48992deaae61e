"""The balancer's rules: wait on "none available", fall back when the scheduler is down, avoid
instances that just failed, and try one anyway when all did."""

from __future__ import annotations

import asyncio

import pytest

from prescient.discovery.base import StaticResolver
from prescient.gateway.balancer import FAILED_COOLDOWN_S, Balancer, NoWorkerError
from prescient.gateway.metrics import GatewayMetrics
from prescient.scheduler.wire import (
    Endpoint,
    LLMInstance,
    NoInstanceAvailableError,
    ScheduleRequest,
    SchedulerUnavailableError,
)

A, B = ("10.0.0.1", 8000), ("10.0.0.2", 8000)


def instance(address: tuple[str, int]) -> LLMInstance:
    return LLMInstance(id=f"{address[0]}:{address[1]}", endpoint=Endpoint(*address))


class Script:
    """A scheduler that answers from a list: an instance, or an exception to raise."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.released: list[str] = []

    async def schedule(self, request: ScheduleRequest) -> list[LLMInstance]:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return [answer]  # type: ignore[list-item]

    async def release(self, request: ScheduleRequest) -> None:
        self.released += [i.id for i in request.scheduling_result]

    async def report(self, items: object) -> None:
        return None

    async def close(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def balancer(scheduler: Script | None, clock: Clock, *addresses: tuple[str, int],
             timeout: float = 5.0) -> Balancer:
    resolver = StaticResolver([f"{h}:{p}" for h, p in addresses]) if addresses else None
    return Balancer(scheduler, resolver, GatewayMetrics(), wait_timeout_s=timeout,
                    wait_interval_s=1.0, clock=clock, sleep=clock.sleep)


def pick(b: Balancer, avoid: tuple[tuple[str, int], ...] = ()) -> tuple[LLMInstance, bool]:
    return asyncio.run(b.pick(ScheduleRequest(id="r", prompt_num_tokens=1), avoid))


def test_none_available_waits_each_interval_until_the_timeout() -> None:
    clock = Clock()
    none = NoInstanceAvailableError("none")
    got, accounted = pick(balancer(Script(none, none, instance(A)), clock), ())
    assert (got.endpoint.host, accounted, clock.slept) == ("10.0.0.1", True, [1.0, 1.0])
    clock = Clock()
    with pytest.raises(NoWorkerError, match="no available inference worker"):
        pick(balancer(Script(none), clock, timeout=3.5))
    assert clock.slept == [1.0, 1.0, 1.0]


def test_an_unavailable_scheduler_falls_back_to_round_robin_over_discovery() -> None:
    clock = Clock()
    b = balancer(Script(SchedulerUnavailableError("down")), clock, A, B)
    picks = [pick(b) for _ in range(4)]
    assert sorted(i.endpoint.host for i, _ in picks) == ["10.0.0.1"] * 2 + ["10.0.0.2"] * 2
    assert not any(accounted for _, accounted in picks)
    assert b.metrics.fallbacks == 4
    with pytest.raises(NoWorkerError):
        pick(balancer(Script(SchedulerUnavailableError("down")), clock))  # nothing discovered


def test_a_failed_instance_is_avoided_for_the_cooldown_and_its_choice_released() -> None:
    clock = Clock()
    scheduler = Script(instance(A))
    b = balancer(scheduler, clock, A, B)
    b.mark_failed(A)
    got, accounted = pick(b)
    assert (got.endpoint.host, accounted, scheduler.released) == ("10.0.0.2", False,
                                                                  ["10.0.0.1:8000"])
    clock.now += FAILED_COOLDOWN_S + 0.1
    got, accounted = pick(b)
    assert (got.endpoint.host, accounted) == ("10.0.0.1", True)


def test_with_no_alternative_the_schedulers_choice_stands() -> None:
    clock = Clock()
    scheduler = Script(instance(A))
    b = balancer(scheduler, clock, A)
    got, accounted = pick(b, avoid=(A,))
    assert (got.endpoint.host, accounted, scheduler.released) == ("10.0.0.1", True, [])


def test_round_robin_tries_a_failed_instance_when_every_one_failed() -> None:
    clock = Clock()
    b = balancer(None, clock, A, B)
    b.mark_failed(A)
    b.mark_failed(B)
    got, accounted = pick(b)
    assert accounted is False and got.endpoint.host in ("10.0.0.1", "10.0.0.2")


def test_instances_the_scheduler_named_become_fallback_candidates() -> None:
    clock = Clock()
    scheduler = Script(instance(B))
    b = balancer(scheduler, clock, A)
    pick(b)
    assert [i.endpoint.host for i in b.candidates()] == ["10.0.0.1", "10.0.0.2"]


class Embedded(Script):
    """An in-process scheduler that never waits: called through `schedule_now`/`release_now`
    (its coroutines fail, so a test sees which way the balancer went)."""

    waits = False

    def schedule_now(self, request: ScheduleRequest) -> list[LLMInstance]:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return [answer]  # type: ignore[list-item]

    def release_now(self, request: ScheduleRequest) -> None:
        self.released += [i.id for i in request.scheduling_result]

    async def schedule(self, request: ScheduleRequest) -> list[LLMInstance]:
        raise AssertionError("awaited an embedded scheduler that never waits")

    async def release(self, request: ScheduleRequest) -> None:
        raise AssertionError("awaited an embedded scheduler that never waits")


def test_an_embedded_scheduler_that_never_waits_is_called_and_keeps_the_rules() -> None:
    clock = Clock()
    b = balancer(Embedded(instance(A), instance(A), instance(B)), clock, A, B)
    got, accounted = pick(b)
    assert (got.endpoint.host, accounted) == ("10.0.0.1", True)
    asyncio.run(b.release(ScheduleRequest(id="r"), got))
    b.mark_failed(A)  # its next choice (A) is avoided: released, another taken round robin
    got, accounted = pick(b)
    assert (got.endpoint.host, accounted) == ("10.0.0.2", False)
    assert b.scheduler.released == ["10.0.0.1:8000", "10.0.0.1:8000"]  # type: ignore[union-attr]
    unavailable = balancer(Embedded(SchedulerUnavailableError("down")), clock, A)
    assert pick(unavailable) == (instance(A), False)  # the fallback, as when awaited
