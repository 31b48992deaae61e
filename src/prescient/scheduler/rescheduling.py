"""The live rescheduler: rounds over the scheduler's CMS view, executed as gRPC `Migrate` calls.

Every `--rescheduling-interval-ms` the pure `Rescheduler` (the same one the simulator runs)
plans migrations over the dispatcher's `ClusterState`, the stale, polled view dispatching sees;
each plan becomes one `Migrate` call to the source instance's llumlet at its metadata's
`ip:llumlet_port`, naming the destination by `ip_kvs:kvt_port` (reference §7.1, §7.4). The
calls of a round run concurrently and are all awaited before the next round, as upstream's.

An instance whose metadata has no llumlet port (a stock vLLM behind the lite adapter or the
stat-logger plugin) cannot move KV: its plans are skipped and counted as `unsupported`; a
gateway can still move its streams by token replay (`POST /admin/migrate`).

Outcomes per call: `migrating` (the source took the command), `nothing` (it found no request to
move), `refused` (no free migrate-out slot: gRPC RESOURCE_EXHAUSTED), `failed` (any other gRPC
error, e.g. the source is down or timed out), `unsupported`, `unknown` (the instance left).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from prescient.llumlet.proto import llumlet_server_pb2 as pb
from prescient.llumlet.rpc import LlumletClient, LlumletRpcError
from prescient.policy.adaptive_pd import reservations_of
from prescient.rescheduler import MigrationPlan, make_rescheduler

if TYPE_CHECKING:
    from prescient.config.scheduler import SchedulerSettings
    from prescient.scheduler.core import SchedulerCore

log = logging.getLogger(__name__)

OUTCOMES = ("migrating", "nothing", "refused", "failed", "unsupported", "unknown")


class LiveRescheduler:
    """Runs rescheduling rounds for a started full-mode `SchedulerCore`.

    `on_outcome(plan, outcome)` is told what became of every plan (metrics).
    """

    def __init__(self, core: SchedulerCore, settings: SchedulerSettings, *,
                 rng_seed: int = 0, clock: Callable[[], float] = time.time,
                 on_outcome: Callable[[MigrationPlan, str], None] | None = None) -> None:
        self.core = core
        self.interval_s = settings.rescheduling_interval_ms / 1000
        self.rescheduler = make_rescheduler(
            settings, random.Random(rng_seed), slo_model=core.slo_model,
            reservations=reservations_of(core.dispatcher))
        self.client = LlumletClient(settings.llumlet_grpc_timeout_seconds)
        self.on_outcome = on_outcome
        self._clock = clock
        self._warned: set[str] = set()

    async def run(self) -> None:
        """Rounds until cancelled; a failing round is logged and the next one comes."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.round()
            except Exception:
                log.exception("rescheduling round failed")

    async def close(self) -> None:
        await self.client.close()

    async def round(self) -> list[tuple[MigrationPlan, str]]:
        """One round: plan over the current view, then execute every plan."""
        if not self.core.cms_available:
            return []  # a stale view of a CMS that does not answer would migrate blindly
        plans = self.rescheduler.plan(self.core.dispatcher.state, self._clock())
        outcomes = await asyncio.gather(*(self._execute(p) for p in plans))
        for plan, outcome in zip(plans, outcomes, strict=True):
            if self.on_outcome is not None:
                self.on_outcome(plan, outcome)
        return list(zip(plans, outcomes, strict=True))

    async def _execute(self, plan: MigrationPlan) -> str:
        cms = self.core.dispatcher.cms
        src, dst = cms.metadata(plan.src), cms.metadata(plan.dst)
        if src is None or dst is None:
            return "unknown"
        if not src.llumlet_port or not dst.kvt_port:
            self._warn_once(plan.src if not src.llumlet_port else plan.dst)
            return "unsupported"
        request = pb.MigrateRequest(
            src_engine_id=plan.src, dst_engine_id=plan.dst, dst_engine_ip=dst.ip_kvs or dst.ip,
            dst_engine_port=dst.kvt_port, migration_type=plan.rule,
            migration_req_policy=plan.order, trigger_policy=plan.trigger)
        if plan.rule == "NUM_REQ":
            request.num_reqs = int(plan.value)
        elif plan.rule == "TOKEN":
            request.num_tokens = int(plan.value)
        else:
            request.kv_cache_usage_ratio = plan.value
        try:
            answer = await self.client.migrate(f"{src.ip}:{src.llumlet_port}", request)
        except LlumletRpcError as e:
            if e.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                return "refused"
            log.warning("Migrate %s -> %s (%s) failed: %s", plan.src, plan.dst, plan.trigger, e)
            return "failed"
        return "migrating" if answer.success else "nothing"

    def _warn_once(self, instance_id: str) -> None:
        if instance_id not in self._warned:
            self._warned.add(instance_id)
            log.warning("instance %s has no llumlet gRPC port: the rescheduler cannot migrate "
                        "its requests (token replay through a gateway can)", instance_id)
