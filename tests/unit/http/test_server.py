"""The HTTP/1.1 server over real sockets: keep-alive, pipelining, limits, streaming, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httptools
import pytest
import uvloop

from prescient.http import server as server_module
from prescient.http.server import Listener, Request, Response, Router, serve

Handler = Callable[[Request, Response], Awaitable[None]]
Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Each test on both event loops: the gateway runs on uvloop, tests elsewhere on asyncio."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


async def _start(handler: Handler, **kwargs: int) -> tuple[Listener, int]:
    server = await serve(handler, "127.0.0.1", 0, **kwargs)
    return server, server.sockets[0].getsockname()[1]


class _Parsed:
    """Responses parsed off a raw socket with httptools (independent of our client)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[tuple[int, dict[str, str], bytes]] = []
        self._headers: dict[str, str] = {}
        self._body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self._headers, self._body))
        self._headers, self._body = {}, b""


async def _exchange(port: int, raw: bytes, responses: int = 1
                    ) -> list[tuple[int, dict[str, str], bytes]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    parsed = _Parsed()
    while len(parsed.done) < responses:
        data = await asyncio.wait_for(reader.read(65536), 10)
        if not data:
            break
        parsed.parser.feed_data(data)
    writer.close()
    return parsed.done


async def _echo(request: Request, response: Response) -> None:
    response.send(200, json.dumps({
        "method": request.method, "path": request.path, "query": request.query,
        "size": len(request.body), "conn": id(request._conn)}).encode())


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


def test_keep_alive_serves_several_requests_on_one_connection(run: Runner) -> None:
    async def main() -> None:
        server, port = await _start(_echo)
        raw = _post("/a?x=1", b"hello")
        done = await _exchange(port, raw + _post("/b", b""), responses=2)
        server.close()
        first, second = (json.loads(body) for _, _, body in done)
        assert (first["path"], first["query"], first["size"]) == ("/a", "x=1", 5)
        assert second["path"] == "/b"
        assert first["conn"] == second["conn"]

    run(main())


def test_pipelined_requests_are_answered_in_order(run: Runner) -> None:
    async def handler(request: Request, response: Response) -> None:
        if request.path == "/slow":
            await asyncio.sleep(0.05)
        response.send(200, request.path.encode(), content_type="text/plain")

    async def main() -> None:
        server, port = await _start(handler)
        raw = b"".join(_post(p, b"x") for p in ("/slow", "/fast", "/slow", "/fast"))
        done = await _exchange(port, raw, responses=4)
        server.close()
        assert [body for _, _, body in done] == [b"/slow", b"/fast", b"/slow", b"/fast"]

    run(main())


def test_a_connection_runs_its_requests_in_one_task_that_ends_with_it(run: Runner) -> None:
    """Requests in turn on a keep-alive connection share a task; one that comes while the last
    handler still runs after its response went out (a slow handler, or pipelining) gets its
    own and does not wait for it. The tasks end with their handlers, the newest one with the
    connection."""
    tasks: dict[str, asyncio.Task[Any] | None] = {}
    lingered = asyncio.Event()

    async def handler(request: Request, response: Response) -> None:
        tasks[request.path] = asyncio.current_task()
        response.send(200, request.path.encode(), content_type="text/plain")
        if request.path == "/linger":
            await lingered.wait()

    async def main() -> None:
        server, port = await _start(handler)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        parsed = _Parsed()

        async def answer(*raw: bytes) -> list[bytes]:
            expected = len(parsed.done) + len(raw)
            writer.write(b"".join(raw))
            while len(parsed.done) < expected:
                parsed.parser.feed_data(await asyncio.wait_for(reader.read(65536), 10))
            return [body for _, _, body in parsed.done[expected - len(raw):]]

        try:
            assert await answer(_post("/a", b"x")) == [b"/a"]
            assert await answer(_post("/b", b"x")) == [b"/b"]
            assert await answer(_post("/linger", b"x")) == [b"/linger"]
            assert await answer(_post("/c", b"x")) == [b"/c"]  # /linger's handler still runs
            assert await answer(_post("/d", b""), _post("/e", b"")) == [b"/d", b"/e"]
            assert tasks["/a"] is tasks["/b"] is tasks["/linger"]
            assert tasks["/c"] is not tasks["/linger"]
            # /e, pipelined, started as /d's response went out, before /d's handler returned
            assert tasks["/c"] is tasks["/d"] and tasks["/e"] is not tasks["/d"]
            first, last = tasks["/a"], tasks["/e"]
            assert first is not None and last is not None and not first.done()
            lingered.set()
            await asyncio.sleep(0.05)
            assert first.done() and not last.done()  # the newest task waits for a request
            writer.close()
            for _ in range(100):
                if last.done():
                    break
                await asyncio.sleep(0.01)
            assert last.done() and not last.cancelled()
        finally:
            writer.close()
            server.close()

    run(main())


def test_large_body_and_chunked_request_body(run: Runner) -> None:
    async def main() -> None:
        server, port = await _start(_echo)
        big = b"x" * (5 * 1024 * 1024)
        (status, _, body), = await _exchange(port, _post("/big", big))
        chunked = (b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        (_, _, body2), = await _exchange(port, chunked)
        server.close()
        assert status == 200 and json.loads(body)["size"] == len(big)
        assert json.loads(body2)["size"] == 11

    run(main())


def test_body_over_the_limit_gets_413_openai_error_and_close(run: Runner) -> None:
    async def main() -> None:
        server, port = await _start(_echo, max_body_bytes=1000)
        (status, headers, body), = await _exchange(port, _post("/x", b"y" * 1001))
        chunks = b"".join(b"200\r\n" + b"z" * 512 + b"\r\n" for _ in range(3))
        (status2, _, body2), = await _exchange(
            port, b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
        server.close()
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == 413
        assert status2 == 413 and "limit" in json.loads(body2)["error"]["message"]

    run(main())


def test_malformed_request_gets_400_and_the_connection_closes(run: Runner) -> None:
    async def main() -> None:
        server, port = await _start(_echo)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)  # read() to EOF: the server closed
        writer.close()
        server.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ")
        assert json.loads(body)["error"]["code"] == 400

    run(main())


def test_connection_close_and_http10_are_honoured(run: Runner) -> None:
    async def main() -> None:
        server, port = await _start(_echo)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_post("/x", b"", "Connection: close\r\n"))
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /y HTTP/1.0\r\n\r\n")
        data10 = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        server.close()
        assert b"connection: close" in data and data.startswith(b"HTTP/1.1 200")
        assert b"/y" in data10

    run(main())


def test_expect_100_continue_is_answered_before_the_body(run: Runner) -> None:
    async def main() -> None:
        server, port = await _start(_echo)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.write(b"body")
        final = await asyncio.wait_for(reader.readuntil(b"}"), 10)
        writer.close()
        server.close()
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert b'"size": 4' in final

    run(main())


def test_router_answers_404_and_405_with_openai_errors(run: Runner) -> None:
    async def main() -> None:
        router = Router()
        router.add("POST", "/v1/x", _echo)
        server, port = await _start(router)
        (s404, _, b404), = await _exchange(port, b"GET /nope HTTP/1.1\r\n\r\n")
        (s405, h405, _), = await _exchange(port, b"GET /v1/x HTTP/1.1\r\n\r\n")
        (s200, _, _), = await _exchange(port, _post("/v1/x", b"{}"))
        server.close()
        assert (s404, s405, s200) == (404, 405, 200)
        assert json.loads(b404)["error"]["code"] == 404
        assert h405["allow"] == "POST"

    run(main())


def test_chunked_streaming_response_and_tcp_nodelay(run: Runner) -> None:
    nodelay: list[int] = []

    async def handler(request: Request, response: Response) -> None:
        sock = request._conn.transport.get_extra_info("socket")
        nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        response.start(200, {"x-test": "1"})
        for i in range(3):
            response.write(f"data: {i}\n\n".encode())
            await response.drain()
        response.end()

    async def main() -> None:
        server, port = await _start(handler)
        (status, headers, body), = await _exchange(port, b"GET /s HTTP/1.1\r\n\r\n")
        server.close()
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert headers["content-type"] == "text/event-stream" and headers["x-test"] == "1"
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert nodelay == [1]

    run(main())


def test_client_disconnect_resolves_the_disconnected_future(run: Runner) -> None:
    async def main() -> None:
        seen = asyncio.Event()
        gone = asyncio.Event()

        async def handler(request: Request, response: Response) -> None:
            seen.set()
            await request.disconnected
            assert request.is_disconnected
            gone.set()
            response.send(200, b"too late")  # dropped silently

        server, port = await _start(handler)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await asyncio.wait_for(seen.wait(), 10)
        writer.close()
        await asyncio.wait_for(gone.wait(), 10)
        server.close()

    run(main())


def test_on_disconnect_fires_once_while_answering_and_never_after_the_response(
        run: Runner) -> None:
    async def main() -> None:
        calls: list[str] = []
        seen = asyncio.Event()
        gone = asyncio.Event()

        async def handler(request: Request, response: Response) -> None:
            if request.path == "/quick":
                request.on_disconnect(lambda: calls.append("quick"))
                response.send(200, b"ok")  # complete: its callback is dropped
                return
            request.on_disconnect(lambda: calls.append("slow"))
            request.on_disconnect(gone.set)
            seen.set()
            await gone.wait()
            request.on_disconnect(lambda: calls.append("late"))  # gone already: at once

        server, port = await _start(handler)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /quick HTTP/1.1\r\n\r\n")
        assert b"200 OK" in await reader.readuntil(b"ok")
        writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
        await asyncio.wait_for(seen.wait(), 10)
        writer.close()
        await asyncio.wait_for(gone.wait(), 10)
        await asyncio.sleep(0)
        server.close()
        assert calls == ["slow", "late"]

    run(main())


def test_handler_errors_become_500_and_the_server_keeps_serving(run: Runner) -> None:
    async def handler(request: Request, response: Response) -> None:
        if request.path == "/boom":
            raise RuntimeError("boom")
        if request.path == "/silent":
            return
        await _echo(request, response)

    async def main() -> None:
        server, port = await _start(handler)
        raw = (b"GET /boom HTTP/1.1\r\n\r\nGET /silent HTTP/1.1\r\n\r\n"
               b"GET /ok HTTP/1.1\r\n\r\n")
        done = await _exchange(port, raw, responses=3)
        server.close()
        assert [status for status, _, _ in done] == [500, 500, 200]

    run(main())


def test_streaming_waits_for_a_slow_reader_and_loses_nothing(run: Runner) -> None:
    chunk = b"x" * 65536
    total = 256  # 16 MiB: far more than socket buffers hold

    async def main() -> None:
        state = {"written": 0, "conn": None}

        async def handler(request: Request, response: Response) -> None:
            state["conn"] = request._conn
            response.start(200, content_type="application/octet-stream")
            for _ in range(total):
                response.write(chunk)
                state["written"] += 1
                await response.drain()
            response.end()

        server, port = await _start(handler)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
        writer.transport.pause_reading()  # a client that does not read
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        for _ in range(1000):  # wait for the server to hit backpressure
            conn = state["conn"]
            if conn is not None and conn._write_paused:
                break
            await asyncio.sleep(0.01)
        assert state["conn"]._write_paused
        assert state["written"] < total  # the producer waits instead of buffering it all
        writer.transport.resume_reading()
        parsed = _Parsed()
        while not parsed.done:
            data = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert data
            parsed.parser.feed_data(data)
        writer.close()
        server.close()
        assert len(parsed.done[0][2]) == total * len(chunk)

    run(main())


def test_idle_keep_alive_connections_are_closed_after_the_timeout(run: Runner) -> None:
    async def main() -> None:
        server = await serve(_echo, "127.0.0.1", 0, keepalive_timeout_s=0.05)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_post("/x", b""))
        data = await asyncio.wait_for(reader.read(), 10)  # to EOF: the server closed it
        writer.close()
        server.close()
        assert data.startswith(b"HTTP/1.1 200") and b"connection: close" not in data

    run(main())


