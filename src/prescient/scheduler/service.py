"""The scheduler's HTTP service: upstream Llumnix's `/schedule`, `/release` and `/report`.

A thin aiohttp.web layer over a `SchedulerCore`; several gateways may share one service (the
only shared state is the core's account). Status codes follow upstream, because the gateway's
behaviour hangs on them:

- `POST /schedule`: 200 with the request echoed and `scheduling_result` filled; 429 when no
  instance is available (the gateway waits and retries); 400 for a bad body, for "cms not
  available" and for an empty CMS (any non-429 failure makes the gateway fall back to its local
  round-robin).
- `POST /release` (one `ScheduleRequest`), `POST /report` (a list of `ReportItem`): 200 `{}`.
- `GET /health`: 200 when the core is ready (started; full mode: the CMS answered), else 503.
- `GET /metrics`: Prometheus text from the service's own registry.

With a service token, every route but `/health` and `/metrics` (probes and scrapers carry no
token) needs `Authorization: <token>` or `Authorization: Bearer <token>`, else 401. Errors are
OpenAI-style JSON, `{"error": {...}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

import msgspec
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prescient.config.scheduler import SchedulerSettings
from prescient.errors import ConfigError
from prescient.openai_api import error_body
from prescient.rescheduler import MigrationPlan
from prescient.scheduler.cache_wiring import LiveKvEvents
from prescient.scheduler.core import InvalidScheduleRequestError, SchedulerCore
from prescient.scheduler.rescheduling import LiveRescheduler
from prescient.scheduler.wire import (
    NoInstanceAvailableError,
    ReportItem,
    ScheduleRequest,
    SchedulerUnavailableError,
)

_log = logging.getLogger(__name__)

_SCHEDULE_DECODER = msgspec.json.Decoder(ScheduleRequest)
_REPORT_DECODER = msgspec.json.Decoder(list[ReportItem])
_ENCODER = msgspec.json.Encoder()
_EMPTY = b"{}"
_OPEN_PATHS = frozenset({"/health", "/metrics"})
MAX_BODY_BYTES = 32 * 1024 * 1024  # a 1M-token prompt_token_ids list fits
_LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def _error(status: int, message: str, type: str = "invalid_request_error") -> web.Response:
    return _json(error_body(status, message, type=type), status)


class _Metrics:
    """The service's Prometheus series, in a registry of its own (one per app)."""

    def __init__(self, core: SchedulerCore) -> None:
        self.registry = CollectorRegistry()
        self.schedules = Counter(
            "prescient_scheduler_schedule", "Schedule calls by outcome.", ["outcome"],
            registry=self.registry)
        for outcome in ("ok", "no_instance", "unavailable", "bad_request"):
            self.schedules.labels(outcome)
        self.latency = Histogram(
            "prescient_scheduler_schedule_latency_seconds",
            "Time to decode, decide and encode one /schedule, seconds.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.releases = Counter("prescient_scheduler_release", "Release calls.",
                                registry=self.registry)
        self.reports = Counter("prescient_scheduler_report_items", "Report items received.",
                               registry=self.registry)
        Gauge("prescient_scheduler_instances", "Instances the scheduler knows.",
              registry=self.registry).set_function(lambda: len(core.instances()))
        Gauge("prescient_scheduler_cms_available",
              "1 while the CMS answers its polls (always 1 in lite mode).",
              registry=self.registry).set_function(lambda: float(core.cms_available))
        self.migrations = Counter(
            "prescient_scheduler_rescheduling", "Migrate calls the rescheduler made, by "
            "selection rule and order, trigger policy and outcome.",
            ["rule", "order", "policy", "outcome"], registry=self.registry)
        live = core.live_cache
        if isinstance(live, LiveKvEvents):  # --cache-index kv-events
            Gauge("prescient_scheduler_kv_events_subscriptions",
                  "Instances whose KV-event publisher the scheduler is subscribed to.",
                  registry=self.registry).set_function(
                lambda: len(live.subscriber.sources) if live.subscriber else 0)
            self.registry.register(_KvIndexBlocks(live))


class _KvIndexBlocks(Collector):
    """Blocks the KV-events index holds per subscribed instance, read at scrape time."""

    def __init__(self, live: LiveKvEvents) -> None:
        self._live = live

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("prescient_scheduler_kv_index_blocks",
                                   "Blocks the KV-events index holds, by instance.",
                                   labels=["instance_id"])
        subscriber = self._live.subscriber
        for iid in sorted(subscriber.sources) if subscriber is not None else ():
            family.add_metric([iid], self._live.index.blocks.size(iid))
        yield family


