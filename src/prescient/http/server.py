"""A minimal HTTP/1.1 server on asyncio Protocols and httptools: the gateway's client side.

Why not aiohttp or Starlette: on the project machine they cost 165-190 µs of CPU per proxied
request against 17 µs for a raw uvloop + httptools byte pump (reference/router-bench.md), and the
gateway's budget is about 50 µs including scheduling. So this module does only what a JSON/SSE
proxy needs: keep-alive, in-order handling of pipelined requests, a body-size limit, chunked
streaming with write backpressure, and a disconnect signal a handler can hook to abort upstream
work. There is no middleware, no routing beyond an exact (method, path) map, no multipart.

A connection's requests run in a Task that, once its handler (`handler(request, response)`)
returns, waits for the connection's next request and runs that one too: a Task per request
cost about a microsecond more (Python 3.11 registers every task in a Python WeakSet), on
keep-alive connections that carry thousands. A request that comes while the last handler is
still busy after its response went out gets a Task of its own, so it never waits for that
handler. Requests pipelined on one connection queue up (reading pauses meanwhile) and start
one after another, so responses come back in order. Every accepted socket gets TCP_NODELAY:
with Nagle on, a small SSE event after the response head waits for the client's delayed ACK,
about 40 ms (router-bench §4.1).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from http import HTTPStatus

import httptools

from prescient.http.headers import HeaderItems, header_items
from prescient.openai_api import error_body

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
ACCEPT_RETRY_S = 1.0  # after accept() failed for want of file descriptors (asyncio's delay)

ErrorBody = Callable[[int, str], bytes]  # (status, message) -> body, e.g. an OpenAI error
Handler = Callable[["Request", "Response"], Awaitable[None]]

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class _Ready:
    """An awaitable that is done at once (cheaper than a coroutine that returns)."""

    def __await__(self) -> Generator[None, None, None]:
        return
        yield


_READY = _Ready()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


def _openai_error(status: int, message: str) -> bytes:
    return error_body(status, message)


class Request:
    """One parsed request. Headers are lower-cased names; repeated headers are comma-joined."""

    __slots__ = ("_conn", "_disconnected", "body", "headers", "method", "path", "query")

    def __init__(self, conn: HttpConnection, method: str, path: str, query: str,
                 headers: dict[str, str], body: bytes) -> None:
        self._conn = conn
        self._disconnected: asyncio.Future[None] | None = None
        self.method = method
        self.path = path
        self.query = query  # raw, without "?"
        self.headers = headers
        self.body = body

    @property
    def is_disconnected(self) -> bool:
        """True once the client's connection is gone."""
        return self._conn.closed

    def on_disconnect(self, callback: Callable[[], object]) -> None:
        """Call `callback()` once if the client goes away before this request's response is
        complete (at once if it has gone already): to abort upstream work.

        A plain callback, not a future: the gateway hooks one to every forwarded request.
        """
        conn = self._conn
        if conn.closed:
            callback()
        else:
            conn.watchers.append(callback)

    @property
    def disconnected(self) -> asyncio.Future[None]:
        """Resolves when the client goes away before the response is complete (see
        `on_disconnect`). Made on first use."""
        if self._disconnected is None:
            gone = self._disconnected = self._conn.loop.create_future()
            self.on_disconnect(lambda: gone.done() or gone.set_result(None))
        return self._disconnected


