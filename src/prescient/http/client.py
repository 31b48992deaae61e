"""An upstream HTTP/1.1 client with per-(host, port) keep-alive pools, on Protocols + httptools.

The gateway's other half: one request out per client request, the response body either read
whole or passed through chunk by chunk (SSE). Why not aiohttp's ClientSession: its response
objects and StreamReader are most of its 165 µs per proxied request (router-bench §4.3).

A connection goes back to its pool only after a complete response, so a response that fails or
is aborted never leaks a half-read stream into the next request. Errors tell the caller whether a
retry is safe:

- `UpstreamConnectError`: no response byte came back (refused, timed out, reset). The engine
  did not answer, so the gateway may retry elsewhere.
- `UpstreamClosedError`: the connection died mid-response; `UpstreamProtocolError`: the
  upstream spoke bad HTTP. Both after the response began: not retryable once the client saw bytes.

An engine that stops answering without closing the connection (hung, or its host gone without a
FIN) would hold the request forever. The pool watches every connection with an exchange in
flight: one that has received no byte for `read_timeout_s` is closed, failing the request with
`UpstreamConnectError` if no response byte came yet (retryable elsewhere) or
`UpstreamClosedError` mid-response. Upstream Llumnix's gateway allows 15 min for the response
head and 5 min between SSE reads; one inactivity timeout covers both.

A pooled connection can be closed by the server while idle (uvicorn, which serves vLLM, closes
idle keep-alive connections after 5 s); if the server's FIN has not arrived yet, our request goes
out on a dead socket. Two guards: idle connections older than `idle_timeout_s` are dropped, and a
reused connection that fails before any response byte is retried once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Protocol

import httptools

from prescient.errors import PrescientError
from prescient.http.headers import HeaderItems, header_items

HIGH_WATER = 1 << 20  # buffered response bytes at which reading from the upstream pauses
LOW_WATER = 1 << 18


class UpstreamError(PrescientError):
    """An upstream request failed."""


class UpstreamConnectError(UpstreamError):
    """No response byte arrived (refused, timeout, reset before the response); retryable."""


class UpstreamClosedError(UpstreamError):
    """The connection was lost after the response began (or the response was aborted)."""


class UpstreamProtocolError(UpstreamError):
    """The upstream sent something that is not valid HTTP."""


class AbortSignal(Protocol):
    """Tells a request to give up: the gateway's client `Request` (its client left)."""

    @property
    def is_disconnected(self) -> bool: ...

    def on_disconnect(self, callback: Callable[[], object]) -> None: ...


