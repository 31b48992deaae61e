"""`SchedulerCore`: the scheduler in process, fed by the CMS (full mode) or discovery (lite).

The same object is the scheduler service's engine and the gateway's embedded scheduler, so the
gateway can skip a network hop. It wires the pure `Dispatcher` to the live world:

- full mode: a `CmsReader` polls the CMS store into the dispatcher; an instance's endpoint is
  its metadata `ip:api_server_port`, its aux (KV-transfer) address `ip_kvt:kvt_port`. An empty
  CMS is "unavailable", not "no instance free" (upstream's 429): after a Redis restart idle
  llumlets re-register only at their next heartbeat, and meanwhile the gateway's round-robin
  over discovery serves instead of every request waiting and failing;
- lite mode: a discovery `Resolver` supplies the instance set; the gateway's `/report`s raise
  token counts; every request is released at completion (upstream forgets to when
  `--requests-report-duration` is 0, §11.9).

`schedule` is on the gateway's hot path: it builds one `Request`, asks the dispatcher and
returns cached `LLMInstance` records; it never logs or awaits. The dispatcher is synchronous and
the event loop runs one coroutine at a time, so decisions are serialised without a lock (upstream
takes a write lock unless `--allow-concurrent-scheduling`).

A request id already in flight is scheduled again: the local account and the lite state ignore
a second add on the same instance (upstream warns and ignores it), and a release frees every
instance the id holds.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prescient.cms.reader import CmsReader
from prescient.cms.view import CmsUnavailableError
from prescient.discovery.base import DiscoveredInstance, Resolver
from prescient.errors import ConfigError
from prescient.model import InferType, InstanceMetadata, InstanceStatus, Placement, Request
from prescient.policy.dispatcher import Dispatcher, SchedulingMode
from prescient.policy.registry import SLO_POLICY, make_dispatcher
from prescient.scheduler.cache_wiring import LiveKvEvents, LiveMooncake, make_live_cache
from prescient.scheduler.wire import (
    Endpoint,
    LLMInstance,
    NoInstanceAvailableError,
    ReportItem,
    ScheduleRequest,
    SchedulerUnavailableError,
)
from prescient.tasks import cancel_and_wait

if TYPE_CHECKING:
    from prescient.cms.store import CmsStore
    from prescient.config.scheduler import SchedulerSettings
    from prescient.predict.slo import SloLatencyModel


_MODES = {m.value: m for m in SchedulingMode}
_STAGES: dict[str, InferType | None] = {
    "": None, "prefill": InferType.PREFILL, "decode": InferType.DECODE}


class InvalidScheduleRequestError(ValueError):
    """A `/schedule` body the scheduler cannot act on (HTTP 400)."""


class SchedulerCore:
    """The `Scheduler` protocol in process.

    Args:
        settings: the scheduler's settings; the policy, mode and CMS intervals come from here.
        store: the CMS store (full mode). None: a `RedisStore` built from the `--cms-redis-*`
            settings, owned (and closed) by the core.
        resolver: the instance source (lite mode). None: `make_resolver(settings)`, owned by the
            core.
        clock: the dispatcher's `now`, wall-clock seconds since the epoch: the llumlets
            stamp statuses with wall-clock `timestamp_ms` (possibly on other hosts), and the
            freshness filter compares the two. The CMS reader paces its polls on its own
            monotonic clock.
        rng_seed: seeds the policy's random choices (top-k, power of two).

    Raises:
        ConfigError: the policy cannot run with these settings (e.g. `slo` in lite mode).
    """

    def __init__(
        self, settings: SchedulerSettings, *, store: CmsStore | None = None,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.time,
        rng_seed: int = 0,
    ) -> None:
        self.settings = settings
        self.full_mode = settings.enable_full_mode_scheduling
        self._clock = clock
        self.slo_model = _slo_model(settings)
        self.dispatcher = make_dispatcher(settings.scheduling_policy, settings,
                                          random.Random(rng_seed), slo_model=self.slo_model)
        # the one feature that reads token ids (cache-aware) is full mode only
        self._keep_token_ids = self.full_mode and settings.enable_cache_aware_scheduling
        self._cache = (make_live_cache(settings, self.dispatcher) if self._keep_token_ids
                       else None)
        self._prefetch = getattr(self._cache, "prefetch", None)  # mooncake: a network lookup
        self._store, self._owns_store = store, False
        self._resolver, self._owns_resolver = resolver, False
        self._reader: CmsReader | None = None
        self._task: asyncio.Task[None] | None = None
        self._discovered: dict[str, DiscoveredInstance] = {}
        # instance id -> (the metadata the records were built from, one record per leg type)
        self._records: dict[str, tuple[InstanceMetadata, dict[InferType, LLMInstance]]] = {}
        self._placed_records: dict[Placement, LLMInstance] = {}
        self._placed_version = -1
        self._started = False
        self._subscribed = False

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the instance set once (CMS metadata and statuses, or discovery), then keep it
        current in the background."""
        if self._started:
            return
        if self.full_mode:
            await self._start_full()
        else:
            await self._start_lite()
        self._started = True

    async def _start_full(self) -> None:
        if self._store is None:
            from prescient.scheduler.wiring import make_store

            self._store, self._owns_store = make_store(self.settings), True
        s = self.settings
        if self._cache is not None:
            await self._cache.start()
        self._reader = CmsReader(
            self._store, _WallClockSink(self.dispatcher, self._clock,
                                        self._cache.on_instances if self._cache else None),
            status_interval_s=s.cms_pull_status_interval_ms / 1000,
            metadata_interval_s=s.cms_pull_metadata_interval_ms / 1000)
        await self._reader.poll_metadata()
        await self._reader.poll_statuses()
        self._task = asyncio.create_task(self._reader.run(), name="prescient-cms-reader")

    async def _start_lite(self) -> None:
        if self._resolver is None:
            from prescient.scheduler.wiring import make_resolver

            self._resolver, self._owns_resolver = make_resolver(self.settings), True
        await self._resolver.start()
        if not self._subscribed:  # a caller's resolver outlives a close() and a new start()
            self._resolver.subscribe(self._on_discovered)
            self._subscribed = True

    async def close(self) -> None:
        """Stop polling and close what the core opened itself. Idempotent."""
        self._started = False
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        if self._cache is not None:
            await self._cache.close()
        if self._owns_store and self._store is not None:
            await self._store.close()
            self._store, self._owns_store = None, False
        if self._owns_resolver and self._resolver is not None:
            await self._resolver.close()
            self._resolver, self._owns_resolver, self._subscribed = None, False, False

    # the gateway it is embedded in may release every finished request: a call, not a request
    in_process = True

    @property
    def wants_token_ids(self) -> bool:
        """Whether `schedule` reads `prompt_token_ids` (cache-aware full mode): the gateway
        skips building them otherwise."""
        return self._keep_token_ids

    @property
    def live_cache(self) -> LiveKvEvents | LiveMooncake | None:
        """The live cache-aware index (`--cache-index kv-events` / `mooncake`), if any."""
        return self._cache

    @property
    def ready(self) -> bool:
        """Started and, in full mode, the CMS answered its last poll."""
        return self._started and (not self.full_mode or self.dispatcher.cms.available)

    @property
    def cms_available(self) -> bool:
        """Full mode: the CMS answered its last poll. Lite mode: always True (no CMS)."""
        return not self.full_mode or self.dispatcher.cms.available

    def instances(self) -> list[LLMInstance]:
        """Every instance the scheduler knows, sorted by id, as its own infer type."""
        cms = self.dispatcher.cms
        out = []
        for iid in cms.instance_ids():
            md = cms.metadata(iid)
            if md is not None:
                out.append(self._record(iid, md, md.instance_type))
        return out

    # ---- the Scheduler protocol --------------------------------------------------------------

    async def schedule(self, request: ScheduleRequest) -> list[LLMInstance]:
        """Place the request's legs (one, or prefill then decode for `pd_batch`).

        Raises:
            InvalidScheduleRequestError: no prompt length, or `pd_staged` without a stage.
            NoInstanceAvailableError: no instance can take it now (HTTP 429).
            SchedulerUnavailableError: not started, the CMS is unavailable, or (full mode) it
                lists no instance at all.
        """
        if self._prefetch is None:
            return self.schedule_now(request)
        job = self._request(request)
        await self._prefetch(job)
        return self.schedule_now(request, job)

    def schedule_now(self, request: ScheduleRequest, job: Request | None = None
                     ) -> list[LLMInstance]:
        """`schedule` as a plain call, for the gateway the core is embedded in (a coroutine
        less per request), while `waits` is False. `job`: the request as `_request` made it.
        """
        if job is None:
            job = self._request(request)
        mode = _MODES[request.scheduling_mode]
        stage = _STAGES[request.scheduling_stage]
        try:
            decision = self.dispatcher.schedule(job, self._clock(), mode, stage)
        except CmsUnavailableError as e:
            raise SchedulerUnavailableError(f"cms not available: {e}") from None
        if not decision.placements:
            if self.full_mode and not self.dispatcher.cms.instance_ids():
                # An empty CMS (a Redis restarted empty, before the llumlets re-register; idle
                # ones may take a metadata heartbeat, 20 s) knows less than the gateway's
                # discovery: say "cannot decide" so it falls back, instead of 429 and a wait.
                raise SchedulerUnavailableError("cms lists no instances")
            raise NoInstanceAvailableError(f"no instance available for request {request.id!r}")
        # the records of the placements made since the state last changed, by placement
        version = self.dispatcher.state.version
        if self._placed_version != version:
            self._placed_records.clear()
            self._placed_version = version
        placed = []
        for placement in decision.placements:
            record = self._placed_records.get(placement)
            if record is None:
                record = self._placed_records[placement] = self._placed(placement)
            placed.append(record)
        return placed

    async def release(self, request: ScheduleRequest) -> None:
        """Forget the request on every instance it was counted on.

        The whole id is released even when `scheduling_result` names only some of its legs: the
        dispatcher keeps per-request, not per-leg, release.
        """
        self.dispatcher.release(request.id, self._clock())

    def release_now(self, request: ScheduleRequest) -> None:
        """`release` as a plain call (it never waits)."""
        self.dispatcher.release(request.id, self._clock())

    @property
    def waits(self) -> bool:
        """Whether `schedule` may wait (a Mooncake index is asked first, over the network):
        then `schedule_now` must not be used."""
        return self._prefetch is not None

    async def report(self, items: Sequence[ReportItem]) -> None:
        """Lite mode: raise token counts (`state_update`) and mark prefills done
        (`prefill_done`). Unknown requests or instances are ignored; full mode ignores reports
        (the CMS carries the engines' own counts)."""
        lite = self.dispatcher.lite
        if lite is None:
            return
        for item in items:
            if item.kind == "state_update":
                self.dispatcher.report(item.id, item.instance_id, item.num_tokens)
            else:
                lite.mark_prefill_complete(item.id, item.instance_id)

    # ---- helpers -----------------------------------------------------------------------------

    def _request(self, request: ScheduleRequest) -> Request:
        """The dispatcher's view of a `/schedule` body, validated (the scheduler must be
        started)."""
        if not self._started:
            raise SchedulerUnavailableError("the scheduler is not started")
        if request.scheduling_mode == "pd_staged" and not request.scheduling_stage:
            raise InvalidScheduleRequestError(
                "scheduling_mode pd_staged needs scheduling_stage prefill or decode")
        ids = request.prompt_token_ids
        length = request.prompt_num_tokens or (len(ids) if ids else 0)
        if not request.id:
            raise InvalidScheduleRequestError("id must not be empty")
        if length < 1:
            raise InvalidScheduleRequestError(
                f"request {request.id!r}: prompt_num_tokens must be >= 1 "
                "(or prompt_token_ids non-empty)")
        if ids and len(ids) != length:
            raise InvalidScheduleRequestError(
                f"request {request.id!r}: prompt_num_tokens {length} != "
                f"len(prompt_token_ids) {len(ids)}")
        token_ids = tuple(ids) if ids and self._keep_token_ids else None
        return Request(request_id=request.id, prompt_len=length, prompt_token_ids=token_ids)

    def _placed(self, placement: Placement) -> LLMInstance:
        iid = placement.instance_id
        md = self.dispatcher.cms.metadata(iid)
        if md is None:  # the dispatcher placed on an instance it knows; cannot happen
            raise SchedulerUnavailableError(f"instance {iid!r} has no metadata")
        return self._record(iid, md, placement.infer_type)

    def _record(self, iid: str, md: InstanceMetadata, infer_type: InferType) -> LLMInstance:
        """The wire record of one instance and leg type, built once per metadata change."""
        cached = self._records.get(iid)
        if cached is None or cached[0] is not md:
            # each metadata poll decodes new objects: keep the records while the fields agree
            if cached is not None and cached[0] == md:
                cached = (md, cached[1])
            else:
                self._prune_records()
                cached = (md, {})
            self._records[iid] = cached
        record = cached[1].get(infer_type)
        if record is None:
            record = cached[1][infer_type] = _llm_instance(md, infer_type, self._model_of(iid))
        return record

    def _prune_records(self) -> None:
        """Drop the records of instances that left (rare: only when a record is rebuilt)."""
        known = self.dispatcher.cms.instance_ids()
        if len(self._records) > len(known):
            for iid in set(self._records) - set(known):
                del self._records[iid]

    def _model_of(self, iid: str) -> str:
        found = self._discovered.get(iid)
        return found.model if found is not None else ""

    def _on_discovered(self, instances: Sequence[DiscoveredInstance]) -> None:
        """Lite mode: the resolver's set changed."""
        self._discovered = {i.instance_id: i for i in instances}
        self.dispatcher.on_instances({i.instance_id: i.metadata() for i in instances},
                                     self._clock())


