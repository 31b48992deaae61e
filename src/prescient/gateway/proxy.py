"""Forwarding one scheduled request: retries before the first byte, then pass-through.

An attempt forwards the client's body unchanged to the chosen instance, on the client's path,
with `x-request-id` forced to the id the scheduler accounted (so the engine's ids and the
scheduler's local account agree, §8.1). Until the first byte goes to the client, a failure
(connection refused or reset, a 5xx, a body cut short) is retried on another instance: the
scheduler's account of the failed attempt is released first, the instance is avoided, and the
pause is min(10 ms·2^n, 100 ms), as upstream. After the first byte, a stream whose upstream
breaks (not one whose client left, nor one past the upstream's `[DONE]`) is replayed
(gateway/replay.py): the failed attempt is released, the request placed again avoiding the
instance, and a continuation (prompt + text so far, fewer tokens) resumes the stream, at most
`--retry-max-count` times per request. A stream that cannot be resumed ends with an SSE error
event. A non-streamed body cut short is retried whole: nothing reached the client yet.

Migration by token replay (`migrate`, the gateway's `POST /admin/migrate`) uses the same path
on purpose: the live upstream is aborted (the engine sees the disconnect and frees the request)
and the stream resumes elsewhere, placed by the scheduler, never on the source. It is how a
running request moves between engines that cannot move KV; migrations do not count against
`--retry-max-count` nor as errors.

Streams are copied as they arrive, the backend's chunks merged when several are waiting (one
write instead of many), counting event ends (`\\n\\n`, which JSON cannot contain unescaped)
for the TPOT metric and lite-mode token reports. A replayable stream is also read event by
event (its text and token count), and goes out in whole events only.

Release (`Scheduler.release`): after a failed attempt; when the client left before the first
byte; and at the end of every request in lite mode (upstream forgets this one, §11.9) and with
an embedded scheduler (a call, no round trip). A remote full-mode scheduler is not told of a
served request: the engine's next CMS status retires it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prescient.gateway.balancer import Address, Balancer, NoWorkerError
from prescient.gateway.metrics import GatewayMetrics
from prescient.gateway.replay import Replay
from prescient.http.client import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from prescient.http.server import Request, Response
from prescient.openai_api import error_body
from prescient.scheduler.wire import LLMInstance, ReportItem, Scheduler, ScheduleRequest
from prescient.tokenizer import ApproxTokenizer, Tokenizer

log = logging.getLogger(__name__)

CLIENT_GONE = 499  # nginx's "client closed request", for metrics and logs only

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the client sets for its own connection;
# accept-encoding is dropped so the engine answers uncompressed bytes we can count.
_NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect",
    "accept-encoding", "x-request-id"})


def forward_headers(headers: dict[str, str], request_id: str) -> bytes:
    """The client's end-to-end headers, with `x-request-id: request_id`, as the header block
    of the upstream request ("name: value\\r\\n" lines): rendered once, sent by each attempt."""
    block = "".join([f"{k}: {v}\r\n" for k, v in headers.items() if k not in _NOT_FORWARDED])
    return f"{block}x-request-id: {request_id}\r\n".encode("latin-1")


def id_header(request_id: str) -> bytes:
    """The response's `x-request-id` header line."""
    return b"x-request-id: %b\r\n" % request_id.encode("latin-1")


class _Retry:
    """An attempt failed before anything reached the client."""

    __slots__ = ("error", "reason")

    def __init__(self, reason: str, error: str) -> None:
        self.reason = reason  # metrics label
        self.error = error


class _Cut:
    """A replayable stream broke after bytes reached the client (or was cut to migrate it)."""

    __slots__ = ("error", "migrated")

    def __init__(self, error: str, *, migrated: bool = False) -> None:
        self.error = error
        self.migrated = migrated


class _Live:
    """A replayable stream being forwarded now: what `Proxy.migrate` cuts."""

    __slots__ = ("instance", "migrating", "upstream")

    def __init__(self, upstream: UpstreamResponse, instance: LLMInstance) -> None:
        self.upstream = upstream
        self.instance = instance
        self.migrating = False