class UpstreamResponse:
    """A response whose head has arrived; the body arrives as it comes."""

    __slots__ = ("_buffer", "_buffered", "_conn", "_done", "_error", "_waiter", "headers",
                 "status")

    def __init__(self, conn: _UpstreamConnection, status: int, headers: dict[str, str]) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers  # lower-cased names
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def complete(self) -> bool:
        """The whole body has arrived."""
        return self._done and self._error is None

    def body_now(self) -> bytes | None:
        """The whole body if it has all arrived (typical of a short answer: it came with the
        head), else None (then `await read()`). Saves a coroutine per response."""
        if self._done and self._error is None:
            buffer = self._buffer
            data = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
            buffer.clear()
            return data
        return None

    async def read(self) -> bytes:
        """The whole (de-chunked) body."""
        data = self.body_now()
        if data is not None:
            return data
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_chunk(self) -> bytes:
        """Everything that arrived since the last call (waits for at least one byte); b"" at
        the end of the body. Joining what is buffered merges small SSE events into one write."""
        while not self._buffer:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = self._conn.loop.create_future()
            await self._waiter
        buffer = self._buffer
        data = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._buffered = 0
        self._conn.consumed()
        return data

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (de-chunked)."""
        while chunk := await self.read_chunk():
            yield chunk

    def abort(self) -> None:
        """Close the connection if the response is not complete: the upstream sees the
        disconnect (an engine aborts the request). Later reads raise `UpstreamClosedError`."""
        if not self._done:
            self._fail(UpstreamClosedError("response aborted"))
            self._conn.close()

    # --- fed by the connection ----------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if not self._done:
            self._done = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


class _NoResponse(Exception):
    """The connection ended (or failed) before any response byte: maybe a stale keep-alive."""


class _UpstreamConnection(asyncio.Protocol):
    """One pooled connection; serves one request at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.key = key
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.closed = False
        self.busy = False  # an exchange is in progress (request sent, response not complete)
        self.exchanges = 0  # requests sent so far on this connection
        self.idle_since = 0.0
        self.last_activity = 0.0  # loop time of the last request sent or byte received
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._headers: dict[str, str] = {}
        self._got_bytes = False
        self._paused = False
        self._eof_delimited = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> asyncio.Future[UpstreamResponse]:
        """Write a request; the future resolves with the response head."""
        self._head = self.loop.create_future()
        self._response = None
        self._got_bytes = False
        self.exchanges += 1
        self.busy = True
        self.last_activity = self.loop.time()
        self.transport.write(data)
        return self._head

    def abort_exchange(self, exchange: int) -> None:
        """Close the connection if its `exchange`-th exchange is still running."""
        if self.exchanges == exchange and self.busy:
            self.close()

    def data_received(self, data: bytes) -> None:
        if self._head is None and self._response is None:
            self.close()  # bytes nobody asked for: the stream is out of sync
            return
        self._got_bytes = True
        self.last_activity = self.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._lost(UpstreamProtocolError(f"bad HTTP from {self.key[0]}:{self.key[1]}: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        response = self._response
        if response is not None and self._eof_delimited and not response._done:
            response._finish()  # a body without length or chunking ends at EOF
            return
        reason = f"{type(exc).__name__}: {exc}" if exc else "closed by peer"
        self._lost(UpstreamClosedError(
            f"connection to {self.key[0]}:{self.key[1]} lost mid-response ({reason})"))

    def time_out(self, after_s: float) -> None:
        """No byte for `after_s` seconds: fail the exchange and close the connection."""
        where = f"{self.key[0]}:{self.key[1]}"
        head = self._head
        if head is not None and not head.done() and not self._got_bytes:
            head.set_exception(UpstreamConnectError(
                f"{where} sent no response for {after_s:g} s"))  # retryable, not a stale socket
            self._head = None
        self._lost(UpstreamClosedError(f"{where} sent nothing for {after_s:g} s"))
        self.close()

    def _lost(self, error: UpstreamError) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error if self._got_bytes else _NoResponse(str(error)))
        self._head = None
        if self._response is not None:
            self._response._fail(error)
            self._response = None

    # --- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = {}

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 1xx interim responses (100 Continue): the real one follows
            return
        headers = self._headers
        self._eof_delimited = ("content-length" not in headers
                               and "transfer-encoding" not in headers)
        response = self._response = UpstreamResponse(self, status, headers)
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is None:  # end of a 1xx
            return
        self._response = None
        self.busy = False
        keep_alive = self._parser.should_keep_alive()
        response._finish()
        if keep_alive and not self.closed:
            self.resume()
            self.pool.put_back(self)
        else:
            self.close()

    # --- flow control -------------------------------------------------------------------------

    def pause(self) -> None:
        if not self._paused and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def consumed(self) -> None:
        if self._paused:
            self.resume()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections per (host, port); at most `max_idle_per_host` idle ones kept."""

    def __init__(self, *, max_idle_per_host: int = 1024, idle_timeout_s: float = 4.0,
                 read_timeout_s: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 ) -> None:
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout_s = idle_timeout_s
        self.read_timeout_s = read_timeout_s  # no byte for this long fails the exchange
        self._watchdog: asyncio.TimerHandle | None = None
        self._clock = clock
        self._idle: dict[tuple[str, int], list[_UpstreamConnection]] = {}
        self._all: set[_UpstreamConnection] = set()
        self._closed = False

    async def request(self, host: str, port: int, method: str, path: str,
                      headers: HeaderItems | bytes = None, body: bytes = b"", *,
                      connect_timeout: float = 3.0,
                      abort_when: AbortSignal | None = None) -> UpstreamResponse:
        """Send a request; returns once the response head has arrived.

        `headers`: (name, value) pairs, a mapping, or a rendered header block
        (`b"name: value\\r\\n..."`); `host` and `content-length` are set here.

        `abort_when` (e.g. the client's server `Request`): when it signals a disconnect
        before the response is complete, the connection is closed, so the upstream sees the
        disconnect.

        Raises:
            UpstreamConnectError: connecting failed, or the connection ended before any
                response byte (after one transparent retry if it was a reused connection).
            UpstreamClosedError: the connection died during the response head, or
                `abort_when` resolved.
            UpstreamProtocolError: the response head is not valid HTTP.
        """
        if self._closed:
            raise UpstreamConnectError("the upstream pool is closed")
        if self._watchdog is None:
            self._watch()
        key = (host, port)
        data = _request_bytes(host, port, method, path, headers, body)
        if abort_when is not None and abort_when.is_disconnected:
            raise UpstreamClosedError("aborted before sending")
        conn = self._take_idle(key)
        if conn is not None:
            try:
                return await self._exchange(conn, data, abort_when)
            except _NoResponse:
                if abort_when is not None and abort_when.is_disconnected:
                    raise UpstreamClosedError("aborted before the response") from None
                # a stale keep-alive connection: once more on a fresh one
        conn = await self._connect(key, connect_timeout)
        try:
            return await self._exchange(conn, data, abort_when)
        except _NoResponse as e:
            if abort_when is not None and abort_when.is_disconnected:
                raise UpstreamClosedError("aborted before the response") from None
            raise UpstreamConnectError(f"{host}:{port} closed before answering: {e}") from None

    @staticmethod
    def _exchange(conn: _UpstreamConnection, data: bytes,
                  abort_when: AbortSignal | None) -> asyncio.Future[UpstreamResponse]:
        """Send; the future resolves with the head. An abort fails it with `_NoResponse` (no
        byte yet) or `UpstreamClosedError`, so `request` checks `abort_when` before retrying."""
        head = conn.send(data)
        if abort_when is not None:
            abort_when.on_disconnect(partial(conn.abort_exchange, conn.exchanges))
        return head

    def put_back(self, conn: _UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= self.max_idle_per_host:
            conn.close()
            return
        conn.idle_since = self._clock()
        idle.append(conn)

    def forget(self, conn: _UpstreamConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _watch(self) -> None:
        """Close busy connections silent for `read_timeout_s`; runs every quarter timeout (at
        most every second), so one timer serves every connection."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        limit = self.read_timeout_s
        for conn in [c for c in self._all if c.busy and now - c.last_activity > limit]:
            conn.time_out(limit)
        if not self._closed:
            self._watchdog = loop.call_later(min(1.0, self.read_timeout_s / 4), self._watch)

    async def close(self) -> None:
        """Close every connection, idle or busy."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for conn in list(self._all):
            conn.close()
        self._idle.clear()

    def _take_idle(self, key: tuple[str, int]) -> _UpstreamConnection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest_ok = self._clock() - self.idle_timeout_s
        while idle:
            conn = idle.pop()  # newest first: the least likely to be closed by the server
            if not conn.closed and conn.idle_since >= oldest_ok:
                return conn
            conn.close()
        return None

    async def _connect(self, key: tuple[str, int], timeout: float) -> _UpstreamConnection:
        loop = asyncio.get_running_loop()
        host, port = key
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _UpstreamConnection(self, key, loop), host, port)
        except TimeoutError:
            raise UpstreamConnectError(
                f"connecting to {host}:{port} timed out after {timeout:g} s") from None
        except OSError as e:
            raise UpstreamConnectError(
                f"cannot connect to {host}:{port}: {e.strerror or e}") from None
        self._all.add(conn)
        return conn


def _request_bytes(host: str, port: int, method: str, path: str,
                   headers: HeaderItems | bytes, body: bytes) -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\n"
            f"content-length: {len(body)}\r\n").encode("latin-1")
    if not headers:
        return head + b"\r\n" + body
    if not isinstance(headers, bytes):
        headers = "".join([f"{k}: {v}\r\n" for k, v in header_items(headers)]).encode("latin-1")
    return b"".join((head, headers, b"\r\n", body))
