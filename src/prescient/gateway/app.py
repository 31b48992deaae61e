"""The gateway's routes: the OpenAI endpoints, `/v1/models`, `/health` and `/metrics`.

`Gateway` holds what a request passes through (tokenizer, balancer, upstream pool, metrics)
and owns the scheduler and resolver it was given: `start()` starts them, `close()` closes
them. Building those from settings is `gateway.wiring`'s job, so tests hand in their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable

import msgspec

from prescient.config.gateway import GatewaySettings
from prescient.discovery.base import Resolver
from prescient.gateway.balancer import Balancer
from prescient.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from prescient.gateway.parse import Kind, parse_request
from prescient.gateway.pd import PdForwarder
from prescient.gateway.proxy import CLIENT_GONE, Proxy
from prescient.http.client import UpstreamError, UpstreamPool
from prescient.http.server import Listener, Request, Response, Router, serve
from prescient.openai_api import ApiError, error_body
from prescient.scheduler.wire import Scheduler, ScheduleRequest
from prescient.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Bodies this large are parsed and tokenized in a worker thread: a 100 KB prompt takes
# milliseconds to tokenize, which would stall every stream the event loop is copying.
OFFLOAD_BODY_BYTES = 64 * 1024
MODELS_TRIES = 3  # instances asked for /v1/models before answering from --served-model-name


class _MigrateBody(msgspec.Struct, forbid_unknown_fields=True):
    request_id: str


class Gateway:
    """The OpenAI-compatible gateway's request handling.

    Args:
        settings: the gateway's settings.
        scheduler: the scheduler to ask (embedded or remote); ignored with
            `--scheduling-policy round-robin`. None: round-robin over discovery.
        resolver: discovered instances (the fallback and round-robin candidates), or None.
        tokenizer: counts prompt tokens for scheduling.
        gateway_id: sent to the scheduler with each request (upstream: the gateway's ip:port).
        clock: seconds, monotonic (metrics).
    """

    def __init__(self, settings: GatewaySettings, *, scheduler: Scheduler | None,
                 resolver: Resolver | None, tokenizer: Tokenizer, gateway_id: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.resolver = resolver
        self.tokenizer = tokenizer
        self.gateway_id = gateway_id
        self._clock = clock
        self.metrics = GatewayMetrics()
        local_only = settings.scheduling_policy == "round-robin"
        self.balancer = Balancer(
            None if local_only else scheduler, resolver, self.metrics,
            wait_timeout_s=settings.wait_scheduling_timeout,
            wait_interval_s=settings.wait_scheduling_retry_interval, clock=clock)
        self.pool = UpstreamPool(read_timeout_s=settings.upstream_read_timeout)
        self.proxy = Proxy(
            self.balancer, self.pool, self.metrics, retry_max_count=settings.retry_max_count,
            connect_timeout=settings.connect_timeout,
            full_mode=settings.enable_full_mode_scheduling, scheduler=scheduler,
            report_interval_s=settings.requests_report_duration, tokenizer=tokenizer,
            clock=clock)
        self.pd = (PdForwarder(self.proxy, settings.pd_disagg_protocol,
                               staged=settings.separate_pd_scheduling)
                   if settings.pd_disagg_protocol else None)
        self._served = frozenset(settings.served_model_name)
        # token ids only where a scheduler reads them (an embedded one says; a remote may)
        self._forward_tokens = (settings.forward_tokens and scheduler is not None
                                and getattr(scheduler, "wants_token_ids", True))
        self._max_model_len = settings.max_model_len
        # ids for requests that bring none: a random prefix per gateway (several may share a
        # scheduler) and a counter, without a system call per request
        prefix, counter = os.urandom(8).hex(), itertools.count()
        self._new_id = lambda: f"{prefix}{next(counter):016x}"  # 32 hex digits
        self.router = self._routes()

    def _routes(self) -> Router:
        router = Router()
        # the handlers return `_handle`'s coroutine directly: one frame less per request
        router.add("POST", "/v1/completions", lambda rq, rs: self._handle(rq, rs, "completion"))
        router.add("POST", "/v1/chat/completions", lambda rq, rs: self._handle(rq, rs, "chat"))
        router.add("GET", "/v1/models", self.models)
        router.add("GET", "/health", self.health)
        router.add("GET", "/healthz", self.health)
        router.add("GET", "/metrics", self.prometheus)
        router.add("POST", "/admin/migrate", self.migrate)
        return router

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start discovery, then the scheduler (an embedded one reads the CMS once)."""
        if self.resolver is not None:
            await self.resolver.start()
        start = getattr(self.scheduler, "start", None)
        if start is not None:
            await start()

    async def serve(self, host: str, port: int) -> Listener:
        return await serve(self.router, host, port, max_body_bytes=self.settings.max_body_bytes,
                           backlog=self.settings.backlog)

    async def drain(self, grace_s: float) -> None:
        """Wait until no request is in flight, or `grace_s` passed (call after the listening
        server closed, before `close`)."""
        deadline = time.monotonic() + grace_s
        while self.metrics.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.metrics.in_flight:
            log.warning("shutting down with %d requests still in flight", self.metrics.in_flight)

    async def close(self) -> None:
        """Close upstream connections, the scheduler and discovery."""
        await self.pool.close()
        for part in (self.scheduler, self.resolver):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.close()

    # ---- the OpenAI endpoints ----------------------------------------------------------------

    async def _handle(self, request: Request, response: Response, kind: Kind) -> None:
        """Validate, tokenize, then place and forward (`Proxy.forward`)."""
        started = self._clock()
        metrics = self.metrics
        try:
            if len(request.body) < OFFLOAD_BODY_BYTES:
                parsed = parse_request(request.body, kind, self.tokenizer,
                                       served_models=self._served,
                                       max_model_len=self._max_model_len,
                                       want_ids=self._forward_tokens)
            else:  # a long prompt: tokenize off the event loop, other streams keep flowing
                parsed = await asyncio.to_thread(
                    parse_request, request.body, kind, self.tokenizer,
                    served_models=self._served, max_model_len=self._max_model_len,
                    want_ids=self._forward_tokens)
        except ApiError as e:
            metrics.error("bad_request")
            response.send(e.status, e.body())
            metrics.request_done(kind, e.status)
            return
        schedule = ScheduleRequest(
            id=request.headers.get("x-request-id") or self._new_id(), model=parsed.model,
            gateway_id=self.gateway_id, prompt_num_tokens=parsed.num_prompt_tokens,
            prompt_token_ids=parsed.prompt_ids)
        metrics.in_flight += 1
        try:
            forwarder = self.pd if self.pd is not None else self.proxy
            status = await forwarder.forward(request, response, schedule, parsed.stream, started)
        finally:
            metrics.in_flight -= 1
        metrics.request_done(kind, status)
        if status == CLIENT_GONE:
            log.info("request %s: the client disconnected first (499)", schedule.id)

    # ---- the rest ----------------------------------------------------------------------------

    async def models(self, request: Request, response: Response) -> None:
        """Proxied to an instance (round robin, as upstream); from `--served-model-name` when
        none answers."""
        candidates = self.balancer.candidates()
        for i in range(min(MODELS_TRIES, len(candidates))):
            instance = candidates[(self.balancer.next_index() + i) % len(candidates)]
            try:
                upstream = await self.pool.request(
                    instance.endpoint.host, instance.endpoint.port, "GET", "/v1/models",
                    connect_timeout=self.settings.connect_timeout)
                body = await upstream.read()
            except UpstreamError:
                continue
            if upstream.status == 200:
                response.send(200, body)
                self.metrics.request_done("models", 200)
                return
        if self._served:
            created = int(time.time())
            data = [{"id": name, "object": "model", "created": created, "owned_by": "prescient"}
                    for name in sorted(self._served)]
            response.send(200, msgspec.json.encode({"object": "list", "data": data}))
            self.metrics.request_done("models", 200)
            return
        response.send(503, error_body(503, "no inference instance answered /v1/models",
                                      type="service_unavailable"))
        self.metrics.request_done("models", 503)

    async def health(self, request: Request, response: Response) -> None:
        """200 when requests can be placed: a scheduler is set (a remote one, or an embedded
        one that is ready), or discovery knows at least one instance."""
        ready = bool(self.balancer.candidates())
        if self.balancer.scheduler is not None:
            ready = ready or getattr(self.scheduler, "ready", True)
        if ready:
            response.send(200, b'{"status":"ok"}')
        else:
            response.send(503, error_body(503, "no scheduler and no instance available",
                                          type="service_unavailable"))

    async def migrate(self, request: Request, response: Response) -> None:
        """`POST /admin/migrate {"request_id": ID}`: move a running stream to another instance
        by token replay (`Proxy.migrate`); 200 `{"request_id", "from"}`, 404 when no
        replayable stream of that id is being forwarded here. Needs `--admin-token`."""
        token = self.settings.admin_token
        if not token:
            response.send(403, error_body(403, "admin routes are disabled: start the gateway "
                                          "with --admin-token", type="permission_error"))
            return
        if request.headers.get("authorization") != f"Bearer {token}":
            response.send(401, error_body(401, "missing or wrong admin token",
                                          type="authentication_error"))
            return
        try:
            body = msgspec.json.decode(request.body, type=_MigrateBody)
        except msgspec.DecodeError as e:
            response.send(400, error_body(400, f"invalid body: {e}", param="request_id"))
            return
        source = self.proxy.migrate(body.request_id)
        if source is None:
            response.send(404, error_body(404, f"no stream of request {body.request_id!r} is "
                                          "being forwarded (finished, not streamed, or not "
                                          "replayable)", param="request_id"))
            return
        address = f"{source.endpoint.host}:{source.endpoint.port}"
        log.info("request %s: migration from %s requested", body.request_id, address)
        response.send(200, msgspec.json.encode({"request_id": body.request_id, "from": address}))

    async def prometheus(self, request: Request, response: Response) -> None:
        response.send(200, self.metrics.render(), content_type=CONTENT_TYPE)
