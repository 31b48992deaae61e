"""The balancer's P/D legs: the scheduler's placements, and the typed round-robin fallback."""

from __future__ import annotations

import asyncio

import pytest

from prescient.discovery.base import DiscoveredInstance
from prescient.gateway.balancer import Balancer, NoWorkerError
from prescient.gateway.metrics import GatewayMetrics
from prescient.model import InferType
from prescient.scheduler.wire import (
    Endpoint,
    LLMInstance,
    ScheduleRequest,
    SchedulerUnavailableError,
)

P1 = DiscoveredInstance(instance_id="p1", host="10.0.0.1", port=8000,
                        instance_type=InferType.PREFILL)
P2 = DiscoveredInstance(instance_id="p2", host="10.0.0.2", port=8000,
                        instance_type=InferType.PREFILL)
D1 = DiscoveredInstance(instance_id="d1", host="10.0.0.3", port=8000,
                        instance_type=InferType.DECODE, kv_transfer_ip="10.1.0.3",
                        kv_transfer_port=9000)


class Fixed:
    """A resolver with a fixed, typed instance set."""

    def __init__(self, *instances: DiscoveredInstance) -> None:
        self._instances = list(instances)

    async def start(self) -> None:
        return None

    def instances(self) -> list[DiscoveredInstance]:
        return list(self._instances)

    def subscribe(self, listener) -> None:  # type: ignore[no-untyped-def]
        listener(self.instances())

    async def close(self) -> None:
        return None


class Legs:
    """A scheduler that places every request on the same legs, or raises."""

    def __init__(self, answer: list[LLMInstance] | Exception) -> None:
        self.answer = answer
        self.released: list[list[str]] = []

    async def schedule(self, request: ScheduleRequest) -> list[LLMInstance]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    async def release(self, request: ScheduleRequest) -> None:
        self.released.append([i.id for i in request.scheduling_result])

    async def report(self, items: object) -> None:
        return None

    async def close(self) -> None:
        return None


def leg(iid: str, host: str, infer_type: str) -> LLMInstance:
    return LLMInstance(id=iid, endpoint=Endpoint(host, 8000),
                       infer_type=infer_type)  # type: ignore[arg-type]


def batch() -> ScheduleRequest:
    return ScheduleRequest(id="r", prompt_num_tokens=5, scheduling_mode="pd_batch")


def test_the_schedulers_legs_are_taken_as_placed() -> None:
    placed = [leg("p2", "10.0.0.2", "prefill"), leg("d1", "10.0.0.3", "decode")]
    balancer = Balancer(Legs(placed), Fixed(P1, P2, D1), GatewayMetrics())
    legs, accounted = asyncio.run(balancer.pick_legs(batch()))
    assert legs == placed and accounted


def test_fallback_takes_each_leg_round_robin_over_its_type() -> None:
    balancer = Balancer(Legs(SchedulerUnavailableError("down")), Fixed(P1, P2, D1),
                        GatewayMetrics())
    picks = [asyncio.run(balancer.pick_legs(batch())) for _ in range(4)]
    assert {legs[0].id for legs, _ in picks} == {"p1", "p2"}
    assert all(legs[1].id == "d1" and not accounted for legs, accounted in picks)
    assert picks[0][0][1].aux_ip == "10.1.0.3" and picks[0][0][1].aux_port == 9000
    staged = ScheduleRequest(id="r", prompt_num_tokens=5, scheduling_mode="pd_staged",
                             scheduling_stage="decode")
    legs, _ = asyncio.run(balancer.pick_legs(staged))
    assert [i.id for i in legs] == ["d1"]


def test_an_avoided_leg_is_released_and_replaced_by_its_type() -> None:
    placed = [leg("p1", "10.0.0.1", "prefill"), leg("d1", "10.0.0.3", "decode")]
    scheduler = Legs(placed)
    balancer = Balancer(scheduler, Fixed(P1, P2, D1), GatewayMetrics())
    legs, accounted = asyncio.run(balancer.pick_legs(batch(), avoid=[("10.0.0.1", 8000)]))
    assert [i.id for i in legs] == ["p2", "d1"] and not accounted
    assert scheduler.released == [["p1", "d1"]]


def test_no_instance_of_a_legs_type_names_the_type() -> None:
    balancer = Balancer(None, Fixed(P1, P2), GatewayMetrics())
    with pytest.raises(NoWorkerError, match="decode"):
        asyncio.run(balancer.pick_legs(batch()))
