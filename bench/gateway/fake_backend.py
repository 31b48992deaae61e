"""A fake OpenAI-compatible engine that answers at once, for measuring what a proxy adds.

The gateway-overhead benchmark needs a backend whose own cost is close to zero, so that what
changes between "direct" and "through a proxy" is the proxy. This one is a raw asyncio
`Protocol` with the httptools parser on uvloop and precomputed responses (about 15-150 µs per
request), as in shared/reference/router-bench.md §2:

- POST /v1/completions, /v1/chat/completions, /generate: a ~370 B JSON body, or with
  `"stream": true` an SSE stream (`transfer-encoding: chunked`) of 16 `data:` events and
  `data: [DONE]`, each event in its own `transport.write` (so its own `send()`), with
  `--chunk-delay-ms` between events, or N ms if the body holds the marker `[slow:N]` (in the
  prompt, so that it passes through any proxy unchanged: the slow-stream test needs no second
  pair of backends and no second proxy);
- GET /v1/models, /health, /metrics (static `vllm:*` gauges), and the info routes the Rust
  routers probe at start (/get_server_info, /get_model_info, /model_info, /version, /get_load);
- GET /stats: request counters, so the benchmark can check how a router split the load.

Run: `python bench/gateway/fake_backend.py --port 8001 [--chunk-delay-ms 0]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
from collections.abc import Coroutine

import httptools
import uvloop

MODEL = "fake-model"
EVENTS = 16
_STREAM_FLAG = re.compile(rb'"stream"\s*:\s*true')
_SLOW = re.compile(rb"\[slow:(\d+)\]")


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type
            + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _completion(chat: bool) -> bytes:
    usage = {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28}
    if chat:
        choice: dict[str, object] = {
            "index": 0, "message": {"role": "assistant", "content": "word " * 16},
            "logprobs": None, "finish_reason": "length"}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": "word " * 16, "logprobs": None,
                  "finish_reason": "length", "stop_reason": None}
        obj = "text_completion"
    return _json({"id": "cmpl-fake0000000000000000000000000", "object": obj,
                  "created": 1700000000, "model": MODEL, "choices": [choice], "usage": usage})


def _event(chat: bool, i: int) -> bytes:
    """One SSE event (~160 B) as one HTTP chunk."""
    last = i == EVENTS - 1
    if chat:
        choice: dict[str, object] = {"index": 0, "delta": {"content": " word"},
                                     "logprobs": None, "finish_reason": "length" if last else None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": " word", "logprobs": None,
                  "finish_reason": "length" if last else None}
        obj = "text_completion"
    data = b"data: " + _json({"id": "cmpl-fake0000000000000000000000000", "object": obj,
                              "created": 1700000000, "model": MODEL,
                              "choices": [choice]}) + b"\n\n"
    return _chunk(data)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache"
               b"\r\ntransfer-encoding: chunked\r\n\r\n")
STREAM_TAIL = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
BODIES = {chat: _response("200 OK", _completion(chat)) for chat in (False, True)}
EVENTS_BY_KIND = {chat: [_event(chat, i) for i in range(EVENTS)] for chat in (False, True)}
METRICS = (b"# TYPE vllm:num_requests_running gauge\n"
           b'vllm:num_requests_running{model_name="fake-model"} 0.0\n'
           b"# TYPE vllm:num_requests_waiting gauge\n"
           b'vllm:num_requests_waiting{model_name="fake-model"} 0.0\n'
           b"# TYPE vllm:kv_cache_usage_perc gauge\n"
           b'vllm:kv_cache_usage_perc{model_name="fake-model"} 0.0\n'
           b"# TYPE vllm:gpu_cache_usage_perc gauge\n"
           b'vllm:gpu_cache_usage_perc{model_name="fake-model"} 0.0\n')
INFO = _json({"model_path": MODEL, "tokenizer_path": MODEL, "is_generation": True,
              "served_model_name": MODEL, "max_total_num_tokens": 467280, "version": "0.0.0"})
GETS = {
    b"/health": _response("200 OK", b""),
    b"/v1/models": _response("200 OK", _json({"object": "list", "data": [
        {"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "bench",
         "max_model_len": 8192}]})),
    b"/metrics": _response("200 OK", METRICS, b"text/plain; version=0.0.4"),
    b"/get_server_info": _response("200 OK", INFO),
    b"/get_model_info": _response("200 OK", INFO),
    b"/model_info": _response("200 OK", INFO),
    b"/version": _response("200 OK", _json({"version": "0.0.0"})),
    b"/get_load": _response("200 OK", _json({"load": 0})),
}
POSTS = {b"/v1/completions": False, b"/v1/chat/completions": True, b"/generate": False}
NOT_FOUND = _response("404 Not Found", _json({"error": {"message": "not found",
                                                        "type": "invalid_request_error"}}))
COUNTS = {"requests": 0, "stream": 0, "non_stream": 0, "connections": 0}


class Backend(asyncio.Protocol):
    """One client connection: parse requests with httptools, answer from precomputed bytes."""

    def __init__(self, chunk_delay_s: float) -> None:
        self._delay = chunk_delay_s
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        # Responses go out in request order: a delayed stream holds back pipelined requests.
        self._tail: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        COUNTS["connections"] += 1

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        url, self._url = self._url.split(b"?", 1)[0], b""
        body, self._body = b"".join(self._body), []
        keep_alive = self._parser.should_keep_alive()
        method = self._parser.get_method()
        if self._tail is None or self._tail.done():
            slow = self._answer(method, url, body, keep_alive)
            self._tail = None if slow is None else asyncio.ensure_future(slow)
        else:
            self._tail = asyncio.ensure_future(
                self._chain(self._tail, method, url, body, keep_alive))

    async def _chain(self, previous: asyncio.Future[None], method: bytes, url: bytes,
                     body: bytes, keep_alive: bool) -> None:
        await previous
        slow = self._answer(method, url, body, keep_alive)
        if slow is not None:
            await slow

    def _answer(self, method: bytes, url: bytes, body: bytes,
                keep_alive: bool) -> Coroutine[None, None, None] | None:
        """Write the response; a delayed stream is returned as a coroutine to run instead."""
        t = self._transport
        if t is None:
            return None
        if method == b"POST" and url in POSTS:
            chat = POSTS[url]
            COUNTS["requests"] += 1
            if _STREAM_FLAG.search(body):
                COUNTS["stream"] += 1
                delay = self._delay
                if b"[slow:" in body and (m := _SLOW.search(body)) is not None:
                    delay = int(m.group(1)) / 1000.0
                if delay > 0:
                    return self._slow_stream(chat, keep_alive, delay)
                t.write(STREAM_HEAD)
                for event in EVENTS_BY_KIND[chat]:
                    t.write(event)
                t.write(STREAM_TAIL)
            else:
                COUNTS["non_stream"] += 1
                t.write(BODIES[chat])
        elif method == b"GET" and url == b"/stats":
            t.write(_response("200 OK", _json(COUNTS)))
        elif method == b"GET" and url in GETS:
            t.write(GETS[url])
        else:
            t.write(NOT_FOUND)
        if not keep_alive:
            t.close()
        return None

    async def _slow_stream(self, chat: bool, keep_alive: bool, delay: float) -> None:
        t = self._transport
        if t is None:
            return
        t.write(STREAM_HEAD)
        for event in EVENTS_BY_KIND[chat]:
            await asyncio.sleep(delay)
            if t.is_closing():
                return
            t.write(event)
        t.write(STREAM_TAIL)
        if not keep_alive:
            t.close()


async def serve(host: str, port: int, chunk_delay_ms: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Backend(chunk_delay_ms / 1000.0), host, port,
                                      backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0,
                        help="sleep between SSE events, ms (0: write them back to back)")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.chunk_delay_ms))


if __name__ == "__main__":
    main()
