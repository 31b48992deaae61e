"""Forwarding one scheduled request: retries before the first byte, then pass-through.

An attempt forwards the client's body unchanged to the chosen instance, on the client's path,
with `x-request-id` forced to the id the scheduler accounted (so the engine's ids and the
scheduler's local account agree, §8.1). Until the first byte goes to the client, a failure
(connection refused or reset, a 5xx, a body cut short) is retried on another instance: the
scheduler's account of the failed attempt is released first, the instance is avoided, and the
pause is min(10 ms·2^n, 100 ms), as upstream. After the first byte nothing is retried: a stream
cut short ends with an SSE error event.

Streams are copied as they arrive, the backend's chunks merged when several are waiting (one
write instead of many); the only inspection is counting event ends (`\\n\\n`, which JSON cannot
contain unescaped) for the TPOT metric and lite-mode token reports.

Release (`Scheduler.release`): after a failed attempt; when the client left before the first
byte; and, in lite mode, at the end of every request (upstream forgets this one, §11.9). In full
mode a served request is never released: the engine's next CMS status retires it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prescient.gateway.balancer import Address, Balancer, NoWorkerError
from prescient.gateway.metrics import GatewayMetrics
from prescient.http.client import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from prescient.http.server import Request, Response
from prescient.openai_api import error_body
from prescient.scheduler.wire import LLMInstance, ReportItem, Scheduler, ScheduleRequest

log = logging.getLogger(__name__)

CLIENT_GONE = 499  # nginx's "client closed request", for metrics and logs only

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the client sets for its own connection;
# accept-encoding is dropped so the engine answers uncompressed bytes we can count.
_NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect",
    "accept-encoding", "x-request-id"})


def forward_headers(headers: dict[str, str], request_id: str) -> list[tuple[str, str]]:
    """The client's end-to-end headers, with `x-request-id: request_id`."""
    out = [(k, v) for k, v in headers.items() if k not in _NOT_FORWARDED]
    out.append(("x-request-id", request_id))
    return out


class _Retry:
    """An attempt failed before anything reached the client."""

    __slots__ = ("error", "reason")

    def __init__(self, reason: str, error: str) -> None:
        self.reason = reason  # metrics label
        self.error = error


