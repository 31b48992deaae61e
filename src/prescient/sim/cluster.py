"""The discrete-event cluster: simulated engines, llumlet pushes, CMS polls, and a policy.

Staleness is modelled as in Llumnix. Each engine produces a status after every scheduling
decision and when it goes idle; its llumlet pushes the newest one to the CMS every
`status_push_interval_s` (each instance at its own phase); the scheduler polls the CMS every
`--cms-pull-status-interval-ms` (a scheduler setting). The policy only ever sees what the last
poll read. Pushes between
two polls overwrite each other, so only the last push before each poll is simulated (a
`capture` event), which gives the same view at a fraction of the events.
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
from prescient.model import InstanceMetadata, InstanceStatus, Request
from prescient.policy import Dispatcher, make_dispatcher
from prescient.predict.output_length import make_output_predictor
from prescient.predict.slo import SloLatencyModel
from prescient.sim.loop import EventLoop, Order
from prescient.sim.oracle import oracle_policy
from prescient.sim.records import LoadSample, RequestRecord


class InstanceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One simulated instance: a preset and optional engine limits."""

    instance_id: str
    preset: str = "llama3-8b-h100"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_gpu_blocks: int | None = None  # None: the preset's capacity
    enable_prefix_caching: bool = True
    enable_profiling: bool = False  # LLUMNIX_ENABLE_PROFILING
    profiling_steps: int = 50  # LLUMNIX_PROFILING_STEPS
    batching: Literal["vllm", "lens"] = "vllm"  # engine token budget per step (EngineConfig)
    queue_policy: Literal["fcfs", "spf"] = "fcfs"  # engine waiting order (EngineConfig)
    aging_tokens_per_s: float = 100.0


class SimSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the simulation observes and samples the cluster. Times in seconds."""

    seed: int = 0
    status_push_interval_s: float = 0.04  # LLUMNIX_STATUS_PUSH_INTERVAL (code default)
    load_sample_interval_s: float = 1.0
    wait_scheduling_retry_interval_s: float = 1.0  # gateway: retry a 429 this often...
    wait_scheduling_timeout_s: float = 5.0  # ...for this long, then fail the request
    output_length_predictor: str = "none"  # none | oracle | lognormal:sigma=S | histogram
    scheduler: SchedulerSettings = msgspec.field(default_factory=SchedulerSettings)

    def __post_init__(self) -> None:
        for name in ("status_push_interval_s", "load_sample_interval_s",
                     "wait_scheduling_retry_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.wait_scheduling_timeout_s < 0:
            raise ConfigError("wait_scheduling_timeout_s must be >= 0")


class SimResult(msgspec.Struct, kw_only=True):
    """What one policy did with one workload."""

    policy: str
    records: list[RequestRecord]
    load: list[LoadSample]
    num_steps: int  # engine steps simulated, all instances
    sim_time_s: float  # simulated seconds until the last request finished


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
                aging_tokens_per_s=spec.aging_tokens_per_s,
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
        self.policy.on_instances({
            iid: InstanceMetadata(
                instance_id=iid, unit_id=iid, block_size=e.config.block_size,
                max_num_batched_tokens=e.config.max_num_batched_tokens)
            for iid, e in self.engines.items()
        }, 0.0)
        self._pushed: dict[str, InstanceStatus] = {}  # llumlet pushes since the last poll
        self._push_phase = {iid: rng.uniform(0, settings.status_push_interval_s)
                            for iid in self.engines}
        self.output_predictor = make_output_predictor(
            settings.output_length_predictor, random.Random(rng.getrandbits(64)))
        self._step_end: dict[str, float] = {}
        self._records: dict[str, RequestRecord] = {}
        self._load: list[LoadSample] = []
        self._num_open = len(self.requests)
        self._progress = progress

    def run(self) -> SimResult:
        self._next_arrival(0)
        for iid in self.engines:  # llumlets push a first (idle) status when they register
            self.loop.at(0.0, Order.CAPTURE, self._capture, iid)
        self.loop.at(0.0, Order.POLL, self._poll)
        self.loop.at(0.0, Order.SAMPLE, self._sample)
        if self._num_open:
            self.loop.run(stop=lambda: self._num_open == 0)
        records = [self._records[r.request_id] for r in self.requests]
        return SimResult(
            policy=self.policy.name, records=records, load=self._load,
            num_steps=sum(e.num_steps for e in self.engines.values()), sim_time_s=self.loop.now,
        )

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
        decision = self.policy.schedule(req, now)
        iid = decision.instance_id
        if iid is None:
            retry_at = now + self.settings.wait_scheduling_retry_interval_s
            if retry_at - req.arrival_time <= self.settings.wait_scheduling_timeout_s:
                self.loop.at(retry_at, Order.ARRIVAL, self._dispatch, req)
            else:
                self._reject(record, "no available instance")
            return
        record.instance_id = iid
        engine = self.engines[iid]
        refused = engine.add_request(req, now)
        if refused:
            self.policy.release(req.request_id, now)
            self._reject(record, refused)
        elif engine.busy:
            end = engine.interrupt(now)
            if end != self._step_end[iid]:
                self._schedule_step_end(iid, end)
        else:
            self._start(iid)

    def _reject(self, record: RequestRecord, why: str) -> None:
        record.rejected = why
        self._num_open -= 1

    def _start(self, iid: str) -> None:
        end = self.engines[iid].start_step(self.loop.now)
        if end is not None:
            self._schedule_step_end(iid, end)

    def _schedule_step_end(self, iid: str, end: float) -> None:
        self._step_end[iid] = end
        self.loop.at(end, Order.STEP_END, self._on_step_end, iid, end)

    def _on_step_end(self, iid: str, end: float) -> None:
        if self._step_end.get(iid) != end:
            return  # superseded by an interrupt
        outcome = self.engines[iid].complete_step()
        for req in outcome.finished:
            self._finish(req)
        self._start(iid)

    def _finish(self, req: EngineRequest) -> None:
        record = self._records[req.request_id]
        record.first_scheduled_time = req.first_scheduled_time
        record.first_token_time = req.first_token_time
        record.finish_time = req.finish_time
        record.num_preemptions = req.num_preemptions
        record.num_cached_tokens = req.num_cached_tokens
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
        now = self.loop.now
        self._pushed[iid] = self.engines[iid].snapshot(now, round(now * 1000))

    def _sample(self) -> None:
        now = self.loop.now
        for iid, engine in self.engines.items():
            st = engine.snapshot(now, 0)
            usage = st.num_used_gpu_tokens / st.num_total_gpu_tokens
            self._load.append(LoadSample(now, iid, st.num_running_requests,
                                         st.num_waiting_requests, round(usage, 6)))
        if self._progress is not None:
            self._progress(now)
        self.loop.at(now + self.settings.load_sample_interval_s, Order.SAMPLE, self._sample)


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
