"""Where a request goes: the scheduler's choice, or the gateway's own round-robin.

Upstream's `CompositeBalancer` (reference §8.2), with its rules:

- the scheduler answers "none available" (`NoInstanceAvailableError`, HTTP 429): wait
  `--wait-scheduling-retry-interval` and ask again until `--wait-scheduling-timeout`, then give
  up (the client gets 503 "no available inference worker");
- the scheduler cannot decide (`SchedulerUnavailableError`: down, CMS unavailable, bad answer):
  fall back to round-robin over the instances discovery found;
- `--scheduling-policy round-robin`: round-robin only, no scheduler.

One addition: the gateway remembers instances that just refused connections
(`FAILED_COOLDOWN_S`) and those a request already failed on. An embedded scheduler learns that
an instance died only when its CMS status goes stale (up to a minute), so until then it keeps
choosing it; when it does, the choice is released and another instance is taken round-robin.
The alternatives are the discovered instances plus every instance the scheduler has named.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from typing import cast

from prescient.discovery.base import DiscoveredInstance, Resolver
from prescient.errors import PrescientError
from prescient.gateway.metrics import GatewayMetrics
from prescient.scheduler.wire import (
    Endpoint,
    InProcessScheduler,
    LLMInstance,
    NoInstanceAvailableError,
    Scheduler,
    ScheduleRequest,
    SchedulerUnavailableError,
)

FAILED_COOLDOWN_S = 5.0  # an instance that refused a connection is avoided this long

Address = tuple[str, int]


class NoWorkerError(PrescientError):
    """No instance can take the request (after waiting, or nothing is discovered): 503."""


class Balancer:
    """Picks an instance per request and releases it when the gateway says so.

    Args:
        scheduler: the scheduler to ask; None for local round-robin only.
        resolver: discovered instances (the fallback's candidates); None: none.
        wait_timeout_s, wait_interval_s: the "none available" wait.
        clock, sleep: injectable for tests.
    """

    def __init__(self, scheduler: Scheduler | None, resolver: Resolver | None,
                 metrics: GatewayMetrics, *, wait_timeout_s: float = 5.0,
                 wait_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = asyncio.sleep) -> None:
        self.scheduler = scheduler
        self.resolver = resolver
        self.metrics = metrics
        self.wait_timeout_s = wait_timeout_s
        self.wait_interval_s = wait_interval_s
        self._clock = clock
        self._sleep = sleep
        self._rr = 0
        self._rr_by_type: dict[str, int] = {}
        self._discovered: list[LLMInstance] = []
        self._known: dict[Address, LLMInstance] = {}  # every instance the scheduler named
        self._candidates: list[LLMInstance] | None = None  # cache of `candidates()`
        self._failed: dict[Address, float] = {}  # address -> avoided until (clock)
        # an embedded scheduler that never waits is called, not awaited (a coroutine less)
        self._now = (cast(InProcessScheduler, scheduler)
                     if getattr(scheduler, "waits", True) is False else None)
        if resolver is not None:
            resolver.subscribe(self._on_discovered)

    async def pick(self, request: ScheduleRequest,
                   avoid: Collection[Address] = ()) -> tuple[LLMInstance, bool]:
        """An instance for `request`, and whether the scheduler accounted it (so a failure
        must be released).

        Raises:
            NoWorkerError: nothing available within the wait, or nothing discovered.
        """
        if self.scheduler is None:
            return self._round_robin(avoid), False
        try:
            try:  # the common case first: one call, no wait loop
                if self._now is not None:
                    instance = self._now.schedule_now(request)[0]
                else:
                    instance = (await self.scheduler.schedule(request))[0]
            except NoInstanceAvailableError:
                instance = await self._wait_and_schedule(request)
        except SchedulerUnavailableError:
            self.metrics.fallbacks += 1
            return self._round_robin(avoid), False
        endpoint = instance.endpoint
        address = (endpoint.host, endpoint.port)
        if address not in self._known:
            self._remember(instance)
        if (avoid or self._failed) and self._avoided(address, avoid):
            other = self._alternative(avoid)
            if other is not None:
                await self.release(request, instance)
                return other, False
        return instance, True

    async def pick_legs(self, request: ScheduleRequest,
                        avoid: Collection[Address] = ()) -> tuple[list[LLMInstance], bool]:
        """P/D: every leg the request's mode asks for (prefill then decode for `pd_batch`, the
        one stage of `pd_staged`), and whether the scheduler accounted them.

        The fallback (no scheduler answer) and a leg on an avoided instance take each leg round
        robin over the instances of its type.

        Raises:
            NoWorkerError: nothing available within the wait, or no instance of a leg's type.
        """
        if self.scheduler is None:
            return self._round_robin_legs(request, avoid), False
        try:
            try:
                if self._now is not None:
                    placed = self._now.schedule_now(request)
                else:
                    placed = await self.scheduler.schedule(request)
            except NoInstanceAvailableError:
                placed = await self._wait_and_schedule_all(request)
        except SchedulerUnavailableError:
            self.metrics.fallbacks += 1
            return self._round_robin_legs(request, avoid), False
        for instance in placed:
            self._remember(instance)
        if any(self._avoided((i.endpoint.host, i.endpoint.port), avoid) for i in placed):
            try:
                others = self._round_robin_legs(request, avoid, skip_failed_only=True)
            except NoWorkerError:
                return placed, True
            await self.release(request, *placed)
            return others, False
        return placed, True

    def _remember(self, instance: LLMInstance) -> None:
        address = (instance.endpoint.host, instance.endpoint.port)
        if address not in self._known:
            self._known[address] = instance
            self._candidates = None

    def _round_robin_legs(self, request: ScheduleRequest, avoid: Collection[Address], *,
                          skip_failed_only: bool = False) -> list[LLMInstance]:
        """One instance per leg, round robin over the candidates of the leg's type."""
        types = (("prefill", "decode") if request.scheduling_mode == "pd_batch"
                 else (request.scheduling_stage or "neutral",))
        legs = []
        for infer_type in types:
            instance = self._alternative(avoid, infer_type=infer_type)
            if instance is None and not skip_failed_only:
                instance = self._alternative((), skip_failed=False, infer_type=infer_type)
            if instance is None:
                raise NoWorkerError(f"no available {infer_type} inference worker")
            legs.append(instance)
        return legs

    async def _wait_and_schedule_all(self, request: ScheduleRequest) -> list[LLMInstance]:
        """Ask again every `wait_interval_s` while none is available, until the timeout."""
        assert self.scheduler is not None
        deadline = self._clock() + self.wait_timeout_s
        while self._clock() + self.wait_interval_s <= deadline:
            await self._sleep(self.wait_interval_s)
            try:
                return await self.scheduler.schedule(request)
            except NoInstanceAvailableError:
                pass
        raise NoWorkerError("no available inference worker")

    async def release(self, request: ScheduleRequest, instance: LLMInstance,
                      *others: LLMInstance) -> None:
        """Drop the request's in-flight load (on `instance` and `others`) from the scheduler's
        account."""
        if self.scheduler is not None:
            request.scheduling_result = [instance, *others]
            if self._now is not None:
                self._now.release_now(request)
            else:
                await self.scheduler.release(request)

    def mark_failed(self, address: Address) -> None:
        """`address` refused a connection: avoid it for `FAILED_COOLDOWN_S`."""
        self._failed[address] = self._clock() + FAILED_COOLDOWN_S

    def next_index(self) -> int:
        """The round-robin counter, advanced (for requests placed outside `pick`)."""
        self._rr += 1
        return self._rr

    def candidates(self) -> list[LLMInstance]:
        """Discovered instances, then scheduler-named ones not discovered."""
        if self._candidates is None:
            seen = {(i.endpoint.host, i.endpoint.port): i for i in self._discovered}
            for address, instance in self._known.items():
                seen.setdefault(address, instance)
            self._candidates = list(seen.values())
        return self._candidates

    def _on_discovered(self, instances: Sequence[DiscoveredInstance]) -> None:
        self._discovered = [
            LLMInstance(id=d.instance_id, model=d.model, endpoint=Endpoint(d.host, d.port),
                        infer_type=d.instance_type.value, aux_ip=d.kv_transfer_ip,
                        aux_port=d.kv_transfer_port, dp_rank=d.dp_rank, dp_size=d.dp_size)
            for d in instances]
        self._candidates = None

    async def _wait_and_schedule(self, request: ScheduleRequest) -> LLMInstance:
        return (await self._wait_and_schedule_all(request))[0]

    def _avoided(self, address: Address, avoid: Collection[Address]) -> bool:
        return (address in avoid or address in self._failed) and self._avoidable(address, avoid)

    def _avoidable(self, address: Address, avoid: Collection[Address]) -> bool:
        """Still to be avoided (a cooldown that ran out is forgotten)."""
        if address in avoid:
            return True
        if self._failed[address] > self._clock():
            return True
        del self._failed[address]
        return False

    def _round_robin(self, avoid: Collection[Address]) -> LLMInstance:
        instance = self._alternative(avoid)
        if instance is None:  # every one failed lately: try one anyway
            instance = self._alternative((), skip_failed=False)
        if instance is None:
            raise NoWorkerError("no available inference worker")
        return instance

    def _alternative(self, avoid: Collection[Address], *, skip_failed: bool = True,
                     infer_type: str = "") -> LLMInstance | None:
        """The next candidate, round robin, that is neither in `avoid` nor failed lately (and
        of `infer_type`, if given)."""
        candidates = self.candidates()
        if infer_type:
            candidates = [c for c in candidates if c.infer_type == infer_type]
        if not candidates:
            return None
        failed = self._failed if skip_failed else {}
        now = self._clock() if failed else 0.0
        for _ in range(len(candidates)):
            if infer_type:  # a counter per type: P/D legs alternate prefill and decode picks
                n = self._rr_by_type[infer_type] = self._rr_by_type.get(infer_type, 0) + 1
            else:
                self._rr += 1
                n = self._rr
            instance = candidates[n % len(candidates)]
            address = (instance.endpoint.host, instance.endpoint.port)
            if address not in avoid and failed.get(address, 0.0) <= now:
                return instance
        return None