class Response:
    """Writes the response to one request: `send()` a whole one, or `start()`/`write()`/`end()`.

    Streaming uses chunked transfer encoding. `start()` only prepares the head; it goes out with
    the first `write()` (one segment instead of two), or at `drain()`/`end()`. Writes after the
    client left are dropped silently: check `Request.is_disconnected`, or hook
    `Request.disconnected`, to stop producing.
    """

    __slots__ = ("_conn", "_head", "_keep_alive", "finished", "started", "status")

    def __init__(self, conn: HttpConnection, keep_alive: bool) -> None:
        self._conn = conn
        self._keep_alive = keep_alive
        self._head = b""
        self.started = False
        self.finished = False
        self.status = 0

    def send(self, status: int, body: bytes, headers: HeaderItems | bytes = None,
             content_type: str = "application/json") -> None:
        """The whole response at once, with a Content-Length. `headers`: pairs, a mapping, or
        a rendered block (`b"name: value\\r\\n..."`)."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.finished = True
        self.status = status
        head = self._head_bytes(status, headers, content_type,
                                b"content-length: %d\r\n" % len(body))
        conn = self._conn
        if not conn.closed:
            if len(body) < 65536:
                conn.transport.write(head + body)
            else:
                conn.transport.write(head)
                conn.transport.write(body)
        conn.response_done(self._keep_alive)

    def start(self, status: int, headers: HeaderItems | bytes = None,
              content_type: str = "text/event-stream") -> None:
        """Begin a chunked response; the head is sent with the first `write()`."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        self._head = self._head_bytes(status, headers, content_type,
                                      b"transfer-encoding: chunked\r\n")

    def write(self, data: bytes) -> None:
        """Send one chunk (empty data is ignored: an empty chunk would end the body)."""
        if not data or self._conn.closed:
            return
        frame = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head:
            frame = self._head + frame
            self._head = b""
        self._conn.transport.write(frame)

    def drain(self) -> Awaitable[None]:
        """Wait while the client is not reading (the transport's buffer is over its limit).

        Mostly there is nothing to wait for: then no coroutine is made (one per forwarded
        chunk otherwise)."""
        conn = self._conn
        if not self._head and (not conn._write_paused or conn.closed):
            return _READY
        return self._drain()

    async def _drain(self) -> None:
        if self._head and not self._conn.closed:
            self._conn.transport.write(self._head)
            self._head = b""
        await self._conn.writable()

    def end(self) -> None:
        """Finish a chunked response; the connection moves on to the next request."""
        if self.finished:
            return
        self.finished = True
        conn = self._conn
        if not conn.closed:
            conn.transport.write(self._head + _LAST_CHUNK)
        self._head = b""
        conn.response_done(self._keep_alive)

    def abort(self) -> None:
        """Drop the connection (e.g. an upstream failed mid-stream: the client must not see a
        well-formed end of a truncated body)."""
        self.finished = True
        self._conn.close()

    def _head_bytes(self, status: int, headers: HeaderItems | bytes, content_type: str,
                    framing: bytes) -> bytes:
        if not headers:
            block = b""
        elif isinstance(headers, bytes):
            block = headers
        else:
            block = "".join([f"{k}: {v}\r\n" for k, v in header_items(headers)]
                            ).encode("latin-1")
        if not self._keep_alive:
            block += b"connection: close\r\n"
        elif self._conn.http10:
            block += b"connection: keep-alive\r\n"
        return b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\n%b%b\r\n" % (
            status, _REASONS.get(status, b"Unknown"), content_type.encode("latin-1"), framing,
            block)


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing and answer `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpConnection(asyncio.Protocol):
    """One client connection: parse, queue, run the handler per request, write responses."""

    def __init__(self, handler: Handler, loop: asyncio.AbstractEventLoop, max_body_bytes: int,
                 error: ErrorBody, registry: set[HttpConnection] | None = None) -> None:
        self.loop = loop
        self.registry = registry if registry is not None else set()
        self.last_active = 0.0  # loop.time() of the last byte in or response out
        self.handler = handler
        self.route = handler.route if isinstance(handler, Router) else None
        self.max_body_bytes = max_body_bytes
        self.error = error
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.closed = False
        self.http10 = False
        self.watchers: list[Callable[[], object]] = []  # Request.on_disconnect callbacks
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._busy = False  # a response is in progress
        self._queue: deque[tuple[Request, bool]] = deque()  # pipelined, not yet started
        self._task: asyncio.Task[None] | None = None  # the newest task (see the module doc)
        self._idle: asyncio.Future[tuple[Request, bool] | None] | None = None  # its wait
        self._continue_owed = False  # a queued request waits for "100 Continue"
        self._write_paused = False
        self._write_waiter: asyncio.Future[None] | None = None

    # --- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.registry.add(self)
        self.last_active = self.loop.time()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            reject = e.__context__
            if isinstance(reject, _Reject):
                self._fail(reject.status, reject.message)
            else:
                log.exception("HTTP parser callback failed", exc_info=reject)
                self._fail(500, "internal error")
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as e:
            self._fail(400, f"malformed HTTP request: {e}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.registry.discard(self)
        self._queue.clear()
        watchers, self.watchers = self.watchers, []
        for callback in watchers:
            try:
                callback()
            except Exception:
                log.exception("a disconnect callback failed")
        self._wake_writer()
        self._hand_over(None)  # an idle task ends

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    # --- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise _Reject(413, f"request body of {length} bytes is over the limit of "
                               f"{self.max_body_bytes} bytes")
        if self._headers.get("expect", "").lower() == "100-continue":
            if self._busy or self._queue:
                self._continue_owed = True
            else:
                self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.max_body_bytes:
            raise _Reject(413, f"request body is over the limit of {self.max_body_bytes} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        self.http10 = parser.get_http_version() == "1.0"
        path, _, query = self._url.decode("latin-1").partition("?")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(self, parser.get_method().decode("ascii"), path, query,
                          self._headers, body)
        keep_alive = parser.should_keep_alive()
        if self._busy:
            self._queue.append((request, keep_alive))
            self.transport.pause_reading()
        else:
            self._start(request, keep_alive)

    # --- request lifecycle --------------------------------------------------------------------

    def _start(self, request: Request, keep_alive: bool) -> None:
        self._busy = True
        if not self._hand_over((request, keep_alive)):
            self._task = self.loop.create_task(self._serve(request, keep_alive))

    def _hand_over(self, work: tuple[Request, bool] | None) -> bool:
        """Give `work` to the task waiting for the next request (None: the connection is
        gone); False when no task waits."""
        idle, self._idle = self._idle, None
        if idle is None or idle.done():
            return False
        idle.set_result(work)
        return True

    async def _serve(self, request: Request, keep_alive: bool) -> None:
        """Run `handler` for this request, then for each next one the connection hands over,
        while this is its newest task. (One frame: a handler's every resume passes through
        each frame above it.)"""
        task = asyncio.current_task()
        route = self.route
        while True:
            response = Response(self, keep_alive)
            # a Router is resolved here, saving a coroutine frame per request
            handler = route(request.method, request.path) if route is not None else self.handler
            try:
                await handler(request, response)
            except Exception:
                log.exception("handler failed for %s %s", request.method, request.path)
                if not response.started:
                    response.send(500, self.error(500, "internal error"))
                else:
                    response.abort()
            else:
                if not response.started:
                    if not self.closed:  # (a handler may leave a request whose client is gone)
                        log.error("handler for %s %s sent no response", request.method,
                                  request.path)
                    response.send(500, self.error(500, "internal error: no response"))
                elif not response.finished:
                    response.end()
            if self.closed or self._task is not task:
                return  # a newer task serves the connection
            self._idle = self.loop.create_future()
            work = await self._idle
            if work is None:
                return
            request, keep_alive = work

    def response_done(self, keep_alive: bool) -> None:
        """A response is complete: close, or start the next queued request."""
        self._busy = False
        self.watchers.clear()
        if self.closed:
            return
        self.last_active = self.loop.time()
        if not keep_alive:
            self.close()
            return
        if self._queue:
            request, next_keep_alive = self._queue.popleft()
            if self._continue_owed and not self._queue:
                self._continue_owed = False
                self.transport.write(_CONTINUE)
            self._start(request, next_keep_alive)
        else:
            if self._continue_owed:
                self._continue_owed = False
                self.transport.write(_CONTINUE)
            self.transport.resume_reading()

    def _fail(self, status: int, message: str) -> None:
        """Answer a request the parser refused, then close (the stream is out of sync)."""
        if self._busy:  # an earlier request is still answering: the error can't go in order
            self.close()
            return
        response = Response(self, keep_alive=False)
        response.send(status, self.error(status, message))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    @property
    def idle(self) -> bool:
        """No request is being answered or waiting."""
        return not self._busy and not self._queue

    async def writable(self) -> None:
        if not self._write_paused or self.closed:
            return
        if self._write_waiter is None or self._write_waiter.done():
            self._write_waiter = self.loop.create_future()
        await self._write_waiter

    def _wake_writer(self) -> None:
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._write_waiter = None


class Router:
    """Exact (method, path) dispatch; unknown paths get 404, known paths with another method 405.

    A `Router` is itself a handler (callable with request and response).
    """

    def __init__(self, error: ErrorBody = _openai_error) -> None:
        self._routes: dict[tuple[str, str], Handler] = {}
        self._paths: dict[str, list[str]] = {}
        self._error = error

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._routes[(method.upper(), path)] = handler
        self._paths.setdefault(path, []).append(method.upper())

    def route(self, method: str, path: str) -> Handler:
        """The handler for (method, path): a route's, or one answering 404/405."""
        return self._routes.get((method, path)) or self._refuse

    async def __call__(self, request: Request, response: Response) -> None:
        await self.route(request.method, request.path)(request, response)

    async def _refuse(self, request: Request, response: Response) -> None:
        methods = self._paths.get(request.path)
        if methods is None:
            response.send(404, self._error(404, f"no route for {request.path}"))
        else:
            response.send(405, self._error(405, f"{request.method} is not allowed on "
                                                f"{request.path}; use {', '.join(methods)}"),
                          headers=(("allow", ", ".join(methods)),))


class Listener:
    """What `serve` returns: its listening sockets, which accept every pending connection each
    time they are readable (the parts of `asyncio.Server` the callers use).

    uvloop's own servers accept one connection per event-loop iteration (libuv stopped
    accepting in a loop in 1.45, libuv PR 3696). On a busy gateway an iteration is many
    requests long, so a burst of new clients waited one iteration each: 256 connections
    opened at once to a gateway sharing its core took 3 s to accept, and their first requests
    timed out in the client. The stdlib loop accepts up to the backlog at each wake-up; so
    does this.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket],
                 factory: Callable[[], asyncio.Protocol], backlog: int) -> None:
        self._loop = loop
        self._sockets = sockets
        self._factory = factory
        self._backlog = backlog
        self._connecting: set[asyncio.Task[None]] = set()
        self._serving = True
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        """Stop accepting; connections already open go on."""
        if not self._serving:
            return
        self._serving = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    async def wait_closed(self) -> None:
        """Wait until the connections being set up are (they then serve on)."""
        while self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                sock, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client left before we took it
                continue
            except OSError as e:  # out of file descriptors or memory: pause, as asyncio does
                log.warning("accepting connections failed, retrying in %g s: %s",
                            ACCEPT_RETRY_S, e)
                self._loop.remove_reader(listening.fileno())
                self._loop.call_later(ACCEPT_RETRY_S, self._resume, listening)
                return
            sock.setblocking(False)
            task = self._loop.create_task(self._connect(sock))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    def _resume(self, listening: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    async def _connect(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, sock)
        except Exception as e:  # e.g. the client left during the setup
            sock.close()
            log.info("setting up an accepted connection failed: %s", e)


async def _listening_sockets(host: str, port: int, backlog: int,
                             reuse_port: bool) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address of `host` (all interfaces when
    it is empty), as `loop.create_server` makes them."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, family=socket.AF_UNSPEC,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise OSError(e.errno, f"error while attempting to bind on address "
                                       f"{address!r}: {e.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve(handler: Handler, host: str, port: int, *,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, backlog: int = 2048,
                reuse_port: bool = False, keepalive_timeout_s: float = 75.0,
                error: ErrorBody = _openai_error) -> Listener:
    """Listen on host:port and run `handler` (a function or a `Router`) for each request.

    A connection with no request in progress and no byte received for `keepalive_timeout_s`
    is closed (nginx's default, 75 s), so clients that vanish without a FIN do not pile up.
    `error(status, message)` renders the body of the server's own errors (400 bad HTTP,
    413 body too large, 500 handler failure); OpenAI error JSON by default.
    """
    loop = asyncio.get_running_loop()
    registry: set[HttpConnection] = set()
    server = Listener(
        loop, await _listening_sockets(host, port, backlog, reuse_port),
        lambda: HttpConnection(handler, loop, max_body_bytes, error, registry), backlog)
    sweeper = loop.create_task(_sweep_idle(server, registry, keepalive_timeout_s))
    _SWEEPERS.add(sweeper)
    sweeper.add_done_callback(_SWEEPERS.discard)
    return server


_SWEEPERS: set[asyncio.Task[None]] = set()  # referenced while they run


async def _sweep_idle(server: Listener, registry: set[HttpConnection],
                      timeout_s: float) -> None:
    """Close idle keep-alive connections past `timeout_s`, while the server serves."""
    loop = asyncio.get_running_loop()
    while server.is_serving():
        await asyncio.sleep(min(timeout_s / 2, 5.0))
        cutoff = loop.time() - timeout_s
        for conn in [c for c in registry if c.idle and c.last_active < cutoff]:
            conn.close()