class SchedulerService:
    """The routes of one scheduler service over `core`."""

    def __init__(self, core: SchedulerCore, *, service_token: str = "",
                 perf_clock: Callable[[], float] = time.perf_counter) -> None:
        self.core = core
        self._token = service_token.encode()
        self._bearer = b"Bearer " + self._token
        self._perf_clock = perf_clock
        self.metrics = _Metrics(core)

    def app(self, *, scheduling: bool = True) -> web.Application:
        """The routes; without `scheduling` (a standalone rescheduler) only the probes."""
        app = web.Application(client_max_size=MAX_BODY_BYTES,
                              middlewares=[self._errors, self._auth])
        if scheduling:
            app.router.add_post("/schedule", self.schedule)
            app.router.add_post("/release", self.release)
            app.router.add_post("/report", self.report)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        return app

    # ---- middlewares -------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Unknown routes and bugs answer JSON too, never an HTML page or a traceback."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return _error(e.status, e.reason)
        except Exception:
            _log.exception("%s %s failed", request.method, request.path)
            return _error(500, "internal scheduler error", "internal_error")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token and request.path not in _OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not (hmac.compare_digest(given, self._token)
                    or hmac.compare_digest(given, self._bearer)):
                return _error(401, "missing or wrong service token in the Authorization header",
                              "authentication_error")
        return await handler(request)

    # ---- routes ------------------------------------------------------------------------------

    async def schedule(self, request: web.Request) -> web.Response:
        started = self._perf_clock()
        response, outcome = await self._schedule(await request.read())
        self.metrics.schedules.labels(outcome).inc()
        self.metrics.latency.observe(self._perf_clock() - started)
        return response

    async def _schedule(self, body: bytes) -> tuple[web.Response, str]:
        try:
            job = _SCHEDULE_DECODER.decode(body)
            job.scheduling_result = await self.core.schedule(job)
        except msgspec.DecodeError as e:
            return _error(400, f"invalid /schedule body: {e}"), "bad_request"
        except InvalidScheduleRequestError as e:
            return _error(400, str(e)), "bad_request"
        except NoInstanceAvailableError as e:
            return _error(429, str(e), "no_instance_available"), "no_instance"
        except SchedulerUnavailableError as e:
            return _error(400, str(e), "scheduler_unavailable"), "unavailable"
        return _json(_ENCODER.encode(job)), "ok"

    async def release(self, request: web.Request) -> web.Response:
        try:
            job = _SCHEDULE_DECODER.decode(await request.read())
        except msgspec.DecodeError as e:
            return _error(400, f"invalid /release body: {e}")
        await self.core.release(job)
        self.metrics.releases.inc()
        return _json(_EMPTY)

    async def report(self, request: web.Request) -> web.Response:
        try:
            items = _REPORT_DECODER.decode(await request.read())
        except msgspec.DecodeError as e:
            return _error(400, f"invalid /report body: {e}")
        await self.core.report(items)
        self.metrics.reports.inc(len(items))
        return _json(_EMPTY)

    async def health(self, request: web.Request) -> web.Response:
        ready = self.core.ready
        body = {"status": "ok" if ready else "unavailable",
                "mode": "full" if self.core.full_mode else "lite",
                "cms_available": self.core.cms_available,
                "instances": len(self.core.instances())}
        return _json(_ENCODER.encode(body), 200 if ready else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(core: SchedulerCore, *, service_token: str = "") -> web.Application:
    """The service's aiohttp application over a started (or soon started) core."""
    return SchedulerService(core, service_token=service_token).app()


async def serve(settings: SchedulerSettings, stop: asyncio.Event) -> None:
    """Start the core, listen on `--host:--port` until `stop` is set, then shut down cleanly.

    With `--enable-rescheduling` (full mode) the rescheduler runs here too: beside the
    scheduling routes (colocated, the default), or alone with only `/health` and `/metrics`
    (`--standalone-rescheduling-mode`).

    Raises:
        ConfigError: a bad setting, or the port cannot be bound.
    """
    core = SchedulerCore(settings)
    service = SchedulerService(core, service_token=settings.service_token)
    runner: web.AppRunner | None = None
    rescheduler = _rescheduler(core, settings, service.metrics)
    task: asyncio.Task[None] | None = None
    try:
        await core.start()
        standalone = rescheduler is not None and settings.standalone_rescheduling_mode
        runner = web.AppRunner(service.app(scheduling=not standalone), access_log=None,
                               handle_signals=False)
        await runner.setup()
        await _listen(runner, settings.host, settings.port)
        if rescheduler is not None:
            task = asyncio.create_task(rescheduler.run(), name="prescient-rescheduler")
        mode = "full" if core.full_mode else "lite"
        role = ("rescheduler" if standalone else
                "scheduler + rescheduler" if rescheduler is not None else "scheduler")
        _log.info("%s listening on %s:%d (%s mode, policy %s, %d instances)", role,
                  settings.host, settings.port, mode, settings.scheduling_policy,
                  len(core.instances()))
        await stop.wait()
        _log.info("scheduler shutting down")
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if rescheduler is not None:
            await rescheduler.close()
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        await core.close()


def _rescheduler(core: SchedulerCore, settings: SchedulerSettings,
                 metrics: _Metrics) -> LiveRescheduler | None:
    """The rescheduler `settings` ask for, or None (off, or lite mode: warned)."""
    if not settings.enable_rescheduling:
        if settings.standalone_rescheduling_mode:
            raise ConfigError("--standalone-rescheduling-mode needs --enable-rescheduling")
        return None
    if not core.full_mode:
        _log.warning("--enable-rescheduling needs full mode (the CMS's statuses); "
                     "rescheduling is off")
        return None

    def count(plan: MigrationPlan, outcome: str) -> None:
        metrics.migrations.labels(plan.rule, plan.order, plan.trigger, outcome).inc()

    return LiveRescheduler(core, settings, on_outcome=count)


async def _listen(runner: web.AppRunner, host: str, port: int) -> None:
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port}: "
                          f"{e.strerror or e}") from None