def test_a_burst_of_connections_is_accepted_in_a_few_loop_iterations(run: Runner) -> None:
    """uvloop's own servers accept one connection per loop iteration; a burst waiting on a
    busy gateway then took an iteration per connection (seconds for hundreds)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        iterations = [0]

        def tick() -> None:  # runs once per loop iteration
            iterations[0] += 1
            loop.call_soon(tick)

        seen: list[int] = []
        all_seen = loop.create_future()

        async def count(request: Request, response: Response) -> None:
            seen.append(iterations[0])
            if len(seen) == 100:
                all_seen.set_result(None)
            response.send(200, b"ok")

        server, port = await _start(count)
        clients = []
        for _ in range(100):  # no await in between: the loop accepts none of them meanwhile
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))  # loopback: the handshake completes here
            sock.send(b"GET /x HTTP/1.1\r\n\r\n")
            clients.append(sock)
        loop.call_soon(tick)
        await asyncio.wait_for(all_seen, 10)
        for sock in clients:
            sock.close()
        server.close()
        assert max(seen) < 20  # one accept per iteration would take 100

    run(main())


class _OutOfFds(socket.socket):
    """A listening socket whose first accepts fail as if the process had no fd left."""

    failures = 2

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def test_accepting_pauses_when_out_of_fds_and_resumes(run: Runner,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "ACCEPT_RETRY_S", 0.01)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listening = _OutOfFds()
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        listening.setblocking(False)
        server = server_module.Listener(
            loop, [listening], lambda: server_module.HttpConnection(
                _echo, loop, 1 << 20, lambda status, message: b"{}"), 16)
        reader, writer = await asyncio.open_connection(*listening.getsockname())
        writer.write(b"GET /x HTTP/1.1\r\n\r\n")
        assert b"200 OK" in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert listening.failures == 0  # it failed twice, paused, then took the connection
        writer.close()
        server.close()

    run(main())