class _WallClockSink:
    """The dispatcher as the CMS reader's sink, with `now` from the core's (wall) clock.

    The reader's clock paces its loops and must be monotonic (a wall-clock step backwards would
    stall them); the dispatcher's `now` must be on the llumlets' wall clock.
    """

    def __init__(self, dispatcher: Dispatcher, clock: Callable[[], float],
                 on_instances: Callable[[Mapping[str, InstanceMetadata]], None] | None = None
                 ) -> None:
        self._dispatcher, self._clock = dispatcher, clock
        self._on_instances = on_instances  # the live cache index follows the instance set

    def on_instances(self, metadata: Mapping[str, InstanceMetadata], now: float) -> None:
        self._dispatcher.on_instances(metadata, self._clock())
        if self._on_instances is not None:
            self._on_instances(metadata)

    def on_statuses(self, statuses: Mapping[str, InstanceStatus | None], now: float) -> None:
        self._dispatcher.on_statuses(statuses, self._clock())

    def mark_cms_unavailable(self, reason: str) -> None:
        self._dispatcher.mark_cms_unavailable(reason)

    def mark_cms_available(self) -> None:
        self._dispatcher.mark_cms_available()


def _llm_instance(md: InstanceMetadata, infer_type: InferType, model: str) -> LLMInstance:
    return LLMInstance(
        id=md.instance_id, model=model, infer_type=infer_type.value,
        endpoint=Endpoint(md.ip, md.api_server_port), aux_ip=md.ip_kvt, aux_port=md.kvt_port,
        dp_rank=md.dp_rank, dp_size=md.data_parallel_size)


def _slo_model(settings: SchedulerSettings) -> SloLatencyModel | None:
    """The `slo` policy's latency model from its profiling files (as the simulator loads it)."""
    if settings.scheduling_policy != SLO_POLICY:
        return None
    ttft, tpot = settings.ttft_profiling_data_path, settings.tpot_profiling_data_path
    if not ttft or not tpot:
        raise ConfigError("--scheduling-policy slo needs --ttft-profiling-data-path and "
                          "--tpot-profiling-data-path (make them with `prescient profile`)")
    from prescient.profiling import read_slo_model

    return read_slo_model(Path(ttft), Path(tpot))

