"""The upstream client on real sockets: pooling, chunked bodies, failures, aborts, backpressure."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from prescient.http.client import (
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamPool,
)
from prescient.http.server import Request, Response, serve

Runner = Callable[[Coroutine[Any, Any, None]], None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    return asyncio.run if request.param == "asyncio" else uvloop.run


class RawServer:
    """A socket server whose per-connection behaviour is a coroutine over (reader, writer),
    for answers our own server would never give (cut bodies, silent closes)."""

    def __init__(self, talk: Callable[[asyncio.StreamReader, asyncio.StreamWriter, int],
                                      Coroutine[Any, Any, None]]) -> None:
        self.talk = talk
        self.connections = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.talk(reader, writer, self.connections)
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def test_keep_alive_connections_are_reused(run: Runner) -> None:
    async def main() -> None:
        conns: set[int] = set()

        async def handler(request: Request, response: Response) -> None:
            conns.add(id(request._conn))
            response.send(200, request.body[::-1], {"x-seen": request.headers["x-a"]})

        server = await serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool()
        for i in range(5):
            r = await pool.request("127.0.0.1", port, "POST", "/", {"x-a": str(i)}, b"abc")
            assert (r.status, r.headers["x-seen"], await r.read()) == (200, str(i), b"cba")
        await pool.close()
        server.close()
        assert len(conns) == 1

    run(main())


def test_chunked_response_arrives_de_chunked_as_it_comes(run: Runner) -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def handler(request: Request, response: Response) -> None:
            response.start(200)
            response.write(b"data: 1\n\n")
            await response.drain()
            await release.wait()
            response.write(b"data: 2\n\n")
            response.end()

        server = await serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool()
        r = await pool.request("127.0.0.1", port, "GET", "/")
        assert r.headers["transfer-encoding"] == "chunked"
        first = await r.read_chunk()  # arrives while the server still holds the rest
        release.set()
        rest = [c async for c in r.iter_body()]
        r2 = await pool.request("127.0.0.1", port, "GET", "/")  # the connection came back
        await r2.read()
        await pool.close()
        server.close()
        assert first == b"data: 1\n\n" and b"".join(rest) == b"data: 2\n\n"

    run(main())


def test_large_bodies_both_ways(run: Runner) -> None:
    async def main() -> None:
        async def handler(request: Request, response: Response) -> None:
            response.send(200, request.body * 2, content_type="application/octet-stream")

        server = await serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool()
        body = bytes(range(256)) * 16384  # 4 MiB
        r = await pool.request("127.0.0.1", port, "POST", "/", None, body)
        data = await r.read()
        await pool.close()
        server.close()
        assert data == body * 2

    run(main())


def test_refused_connection_is_a_connect_error(run: Runner) -> None:
    async def main() -> None:
        pool = UpstreamPool()
        with pytest.raises(UpstreamConnectError, match="cannot connect"):
            await pool.request("127.0.0.1", free_port(), "GET", "/")
        await pool.close()

    run(main())


def test_stale_keep_alive_connection_is_retried_once_on_a_fresh_one(run: Runner) -> None:
    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if n == 1:  # the first connection dies silently at its second request
            await _read_request(reader)

    async def main() -> None:
        raw = await RawServer(talk).start()
        pool = UpstreamPool()
        for _ in range(2):
            r = await pool.request("127.0.0.1", raw.port, "GET", "/")
            assert await r.read() == b"ok"
        await pool.close()
        raw.close()
        assert raw.connections == 2

    run(main())


def test_a_fresh_connection_closed_before_answering_is_a_connect_error(run: Runner) -> None:
    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)

    async def main() -> None:
        raw = await RawServer(talk).start()
        pool = UpstreamPool()
        with pytest.raises(UpstreamConnectError, match="closed before answering"):
            await pool.request("127.0.0.1", raw.port, "GET", "/")
        await pool.close()
        raw.close()

    run(main())


def test_body_cut_short_is_a_closed_error(run: Runner) -> None:
    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")

    async def main() -> None:
        raw = await RawServer(talk).start()
        pool = UpstreamPool()
        r = await pool.request("127.0.0.1", raw.port, "GET", "/")
        with pytest.raises(UpstreamClosedError, match="lost mid-response"):
            await r.read()
        await pool.close()
        raw.close()

    run(main())


def test_body_delimited_by_eof_is_read_to_the_end(run: Runner) -> None:
    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")

    async def main() -> None:
        raw = await RawServer(talk).start()
        pool = UpstreamPool()
        r = await pool.request("127.0.0.1", raw.port, "GET", "/")
        assert await r.read() == b"until the end"
        await pool.close()
        raw.close()

    run(main())


def test_abort_closes_the_upstream_connection(run: Runner) -> None:
    async def main() -> None:
        gone = asyncio.Event()

        async def handler(request: Request, response: Response) -> None:
            response.start(200)
            response.write(b"data: 1\n\n")
            await request.disconnected
            gone.set()

        server = await serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool()
        r = await pool.request("127.0.0.1", port, "GET", "/")
        assert await r.read_chunk() == b"data: 1\n\n"
        r.abort()
        await asyncio.wait_for(gone.wait(), 10)
        with pytest.raises(UpstreamClosedError):
            await r.read_chunk()
        await pool.close()
        server.close()

    run(main())


class _Signal:
    """An `AbortSignal` that a test trips (the gateway's is the client's `Request`)."""

    def __init__(self) -> None:
        self.is_disconnected = False
        self._callbacks: list[Callable[[], object]] = []

    def on_disconnect(self, callback: Callable[[], object]) -> None:
        self._callbacks.append(callback)

    def disconnect(self) -> None:
        self.is_disconnected = True
        for callback in self._callbacks:
            callback()


def test_abort_when_closes_the_connection_while_waiting_for_the_head(run: Runner) -> None:
    async def main() -> None:
        gone = asyncio.Event()
        arrived = asyncio.Event()

        async def handler(request: Request, response: Response) -> None:
            arrived.set()
            await request.disconnected  # a slow non-stream answer
            gone.set()

        server = await serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool()
        abort = _Signal()
        call = asyncio.ensure_future(pool.request("127.0.0.1", port, "POST", "/", None, b"{}",
                                                  abort_when=abort))
        await asyncio.wait_for(arrived.wait(), 10)
        abort.disconnect()
        with pytest.raises(UpstreamClosedError, match="aborted"):
            await call
        await asyncio.wait_for(gone.wait(), 10)
        await pool.close()
        server.close()

    run(main())


def test_a_late_abort_leaves_the_connection_to_its_next_exchange(run: Runner) -> None:
    async def main() -> None:
        hold = asyncio.Event()

        async def handler(request: Request, response: Response) -> None:
            if request.path == "/one":
                response.send(200, b"one")
                return
            response.start(200)  # the second exchange is still running at the abort
            response.write(b"two, ")
            await hold.wait()
            response.write(b"done")

        server = await serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool()
        first = _Signal()
        r = await pool.request("127.0.0.1", port, "GET", "/one", abort_when=first)
        assert await r.read() == b"one"
        second = await pool.request("127.0.0.1", port, "GET", "/two")  # same connection
        assert await second.read_chunk() == b"two, "
        first.disconnect()  # the first request's client leaves only now
        hold.set()
        assert await second.read() == b"done"
        assert len(pool._all) == 1
        await pool.close()
        server.close()

    run(main())


def test_idle_connections_past_the_timeout_are_not_reused(run: Runner) -> None:
    async def main() -> None:
        conns: set[int] = set()

        async def handler(request: Request, response: Response) -> None:
            conns.add(id(request._conn))
            response.send(200, b"{}")

        server = await serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        now = [100.0]
        pool = UpstreamPool(idle_timeout_s=4.0, clock=lambda: now[0])
        await (await pool.request("127.0.0.1", port, "GET", "/")).read()
        now[0] += 3.0
        await (await pool.request("127.0.0.1", port, "GET", "/")).read()
        now[0] += 5.0
        await (await pool.request("127.0.0.1", port, "GET", "/")).read()
        await pool.close()
        server.close()
        assert len(conns) == 2

    run(main())


def test_a_slow_consumer_pauses_reading_and_loses_nothing(run: Runner) -> None:
    total = 8 * 1024 * 1024

    async def main() -> None:
        async def handler(request: Request, response: Response) -> None:
            response.start(200, content_type="application/octet-stream")
            for _ in range(total // 65536):
                response.write(b"y" * 65536)
                await response.drain()
            response.end()

        server = await serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool()
        r = await pool.request("127.0.0.1", port, "GET", "/")
        for _ in range(1000):  # the consumer sleeps; the client must stop reading
            if r._conn._paused:
                break
            await asyncio.sleep(0.01)
        assert r._conn._paused
        size = 0
        while chunk := await r.read_chunk():
            size += len(chunk)
        await pool.close()
        server.close()
        assert size == total

    run(main())


def test_a_silent_upstream_times_out_before_and_during_the_response(run: Runner) -> None:
    hang = asyncio.Event()

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        request = await _read_request(reader)
        if b"/started" in request:  # the head and one event, then silence
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"6\r\ndata: \r\n")
        await hang.wait()  # never answers (more)

    async def main() -> None:
        raw = await RawServer(talk).start()
        pool = UpstreamPool(read_timeout_s=0.2)
        with pytest.raises(UpstreamConnectError, match=r"sent no response for 0\.2 s"):
            await pool.request("127.0.0.1", raw.port, "GET", "/silent")
        response = await pool.request("127.0.0.1", raw.port, "GET", "/started")
        assert await response.read_chunk() == b"data: "
        with pytest.raises(UpstreamClosedError, match=r"sent nothing for 0\.2 s"):
            await response.read_chunk()
        hang.set()
        await pool.close()
        raw.close()

    run(main())
