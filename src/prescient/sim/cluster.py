"""The discrete-event cluster: simulated engines, llumlet pushes, CMS polls, and a policy.

Staleness is modelled as in Llumnix. Each engine produces a status after every scheduling
decision and when it goes idle; its llumlet pushes the newest one to the CMS every
`status_push_interval_s` (each instance at its own phase); the scheduler polls the CMS every
`--cms-pull-status-interval-ms` (a scheduler setting). The policy only ever sees what the last
poll read. Pushes between
two polls overwrite each other, so only the last push before each poll is simulated (a
`capture` event), which gives the same view at a fraction of the events.

P/D disaggregation: when some instances are prefill or decode instances (`InstanceSpec.
instance_type`, a static split) or with `--enable-adaptive-pd`, each request is scheduled in
`pd_batch` mode (both legs at arrival) or, with `--separate-pd-scheduling`, `pd_staged` (the
decode leg once the prefill is done), as the live gateway's PD forwarding does. The prefill
instance runs the prompt with one output token (vLLM's `max_tokens=1`); its KV then crosses the
migration link (`MigrationSettings`: a handshake plus the prompt's KV bytes at the link's
bandwidth; nothing when both legs are on one instance) and the decode instance computes the
last prompt token and every output token (`SimEngine.add_request(prefilled=True)`). The
client's first token is the decode instance's.

With `--enable-rescheduling`, a rescheduler reads that same view every
`--rescheduling-interval-ms` and its plans run on the engines (`sim/migration.py`). Instances
can fail mid-run (`SimSettings.failures`): a crashed one stops, its llumlet with it (its status
goes stale, then its CMS key expires), and the gateway, as the live one does, avoids it once a
connection is refused and replays the streams it cut on other instances (prompt plus the tokens
streamed so far); a draining one reports itself unschedulable and keeps serving while the
failover policies move its requests away.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

from prescient.config.presets import get_preset
from prescient.config.scheduler import SchedulerSettings
from prescient.engine import EngineConfig, EngineRequest, SimEngine
from prescient.errors import ConfigError
from prescient.model import InferType, InstanceMetadata, InstanceStatus, Request
from prescient.policy import Dispatcher, SchedulingMode, make_dispatcher
from prescient.policy.adaptive_pd import reservations_of
from prescient.predict.output_length import make_output_predictor
from prescient.predict.slo import SloLatencyModel
from prescient.rescheduler import MigrationSettings, Rescheduler, copy_time_s, make_rescheduler
from prescient.sim.loop import EventLoop, Order
from prescient.sim.migration import MigrationRecord, Migrator
from prescient.sim.oracle import oracle_policy
from prescient.sim.records import LoadSample, RequestRecord

GATEWAY_FAILED_COOLDOWN_S = 5.0  # the live gateway avoids a refusing instance this long
LOST = "instance failed"  # why a request cut by a failure without replay counts as lost


class InstanceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One simulated instance: a preset and optional engine limits."""

    instance_id: str
    preset: str = "llama3-8b-h100"
    instance_type: InferType = InferType.NEUTRAL  # prefill / decode: a static P/D split
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_gpu_blocks: int | None = None  # None: the preset's capacity
    enable_prefix_caching: bool = True
    enable_profiling: bool = False  # LLUMNIX_ENABLE_PROFILING
    profiling_steps: int = 50  # LLUMNIX_PROFILING_STEPS
    batching: Literal["vllm", "lens"] = "vllm"  # engine token budget per step (EngineConfig)
    lens_min_step_ms: float = 15.0  # LENS's step target: idle...
    lens_target_step_ms: float = 50.0  # ...and with `lens_queue_threshold` or more waiting
    lens_queue_threshold: int = 5
    lens_max_chunk: int = 512
    queue_policy: Literal["fcfs", "spf"] = "fcfs"  # engine waiting order (EngineConfig)
    aging_tokens_per_s: float = 100.0


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    """An instance that fails at `at_s`: `crash` (engine and llumlet die) or `drain` (it reports
    itself unschedulable and keeps serving: upstream's pre-stop)."""

    instance_id: str
    at_s: float
    kind: Literal["crash", "drain"] = "crash"


class SimSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the simulation observes and samples the cluster. Times in seconds."""

    seed: int = 0
    status_push_interval_s: float = 0.04  # LLUMNIX_STATUS_PUSH_INTERVAL (code default)
    load_sample_interval_s: float = 1.0
    wait_scheduling_retry_interval_s: float = 1.0  # gateway: retry a 429 this often...
    wait_scheduling_timeout_s: float = 5.0  # ...for this long, then fail the request
    output_length_predictor: str = "none"  # none | oracle | lognormal:sigma=S | histogram
    scheduler: SchedulerSettings = msgspec.field(default_factory=SchedulerSettings)
    migration: MigrationSettings = msgspec.field(default_factory=MigrationSettings)
    failures: tuple[Failure, ...] = ()
    gateway_replay: bool = True  # replay streams a failed instance cut (else they are lost)
    cms_expired_time_s: float = 100.0  # LLUMNIX_CMS_EXPIRED_TIME: a dead llumlet's keys' TTL

    def __post_init__(self) -> None:
        for name in ("status_push_interval_s", "load_sample_interval_s",
                     "wait_scheduling_retry_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.wait_scheduling_timeout_s < 0:
            raise ConfigError("wait_scheduling_timeout_s must be >= 0")


class _PdLegs:
    """A request between its arrival and its decode leg: prefilling, then its KV in transit."""

    __slots__ = ("decode", "prefill", "request", "since")

    def __init__(self, request: Request, prefill: str, decode: str | None) -> None:
        self.request = request  # the whole request (the prefill leg runs a one-token copy)
        self.prefill = prefill
        self.decode = decode  # None until chosen (pd_staged)
        self.since = 0.0  # the first try to place the decode leg (pd_staged)


class SimResult(msgspec.Struct, kw_only=True):
    """What one policy did with one workload."""

    policy: str
    records: list[RequestRecord]
    load: list[LoadSample]
    num_steps: int  # engine steps simulated, all instances
    sim_time_s: float  # simulated seconds until the last request finished
    migrations: list[MigrationRecord] = msgspec.field(default_factory=list)
    num_refused_migrations: int = 0  # plans refused (no free slot, a dead instance)
    num_replayed: int = 0  # streams replayed after a failure cut them


def build_engines(instances: Sequence[InstanceSpec]) -> dict[str, SimEngine]:
    """Engines by id, from their presets. Duplicate ids raise `ConfigError`."""
    engines: dict[str, SimEngine] = {}
    for spec in instances:
        if spec.instance_id in engines:
            raise ConfigError(f"duplicate instance id {spec.instance_id!r}")
        preset = get_preset(spec.preset)
        try:
            config = EngineConfig(
                num_gpu_blocks=spec.num_gpu_blocks or preset.num_gpu_blocks,
                block_size=preset.block_size,
                max_num_seqs=spec.max_num_seqs,
                max_num_batched_tokens=spec.max_num_batched_tokens,
                enable_prefix_caching=spec.enable_prefix_caching,
                enable_profiling=spec.enable_profiling,
                profiling_steps=spec.profiling_steps,
                queue_policy=spec.queue_policy,
                batching=spec.batching,
                lens_min_step_ms=spec.lens_min_step_ms,
                lens_target_step_ms=spec.lens_target_step_ms,
                lens_queue_threshold=spec.lens_queue_threshold,
                lens_max_chunk=spec.lens_max_chunk,
                aging_tokens_per_s=spec.aging_tokens_per_s,
                idle_wakeup_ms=preset.idle_wakeup_ms,
            )
        except ValueError as e:
            raise ConfigError(f"instance {spec.instance_id}: {e}") from e
        engines[spec.instance_id] = SimEngine(spec.instance_id, config, preset.step_model)
    return engines


class ClusterSim:
    """One run: a workload through a policy onto simulated engines."""

    def __init__(
        self,
        requests: Sequence[Request],
        instances: Sequence[InstanceSpec],
        policy_name: str,
        settings: SimSettings,
        progress: Callable[[float], None] | None = None,
        slo_model: SloLatencyModel | None = None,
    ) -> None:
        if not instances:
            raise ConfigError("the cluster needs at least one instance")
        self.settings = settings
        self.requests = sorted(requests, key=lambda r: r.arrival_time)
        self.engines = build_engines(instances)
        rng = random.Random(settings.seed)
        self.policy: Dispatcher = make_dispatcher(
            policy_name, settings.scheduler, random.Random(rng.getrandbits(64)),
            extra={"oracle": lambda _settings, r: oracle_policy(self.engines, r)},
            slo_model=slo_model,
        )
        self.loop = EventLoop()
        types = {s.instance_id: s.instance_type for s in instances}
        self.policy.on_instances({
            iid: InstanceMetadata(
                instance_id=iid, unit_id=iid, block_size=e.config.block_size,
                max_num_batched_tokens=e.config.max_num_batched_tokens,
                max_num_seqs=e.config.max_num_seqs, instance_type=types[iid])
            for iid, e in self.engines.items()
        }, 0.0)
        flags = settings.scheduler
        self._pd_mode: SchedulingMode | None = None
        if flags.enable_adaptive_pd or any(t != InferType.NEUTRAL for t in types.values()):
            self._pd_mode = (SchedulingMode.PD_STAGED if flags.separate_pd_scheduling
                             else SchedulingMode.PD_BATCH)
        self._pd: dict[str, _PdLegs] = {}  # requests before their decode leg, by id
        # llumlet pushes since the last poll (None: the CMS key expired)
        self._pushed: dict[str, InstanceStatus | None] = {}
        self._push_phase = {iid: rng.uniform(0, settings.status_push_interval_s)
                            for iid in self.engines}
        self.output_predictor = make_output_predictor(
            settings.output_length_predictor, random.Random(rng.getrandbits(64)))
        # per engine: the end of its step in flight and the number of the event that ends it (a
        # run cut short and resumed can end at the very time the superseded event was set for)
        self._step_end: dict[str, tuple[float, int]] = {}
        self._num_step_events = 0
        self._records: dict[str, RequestRecord] = {}
        self._load: list[LoadSample] = []
        self._num_open = len(self.requests)
        self._progress = progress
        self._boundary_ops: dict[str, list[Callable[[], None]]] = {i: [] for i in self.engines}
        self._at_boundary: set[str] = set()  # engines running their boundary ops right now
        self.rescheduler: Rescheduler | None = None
        if flags.enable_rescheduling and flags.enable_full_mode_scheduling:
            self.rescheduler = make_rescheduler(
                flags, random.Random(rng.getrandbits(64)), slo_model=slo_model,
                reservations=reservations_of(self.policy))
        presets = {s.instance_id: get_preset(s.preset) for s in instances}
        self._kv_bytes = {iid: p.kv_bytes_per_token for iid, p in presets.items()}
        # the serving frontend's per-request time: a request reaches its engine this late (and
        # later still when the engine is busy)
        self._frontend_s = {iid: (p.frontend_ms / 1000, p.frontend_busy_ms / 1000)
                            for iid, p in presets.items()}
        self.migrator = Migrator(self, self.engines, self._kv_bytes, settings.migration)
        self._dead: set[str] = set()  # crashed instances
        self._draining: set[str] = set()  # instances reporting themselves unschedulable
        self._refusing: dict[str, float] = {}  # gateway: avoid this instance until (time)
        self._rr = 0  # gateway round-robin position, for its fallback
        self._num_replayed = 0

    def run(self) -> SimResult:
        self._next_arrival(0)
        for iid in self.engines:  # llumlets push a first (idle) status when they register
            self.loop.at(0.0, Order.CAPTURE, self._capture, iid)
        self.loop.at(0.0, Order.POLL, self._poll)
        self.loop.at(0.0, Order.SAMPLE, self._sample)
        if self.rescheduler is not None:
            self.loop.at(self._rescheduling_interval, Order.ARRIVAL, self._reschedule)
        for failure in self.settings.failures:
            if failure.instance_id not in self.engines:
                raise ConfigError(f"failure of unknown instance {failure.instance_id!r}")
            self.loop.at(failure.at_s, Order.ARRIVAL, self._fail, failure)
        if self._num_open:
            self.loop.run(stop=lambda: self._num_open == 0)
        records = [self._records[r.request_id] for r in self.requests]
        return SimResult(
            policy=self.policy.name, records=records, load=self._load,
            num_steps=sum(e.num_steps for e in self.engines.values()), sim_time_s=self.loop.now,
            migrations=self.migrator.records, num_refused_migrations=self.migrator.num_refused,
            num_replayed=self._num_replayed,
        )

    # ---- the migration host (sim/migration.py) -------------------------------------------

    @property
    def now(self) -> float:
        return self.loop.now

    def at_boundary(self, iid: str, op: Callable[[], None]) -> None:
        """Run `op` between two of the engine's steps: now if it is idle, else at the end of
        the step in flight (a decode run is cut short there, as for an arrival)."""
        if iid in self._dead:
            return
        engine = self.engines[iid]
        if not engine.busy:
            op()
            self._start(iid)
            return
        self._boundary_ops[iid].append(op)
        end = engine.interrupt(self.loop.now, force=True)
        if end != self._step_end[iid][0]:
            self._schedule_step_end(iid, end)

    def after(self, delay: float, op: Callable[[], None]) -> None:
        self.loop.at(self.loop.now + delay, Order.ARRIVAL, op)

    def alive(self, iid: str) -> bool:
        return iid not in self._dead

    def lost_in_transit(self, req: EngineRequest) -> None:
        self._cut(req, req.num_output)

    @property
    def _rescheduling_interval(self) -> float:
        return self.settings.scheduler.rescheduling_interval_ms / 1000.0

    def _reschedule(self) -> None:
        """One rescheduling round over the dispatcher's (polled, stale) view."""
        assert self.rescheduler is not None
        for plan in self.rescheduler.plan(self.policy.state, self.loop.now):
            self.migrator.execute(plan)
        self.loop.at(self.loop.now + self._rescheduling_interval, Order.ARRIVAL,
                     self._reschedule)

    # ---- requests ------------------------------------------------------------------------

    def _next_arrival(self, index: int) -> None:
        """Arrivals enter the heap one at a time: the heap stays small."""
        if index < len(self.requests):
            req = self.requests[index]
            self.loop.at(req.arrival_time, Order.ARRIVAL, self._arrive, req, index)

    def _arrive(self, req: Request, index: int) -> None:
        self._next_arrival(index + 1)
        if self.output_predictor is not None:  # the router's guess, which engines may queue by
            req = msgspec.structs.replace(
                req, predicted_output_len=self.output_predictor.predict(req))
        self._records[req.request_id] = RequestRecord(
            request_id=req.request_id, arrival_time=req.arrival_time,
            prompt_len=req.prompt_len, output_len=req.output_len)
        self._dispatch(req)

    def _dispatch(self, req: Request) -> None:
        """Schedule and hand to the engine; on "no available instance" retry as a gateway does."""
        now = self.loop.now
        record = self._records[req.request_id]
        if self._pd_mode is None:
            decision = self.policy.schedule(req, now)
        else:
            decision = self.policy.schedule(req, now, self._pd_mode, InferType.PREFILL)
        iid = decision.instance_id
        if iid is None:
            retry_at = now + self.settings.wait_scheduling_retry_interval_s
            if retry_at - req.arrival_time <= self.settings.wait_scheduling_timeout_s:
                self.loop.at(retry_at, Order.ARRIVAL, self._dispatch, req)
            else:
                self._reject(record, "no available instance")
            return
        if iid in self._dead or self._refusing.get(iid, -1.0) > now:
            iid = self._gateway_fallback(req)
            if iid is None:
                return
        if self._pd_mode is not None:
            legs = decision.placements
            decode = legs[1].instance_id if len(legs) > 1 else None
            self._pd[req.request_id] = _PdLegs(req, iid, decode)
            if req.output_len > 1:  # the prefill leg: vLLM's max_tokens=1
                req = msgspec.structs.replace(req, output_len=1)
        idle_s, busy_s = self._frontend_s[iid]
        frontend_s = idle_s + busy_s if self.engines[iid].has_work else idle_s
        if frontend_s > 0:
            self.loop.at(now + frontend_s, Order.ARRIVAL, self._hand_over, iid, req)
        else:
            self._hand_over(iid, req)

    def _hand_over(self, iid: str, req: Request, *, prefilled: bool = False) -> None:
        """Queue `req` on the engine and wake it (or reject the request if it never fits)."""
        now = self.loop.now
        record = self._records[req.request_id]
        record.instance_id = iid
        engine = self.engines[iid]
        refused = engine.add_request(req, now, prefilled=prefilled)
        if refused:
            self._pd.pop(req.request_id, None)
            self.policy.release(req.request_id, now)
            self._reject(record, refused)
        elif engine.busy:
            end = engine.interrupt(now)
            if end != self._step_end[iid][0]:
                self._schedule_step_end(iid, end)
        else:
            self._start(iid)

    def _gateway_fallback(self, req: Request) -> str | None:
        """The scheduler named a dead instance: as the live gateway, the connection is refused,
        the scheduler's account released, the instance avoided for a while, and another one
        taken round-robin (None: none left; the request is retried later)."""
        now = self.loop.now
        self.policy.release(req.request_id, now)
        ids = sorted(self.engines)
        for _ in range(len(ids)):
            self._rr += 1
            iid = ids[self._rr % len(ids)]
            if iid in self._dead:
                self._refusing[iid] = now + GATEWAY_FAILED_COOLDOWN_S
            elif self._refusing.get(iid, -1.0) <= now:
                return iid
        self.loop.at(now + self.settings.wait_scheduling_retry_interval_s, Order.ARRIVAL,
                     self._dispatch, req)
        return None

    def _reject(self, record: RequestRecord, why: str) -> None:
        record.rejected = why
        self._num_open -= 1

    def _start(self, iid: str) -> None:
        if iid in self._dead or iid in self._at_boundary or self.engines[iid].busy:
            return  # (an engine at its boundary starts once all its boundary ops ran)
        end = self.engines[iid].start_step(self.loop.now)
        if end is not None:
            self._schedule_step_end(iid, end)

    def _schedule_step_end(self, iid: str, end: float) -> None:
        self._num_step_events += 1
        self._step_end[iid] = (end, self._num_step_events)
        self.loop.at(end, Order.STEP_END, self._on_step_end, iid, self._step_end[iid])

    def _on_step_end(self, iid: str, event: tuple[float, int]) -> None:
        if self._step_end.get(iid) != event or iid in self._dead:
            return  # superseded by an interrupt, or the instance died
        outcome = self.engines[iid].complete_step()
        for req in outcome.finished:
            self._finish(req)
        ops, self._boundary_ops[iid] = self._boundary_ops[iid], []
        self._at_boundary.add(iid)
        for op in ops:
            op()
        self._at_boundary.discard(iid)
        self._start(iid)

    # ---- P/D disaggregation -----------------------------------------------------------------

    def _prefill_done(self, req: EngineRequest, legs: _PdLegs) -> None:
        """The prefill leg computed the prompt: place the decode leg (pd_staged), move the KV."""
        record = self._records[req.request_id]
        if record.first_scheduled_time is None:
            record.first_scheduled_time = req.first_scheduled_time
            record.num_cached_tokens = req.num_cached_tokens
        record.num_preemptions += req.num_preemptions
        legs.since = self.loop.now
        if legs.decode is None:
            self._place_decode(legs)
        else:
            self._transfer(legs)

    def _place_decode(self, legs: _PdLegs) -> None:
        """pd_staged: schedule the decode leg; on "no available instance" retry as a gateway."""
        now, req = self.loop.now, legs.request
        decision = self.policy.schedule(req, now, SchedulingMode.PD_STAGED, InferType.DECODE)
        if decision.instance_id is None:
            if now + self.settings.wait_scheduling_retry_interval_s - legs.since <= (
                    self.settings.wait_scheduling_timeout_s):
                self.after(self.settings.wait_scheduling_retry_interval_s,
                           lambda: self._place_decode(legs))
            else:
                self._pd.pop(req.request_id, None)
                self.policy.release(req.request_id, now)
                self._reject(self._records[req.request_id], "no available decode instance")
            return
        legs.decode = decision.instance_id
        self._transfer(legs)

    def _transfer(self, legs: _PdLegs) -> None:
        """The prompt's KV crosses the link to the decode instance (none if it stays put)."""
        delay = 0.0
        if legs.decode != legs.prefill:
            bs = self.engines[legs.prefill].config.block_size
            blocks = -(-legs.request.prompt_len // bs)
            delay = copy_time_s(blocks, bs, self._kv_bytes[legs.prefill], self.settings.migration)
        self.after(delay, lambda: self._start_decode(legs))

    def _start_decode(self, legs: _PdLegs) -> None:
        req = legs.request
        if self._pd.get(req.request_id) is not legs:
            return  # the request was replayed meanwhile
        del self._pd[req.request_id]
        assert legs.decode is not None
        now = self.loop.now
        if legs.decode in self._dead or self._refusing.get(legs.decode, -1.0) > now:
            # the decode instance refuses the connection: the gateway starts the request over
            self.policy.release(req.request_id, now)
            self._num_replayed += 1
            self._dispatch(msgspec.structs.replace(req, arrival_time=now))
            return
        self._hand_over(legs.decode, req, prefilled=True)

    def _finish(self, req: EngineRequest) -> None:
        legs = self._pd.get(req.request_id)
        if legs is not None and legs.request.output_len > 1:
            self._prefill_done(req, legs)
            return
        self._pd.pop(req.request_id, None)
        record = self._records[req.request_id]
        _merge_timings(record, req)
        record.finish_time = req.finish_time
        self.policy.release(req.request_id, self.loop.now)
        if self.output_predictor is not None:
            self.output_predictor.observe(req.request, req.num_output)
        self._num_open -= 1

    # ---- status: llumlet pushes and CMS polls ---------------------------------------------

    def _poll(self) -> None:
        now = self.loop.now
        if self._pushed:
            self.policy.on_statuses(self._pushed, now)
            self._pushed = {}
        scrape = self.policy.scrape_interval_s
        poll = self.settings.scheduler.cms_pull_status_interval_ms / 1000.0
        after = now + (scrape or poll)
        self.loop.at(after, Order.POLL, self._poll)
        push = self.settings.status_push_interval_s
        for iid, phase in self._push_phase.items():
            last_push = after if scrape else phase + ((after - phase) // push) * push
            if last_push > now:
                self.loop.at(last_push, Order.CAPTURE, self._capture, iid)

    def _capture(self, iid: str) -> None:
        if iid in self._dead:
            return  # its llumlet died with it: no more pushes
        now = self.loop.now
        status = self.engines[iid].snapshot(now, round(now * 1000))
        if iid in self._draining:
            status.schedulable = False
        self._pushed[iid] = status

    def _sample(self) -> None:
        now = self.loop.now
        for iid, engine in self.engines.items():
            if iid in self._dead:
                continue
            st = engine.snapshot(now, 0)
            usage = st.num_used_gpu_tokens / st.num_total_gpu_tokens
            self._load.append(LoadSample(now, iid, st.num_running_requests,
                                         st.num_waiting_requests, round(usage, 6)))
        if self._progress is not None:
            self._progress(now)
        self.loop.at(now + self.settings.load_sample_interval_s, Order.SAMPLE, self._sample)


    # ---- failures ------------------------------------------------------------------------

    def _fail(self, failure: Failure) -> None:
        iid = failure.instance_id
        if failure.kind == "drain":
            self._draining.add(iid)
            return
        now = self.loop.now
        engine = self.engines[iid]
        cut = [(req, engine.num_output_tokens(req.request_id, now))
               for req in engine.live_requests()]
        self._dead.add(iid)
        self._boundary_ops[iid] = []
        self._step_end.pop(iid, None)
        self._pushed.pop(iid, None)
        self.migrator.on_crash(iid)
        for req, streamed in cut:
            self._cut(req, streamed)
        # the CMS forgets the instance when its keys' TTL runs out
        self.loop.at(now + self.settings.cms_expired_time_s, Order.CAPTURE,
                     self._expire_status, iid)

    def _expire_status(self, iid: str) -> None:
        self._pushed[iid] = None

    def _cut(self, req: EngineRequest, streamed: int) -> None:
        """A failure cut `req`'s stream after `streamed` tokens: replay it, or count it lost."""
        now = self.loop.now
        record = self._records[req.request_id]
        _merge_timings(record, req)
        self.policy.release(req.request_id, now)
        legs = self._pd.pop(req.request_id, None)  # a prefill leg runs a one-token copy
        if not self.settings.gateway_replay:
            self._reject(record, LOST)
            return
        self._num_replayed += 1
        original = legs.request if legs is not None else req.request  # (or an earlier replay)
        replay = msgspec.structs.replace(original, arrival_time=now)
        if streamed:
            replay = msgspec.structs.replace(
                replay, prompt_len=original.prompt_len + streamed,
                output_len=original.output_len - streamed, prompt_token_ids=None)
        self._dispatch(replay)


def _merge_timings(record: RequestRecord, req: EngineRequest) -> None:
    """Fold an engine's view of a request into its record; a replayed request's record keeps
    its first attempt's first token and adds up preemptions."""
    if record.first_scheduled_time is None:
        record.first_scheduled_time = req.first_scheduled_time
        record.num_cached_tokens = req.num_cached_tokens
    if record.first_token_time is None:
        record.first_token_time = req.first_token_time
    record.num_preemptions += req.num_preemptions


def simulate(
    requests: Sequence[Request],
    instances: Sequence[InstanceSpec],
    policy_name: str,
    settings: SimSettings | None = None,
    progress: Callable[[float], None] | None = None,
    slo_model: SloLatencyModel | None = None,
) -> SimResult:
    """Run `requests` through `policy_name` on `instances` and return what happened."""
    return ClusterSim(requests, instances, policy_name, settings or SimSettings(), progress,
                      slo_model).run()