class Proxy:
    """Sends scheduled requests to instances and their answers back to clients."""

    def __init__(self, balancer: Balancer, pool: UpstreamPool, metrics: GatewayMetrics, *,
                 retry_max_count: int, connect_timeout: float, full_mode: bool,
                 scheduler: Scheduler | None = None, report_interval_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.balancer = balancer
        self.pool = pool
        self.metrics = metrics
        self.retry_max_count = retry_max_count
        self.connect_timeout = connect_timeout
        self.full_mode = full_mode
        self.scheduler = scheduler
        self.report_interval_s = report_interval_s if not full_mode else 0.0
        self._clock = clock
        self._background: set[asyncio.Task[None]] = set()

    async def forward(self, request: Request, response: Response, schedule: ScheduleRequest,
                      stream: bool, started: float) -> int:
        """Place, forward and answer; returns the status the client got (499: it left)."""
        headers = forward_headers(request.headers, schedule.id)
        avoid: list[Address] = []
        last: _Retry | None = None
        metrics, clock = self.metrics, self._clock
        for attempt in range(self.retry_max_count + 1):
            if attempt:
                metrics.retries += 1
                await asyncio.sleep(min(0.01 * 2 ** (attempt - 1), 0.1))
            t = clock()
            try:
                instance, accounted = await self.balancer.pick(schedule, avoid)
            except NoWorkerError as e:
                metrics.error("no_instance")
                response.send(503, error_body(503, str(e), type="service_unavailable"))
                return 503
            metrics.schedule_seconds.observe(clock() - t)
            outcome = await self._attempt(request, response, instance, headers, schedule,
                                          stream, started, attempt == self.retry_max_count)
            if not isinstance(outcome, _Retry):
                if accounted and not self.full_mode:
                    await self.balancer.release(schedule, instance)
                return outcome
            if accounted:
                await self.balancer.release(schedule, instance)
            if request.is_disconnected:
                return CLIENT_GONE
            metrics.error(outcome.reason)
            log.info("request %s: %s:%d failed (%s), attempt %d of %d", schedule.id,
                     instance.endpoint.host, instance.endpoint.port, outcome.error, attempt + 1,
                     self.retry_max_count + 1)
            avoid.append((instance.endpoint.host, instance.endpoint.port))
            last = outcome
        message = f"upstream failed after {self.retry_max_count + 1} attempts: " + (
            last.error if last else "")
        response.send(502, error_body(502, message, type="upstream_error"))
        return 502

    async def _attempt(self, request: Request, response: Response, instance: LLMInstance,
                       headers: list[tuple[str, str]], schedule: ScheduleRequest, stream: bool,
                       started: float, final: bool, body: bytes | None = None) -> int | _Retry:
        """One try on `instance` with the client's body (or `body`, a rewritten one)."""
        endpoint = instance.endpoint
        if request.is_disconnected:
            return _Retry("client_disconnect", "client left before forwarding")
        try:
            upstream = await self.pool.request(
                endpoint.host, endpoint.port, "POST", request.path, headers,
                request.body if body is None else body,
                connect_timeout=self.connect_timeout, abort_when=request.disconnected)
        except UpstreamConnectError as e:
            self.balancer.mark_failed((endpoint.host, endpoint.port))
            return _Retry("upstream_connect", str(e))
        except UpstreamError as e:
            return _Retry("upstream_closed", str(e))
        if upstream.status >= 500 and not final:
            try:
                text = (await upstream.read())[:200].decode("utf-8", "replace")
            except UpstreamError:
                text = ""
            return _Retry("upstream_status", f"HTTP {upstream.status} {text}".strip())
        if stream and upstream.status == 200:
            return await self._stream(request, response, upstream, instance, schedule, started)
        return await self._whole(request, response, upstream, schedule.id)

    async def _whole(self, request: Request, response: Response, upstream: UpstreamResponse,
                     request_id: str) -> int | _Retry:
        try:
            body = await upstream.read()
        except UpstreamError as e:
            return _Retry("upstream_closed", str(e))
        response.send(upstream.status, body, (("x-request-id", request_id),),
                      upstream.headers.get("content-type", "application/json"))
        return upstream.status

    async def _stream(self, request: Request, response: Response, upstream: UpstreamResponse,
                      instance: LLMInstance, schedule: ScheduleRequest,
                      started: float) -> int | _Retry:
        try:
            chunk = await upstream.read_chunk()
        except UpstreamError as e:
            return _Retry("upstream_closed", str(e))
        clock = self._clock
        first = clock()
        self.metrics.ttft_seconds.observe(first - started)
        response.start(upstream.status, (("x-request-id", schedule.id),),
                       upstream.headers.get("content-type", "text/event-stream"))
        reporter = (_Reporter(self, schedule, instance, first)
                    if self.report_interval_s > 0 and self.scheduler is not None else None)
        events, last, tail = 0, first, b""
        try:
            while chunk:
                response.write(chunk)
                events += chunk.count(b"\n\n")
                tail = chunk
                last = clock()
                if reporter is not None:
                    reporter.update(events, last)
                await response.drain()
                chunk = await upstream.read_chunk()
        except UpstreamError as e:
            return self._cut_short(request, response, tail, e)
        response.end()
        if tail.endswith(b"data: [DONE]\n\n"):
            events -= 1
        if events > 1:
            self.metrics.tpot_seconds.observe((last - first) / (events - 1))
        return upstream.status

    def _cut_short(self, request: Request, response: Response, tail: bytes,
                   error: UpstreamError) -> int:
        """The stream broke after bytes reached the client: tell it in-band, if it is there."""
        if request.is_disconnected:
            return CLIENT_GONE
        self.metrics.error("upstream_closed")
        sep = b"" if not tail or tail.endswith(b"\n\n") else b"\n\n"
        body = error_body(502, f"upstream stream cut short: {error}", type="upstream_error")
        response.write(sep + b"data: " + body + b"\n\ndata: [DONE]\n\n")
        response.end()
        return 502

    def spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _Reporter:
    """Lite mode: tell the scheduler a stream's token count every `report_interval_s`."""

    __slots__ = ("_due", "_instance", "_proxy", "_schedule")

    def __init__(self, proxy: Proxy, schedule: ScheduleRequest, instance: LLMInstance,
                 now: float) -> None:
        self._proxy = proxy
        self._schedule = schedule
        self._instance = instance
        self._due = now + proxy.report_interval_s

    def update(self, events: int, now: float) -> None:
        if now < self._due:
            return
        proxy = self._proxy
        self._due = now + proxy.report_interval_s
        assert proxy.scheduler is not None
        item = ReportItem(id=self._schedule.id, model=self._schedule.model,
                          instance_id=self._instance.id, gateway_id=self._schedule.gateway_id,
                          num_tokens=self._schedule.prompt_num_tokens + events)
        proxy.spawn(proxy.scheduler.report([item]))