class Proxy:
    """Sends scheduled requests to instances and their answers back to clients."""

    def __init__(self, balancer: Balancer, pool: UpstreamPool, metrics: GatewayMetrics, *,
                 retry_max_count: int, connect_timeout: float, full_mode: bool,
                 scheduler: Scheduler | None = None, report_interval_s: float = 0.0,
                 tokenizer: Tokenizer | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.balancer = balancer
        self.pool = pool
        self.metrics = metrics
        self.retry_max_count = retry_max_count
        self.connect_timeout = connect_timeout
        self.scheduler = scheduler
        # Upstream's full-mode gateway releases only failed forwards and leaves finished ones to
        # the CMS reconciliation, sparing a round trip per request; an in-process scheduler
        # takes the release as a call, and its account then drops requests that finished
        # between two statuses at once instead of counting them until they expire (10 s).
        self.release_finished = not full_mode or getattr(scheduler, "in_process", False)
        self.report_interval_s = report_interval_s if not full_mode else 0.0
        # counts the tokens of a replayed stream whose chunks carry no usage
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else ApproxTokenizer()
        self._clock = clock
        self._background: set[asyncio.Task[None]] = set()
        self._live: dict[str, _Live] = {}  # replayable streams in flight, by request id

    def migrate(self, request_id: str) -> LLMInstance | None:
        """Cut request `request_id`'s stream from its instance so that it resumes on another
        (by token replay); the instance it leaves, or None when no replayable stream of that
        id is being forwarded."""
        live = self._live.get(request_id)
        if live is None or live.migrating:
            return None
        live.migrating = True
        live.upstream.abort()
        return live.instance

    async def forward(self, request: Request, response: Response, schedule: ScheduleRequest,
                      stream: bool, started: float) -> int:
        """Place, forward and answer; returns the status the client got (499: it left)."""
        headers = forward_headers(request.headers, schedule.id)
        avoid: list[Address] = []
        replay = self._replay(request) if stream else None
        outcome = await self._place(request, response, schedule, headers, avoid, stream,
                                    started, replay)
        replays = 0
        while isinstance(outcome, _Cut):
            assert replay is not None
            if request.is_disconnected:
                return CLIENT_GONE
            if replay.finished:  # generation was over; only the trailer was lost
                response.write(b"data: [DONE]\n\n")
                response.end()
                return 200
            allowed = outcome.migrated or replays < self.retry_max_count
            body = replay.continuation() if allowed else None
            if body is None:
                return self._cut_short(request, response, b"", outcome.error, counted=True)
            if outcome.migrated:
                self.metrics.migrations += 1
                log.info("request %s: migrating by token replay", schedule.id)
            else:
                replays += 1
                self.metrics.replays += 1
                log.info("request %s: stream broken (%s), replay %d of %d", schedule.id,
                         outcome.error, replays, self.retry_max_count)
            outcome = await self._place(request, response, schedule, headers, avoid, stream,
                                        started, replay, body)
        return outcome

    def _replay(self, request: Request) -> Replay | None:
        """Replay state for a stream that may be resumed (None: it may not)."""
        if self.retry_max_count < 1:
            return None
        if request.path.endswith("/chat/completions"):
            return Replay.of("chat", request.body, self.tokenizer)
        if request.path.endswith("/completions"):
            return Replay.of("completion", request.body, self.tokenizer)
        return None

    async def _place(self, request: Request, response: Response, schedule: ScheduleRequest,
                     headers: bytes, avoid: list[Address], stream: bool,
                     started: float, replay: Replay | None,
                     body: bytes | None = None) -> int | _Cut:
        """Schedule and send, retrying on other instances until an answer starts (or, for a
        continuation, until its stream resumes)."""
        last: _Retry | None = None
        metrics, clock = self.metrics, self._clock
        resuming = body is not None
        for attempt in range(self.retry_max_count + 1):
            if attempt:
                metrics.retries += 1
                await asyncio.sleep(min(0.01 * 2 ** (attempt - 1), 0.1))
            t = clock()
            try:
                instance, accounted = await self.balancer.pick(schedule, avoid)
            except NoWorkerError as e:
                metrics.error("no_instance")
                if resuming:
                    return self._cut_short(request, response, b"", str(e))
                response.send(503, error_body(503, str(e), type="service_unavailable"))
                return 503
            metrics.schedule_seconds.observe(clock() - t)
            outcome = await self._attempt(
                request, response, instance, headers, schedule, stream, started,
                attempt == self.retry_max_count and not resuming, body, replay)
            if isinstance(outcome, _Cut):
                if accounted:
                    await self.balancer.release(schedule, instance)
                avoid.append((instance.endpoint.host, instance.endpoint.port))
                return outcome
            if not isinstance(outcome, _Retry):
                if accounted and self.release_finished:
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
        if resuming:
            return self._cut_short(request, response, b"", message)
        response.send(502, error_body(502, message, type="upstream_error"))
        return 502

    async def _attempt(self, request: Request, response: Response, instance: LLMInstance,
                       headers: bytes, schedule: ScheduleRequest, stream: bool,
                       started: float, final: bool, body: bytes | None = None,
                       replay: Replay | None = None) -> int | _Retry | _Cut:
        """One try on `instance` with the client's body (or `body`, a rewritten one); a
        continuation of `replay` when it has `resumed` (final is then False: any answer but a
        stream is retried, the client's response has started)."""
        endpoint = instance.endpoint
        if request.is_disconnected:
            return _Retry("client_disconnect", "client left before forwarding")
        try:
            upstream = await self.pool.request(
                endpoint.host, endpoint.port, "POST", request.path, headers,
                request.body if body is None else body,
                connect_timeout=self.connect_timeout, abort_when=request)
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
        if replay is not None and replay.resumed and upstream.status != 200:
            upstream.abort()
            return _Retry("upstream_status", f"HTTP {upstream.status} to a continuation")
        if stream and upstream.status == 200:
            return await self._stream(request, response, upstream, instance, schedule, started,
                                      replay)
        body = upstream.body_now()  # a whole answer, most often all there already
        if body is None:
            try:
                body = await upstream.read()
            except UpstreamError as e:
                return _Retry("upstream_closed", str(e))
        response.send(upstream.status, body, id_header(schedule.id),
                      upstream.headers.get("content-type", "application/json"))
        return upstream.status

    async def _stream(self, request: Request, response: Response, upstream: UpstreamResponse,
                      instance: LLMInstance, schedule: ScheduleRequest,
                      started: float, replay: Replay | None = None) -> int | _Retry | _Cut:
        try:
            chunk = await upstream.read_chunk()
        except UpstreamError as e:
            return _Retry("upstream_closed", str(e))
        clock = self._clock
        first = clock()
        if not response.started:
            self.metrics.ttft_seconds.observe(first - started)
            response.start(upstream.status, id_header(schedule.id),
                           upstream.headers.get("content-type", "text/event-stream"))
        reporter = (_Reporter(self, schedule, instance, first)
                    if self.report_interval_s > 0 and self.scheduler is not None else None)
        events, last, tail = 0, first, b""
        live = None
        if replay is not None:
            live = self._live[schedule.id] = _Live(upstream, instance)
        try:
            while chunk:
                if replay is not None:
                    chunk = replay.feed(chunk)
                response.write(chunk)
                events += chunk.count(b"\n\n")
                tail = chunk or tail
                last = clock()
                if reporter is not None:
                    reporter.update(events, last)
                await response.drain()
                chunk = await upstream.read_chunk()
        except UpstreamError as e:
            if replay is None or replay.done or request.is_disconnected:
                return self._cut_short(request, response, tail, str(e))
            return self._cut(live, str(e))
        finally:
            if live is not None and self._live.get(schedule.id) is live:
                del self._live[schedule.id]
        response.end()
        if tail.endswith(b"data: [DONE]\n\n"):
            events -= 1
        if events > 1:
            self.metrics.tpot_seconds.observe((last - first) / (events - 1))
        return upstream.status

    def _cut(self, live: _Live | None, error: str) -> _Cut:
        """A replayable stream's break: a migration, or a failure (counted)."""
        if live is not None and live.migrating:
            return _Cut(error, migrated=True)
        self.metrics.error("upstream_closed")
        return _Cut(error)

    def _cut_short(self, request: Request, response: Response, tail: bytes, error: str, *,
                   counted: bool = False) -> int:
        """The stream broke after bytes reached the client: tell it in-band, if it is there.
        (After the upstream's `[DONE]` the stream is whole: it just ends.) `counted`: the
        failure is in the error metrics already."""
        if tail.endswith(b"data: [DONE]\n\n"):  # whole, even if the client has left since
            response.end()
            return 200
        if request.is_disconnected:
            return CLIENT_GONE
        if not counted:
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
