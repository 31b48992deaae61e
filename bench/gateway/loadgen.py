"""Open-loop load at a fixed rate, for added latency at a given load (not at saturation).

wrk is closed loop: it measures how much a proxy can carry, and its latencies are those of a
saturated system. Added latency at a moderate, steady load needs requests started on a schedule
that does not wait for answers. This generator starts one request every 1/rate seconds (constant
gaps; requests that fall behind the schedule are sent at once, and the largest lag is reported),
over a pool of keep-alive connections (opened in advance; more are opened when none is idle).

It is a raw asyncio `Protocol` with the httptools response parser on uvloop, so its own cost
stays far below the proxies'. libuv timers have 1 ms granularity, so latency is measured from
the actual write, not the scheduled time:
- latency: request write -> last response byte (for a stream, through `data: [DONE]`, which is
  checked: a stream that ends without it is an error);
- TTFB: request write -> first body byte (for a stream, the first SSE event).

A warm-up (not recorded) precedes the measured window. Prints one JSON object on stdout.

Run: `python bench/gateway/loadgen.py --port 8001 --rate 500 --seconds 10 --body '{...}'`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools
import uvloop

DONE_TAIL = b"data: [DONE]\n\n"


@dataclass
class Sample:
    """One request's timing; `error` names what went wrong, if anything."""

    start: float
    ttfb: float = math.nan
    end: float = math.nan
    error: str = ""


@dataclass
class Stats:
    samples: list[Sample] = field(default_factory=list)
    max_lag_s: float = 0.0
    opened: int = 0


class Client(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, on_idle: Callable[[Client], None], on_lost: Callable[[Client], None],
                 stream: bool) -> None:
        self._on_idle, self._on_lost, self._stream = on_idle, on_lost, stream
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._sample: Sample | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, sample: Sample) -> None:
        assert self._transport is not None
        self._sample, self._tail = sample, b""
        sample.start = time.perf_counter()
        self._transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(f"parse: {e}")
            if self._transport is not None:
                self._transport.close()

    def on_body(self, body: bytes) -> None:
        s = self._sample
        if s is not None and math.isnan(s.ttfb):
            s.ttfb = time.perf_counter()
        self._tail = (self._tail + body)[-len(DONE_TAIL):]

    def on_message_complete(self) -> None:
        s, self._sample = self._sample, None
        if s is None:
            return
        s.end = time.perf_counter()
        status = self._parser.get_status_code()
        if status != 200:
            s.error = f"status {status}"
        elif self._stream and self._tail != DONE_TAIL:
            s.error = "stream without data: [DONE]"
        if self._parser.should_keep_alive() and self._transport is not None:
            self._on_idle(self)
        elif self._transport is not None:
            self._transport.close()

    def _fail(self, why: str) -> None:
        s, self._sample = self._sample, None
        if s is not None:
            s.error = why

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail("connection lost")
        self._on_lost(self)


class Pool:
    """Idle keep-alive connections; a new one is opened whenever none is idle."""

    def __init__(self, host: str, port: int, stream: bool, stats: Stats) -> None:
        self._host, self._port, self._stream, self._stats = host, port, stream, stats
        self._idle: list[Client] = []
        self._all: set[Client] = set()
        self._opening: set[asyncio.Future[None]] = set()

    async def open(self) -> Client:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(
            lambda: Client(self._idle.append, self._lost, self._stream), self._host, self._port)
        self._all.add(client)
        self._stats.opened += 1
        return client

    def _lost(self, client: Client) -> None:
        self._all.discard(client)
        if client in self._idle:
            self._idle.remove(client)

    async def prefill(self, n: int) -> None:
        self._idle.extend(await asyncio.gather(*(self.open() for _ in range(n))))

    def send(self, request: bytes, sample: Sample) -> None:
        if self._idle:
            self._idle.pop().send(request, sample)
        else:
            task = asyncio.ensure_future(self._send_new(request, sample))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _send_new(self, request: bytes, sample: Sample) -> None:
        try:
            client = await self.open()
        except OSError as e:
            sample.error = f"connect: {e}"
            return
        client.send(request, sample)


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def run(args: argparse.Namespace) -> dict[str, object]:
    stats = Stats()
    body = args.body.encode()
    stream = b'"stream":true' in body.replace(b" ", b"")
    pool = Pool(args.host, args.port, stream, stats)
    await pool.prefill(args.connections)
    request = build_request(args.host, args.port, args.path, body)
    loop = asyncio.get_running_loop()
    gap = 1.0 / args.rate
    total = int((args.warmup + args.seconds) * args.rate)
    warm = int(args.warmup * args.rate)
    t0 = loop.time() + 0.01
    for i in range(total):
        due = t0 + i * gap
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sample = Sample(start=math.nan)
        if i >= warm:
            stats.samples.append(sample)
            stats.max_lag_s = max(stats.max_lag_s, loop.time() - due)
        pool.send(request, sample)
    deadline = loop.time() + args.drain_timeout
    while loop.time() < deadline and any(_pending(s) for s in stats.samples):
        await asyncio.sleep(0.01)
    return summarize(stats, args.seconds)


def _pending(s: Sample) -> bool:
    return not s.error and math.isnan(s.end)


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def summarize(stats: Stats, seconds: float) -> dict[str, object]:
    done = [s for s in stats.samples if not s.error and not math.isnan(s.end)]
    errors: dict[str, int] = {}
    for s in stats.samples:
        if s.error or math.isnan(s.end):
            why = s.error or "no answer before the drain timeout"
            errors[why] = errors.get(why, 0) + 1
    lat = sorted((s.end - s.start) * 1e3 for s in done)
    ttfb = sorted((s.ttfb - s.start) * 1e3 for s in done)
    return {
        "sent": len(stats.samples), "ok": len(done), "errors": sum(errors.values()),
        "error_kinds": errors, "rate": len(stats.samples) / seconds,
        "p50_ms": _quantile(lat, 0.5), "p90_ms": _quantile(lat, 0.9),
        "p99_ms": _quantile(lat, 0.99), "max_ms": lat[-1] if lat else math.nan,
        "ttfb_p50_ms": _quantile(ttfb, 0.5), "ttfb_p99_ms": _quantile(ttfb, 0.99),
        "max_send_lag_ms": stats.max_lag_s * 1e3, "connections_opened": stats.opened,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/completions")
    parser.add_argument("--body", required=True, help="JSON request body")
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded lead-in, s")
    parser.add_argument("--connections", type=int, default=32, help="opened in advance")
    parser.add_argument("--drain-timeout", type=float, default=10.0,
                        help="how long to wait for the last answers, s")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args))))


if __name__ == "__main__":
    main()
