"""Gateway CPU per request: a quick in-process-tree measurement for iterating on the data path.

Three processes, like reference/router-bench.md: an instant fake engine (raw uvloop +
httptools protocol; ~370 B JSON, or 16 SSE events of ~160 B each in its own write, then
`[DONE]`), the gateway under test, and a closed-loop client (C keep-alive connections, each
sending its next request when the previous answer is complete). With two or more cores the
gateway runs alone on core 1, the engine and client share core 0.

The gateway's CPU per request is the change of utime+stime in /proc/<pid>/stat over the
measured window divided by the requests completed in it. "direct" is the client against the
engine with no gateway (its column shows the engine's own CPU per request, for scale).

Setups:
- `pump`: the floor, router-bench's "raw byte pump": parse the request head, copy its bytes to
  the engine (round robin, one engine connection per client connection), copy the answer's
  bytes back; no JSON, no scheduling, no retries (17 us/request on the reference machine);
- `gw-fake`: full gateway path (parse, tokenize, schedule, forward) with an instant in-process
  scheduler (round robin over the engines);
- `gw-fake-notok`: the same with a free tokenizer (length / 4), to show the tokenizer's share;
- `gw-rr`: `--scheduling-policy round-robin` (no scheduler call);
- `gw-core-lite`: the embedded `SchedulerCore`, lite mode, static discovery;
- `gw-core-full`: the embedded `SchedulerCore`, full mode, load-balance, reading an in-memory
  CMS that a fake llumlet in the gateway process refreshes every 40 ms.

Run from the repository root:

    .venv/bin/python bench/gateway_cpu.py                  # all setups, ~2 minutes
    .venv/bin/python bench/gateway_cpu.py --quick          # 2 s windows, fewer setups
    .venv/bin/python bench/gateway_cpu.py --setup gw-fake --profile   # cProfile the gateway
    PYTHONPATH=/other/checkout/src .venv/bin/python bench/gateway_cpu.py ...   # another version
    .venv/bin/python bench/gateway_cpu.py --setup gw-core-full --against /other/checkout/src \
        --non-stream-only --rounds 6                       # same-window A/B, ~1 minute

The VM's speed drifts by 10-20 % between windows minutes apart, which hides changes of a few
per cent. `--against` runs this checkout's gateway and another's at the same time, both on core
1 (each gets about half of it, so each costs more per request than alone) with one client
each on core 0, and prints the ratio of their CPU per request, window by window: an A/B of
two identical checkouts reads 1.00 +- 0.015 per window.

Goal (issue: match the Rust routers per core): <= ~50 us of gateway CPU per non-stream request
including the scheduling call (vllm-router: 47 us), TCP_NODELAY on client sockets.

First recorded 2026-11-23 (history: the gateway has lost about half of this since; see
bench/RESULTS.md, gateway overhead, for the later same-window A/B figures) on the 2-vCPU
project machine (shared with other work, so +-10 %), 64 connections, 8 s windows; gateway CPU
us per request, non-stream / stream (16 events):

    direct (engine's own)   6.7 /  84        pump (floor)        14.0 /  96
    gw-fake                41.7 / 101        gw-fake-notok       33.9 / 114
    gw-rr                  40.6 /  97        gw-core-lite        71.3 / 106
    gw-core-full           92.3 / 120

gw-fake served 23.9k non-stream req/s on its one core (vllm-router: 21.1k). The embedded
full-mode core adds about 50 us per decision at 2 instances (its dispatcher, not the data path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import httptools
import uvloop

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a short story about a robot learning to paint, in three sentences please."
CLK_TCK = os.sysconf("SC_CLK_TCK")
SETUPS = ("direct", "pump", "gw-fake", "gw-fake-notok", "gw-rr", "gw-core-lite",
          "gw-core-full")

_JSON = json.dumps({
    "id": "cmpl-0123456789abcdef", "object": "text_completion", "created": 1700000000,
    "model": "m", "choices": [{"index": 0, "text": " The robot dipped its brush into blue paint "
                               "and smiled at the canvas.", "logprobs": None,
                               "finish_reason": "length"}],
    "usage": {"prompt_tokens": 18, "completion_tokens": 16, "total_tokens": 34}}).encode()
_EVENT = b"data: " + json.dumps({
    "id": "cmpl-0123456789abcdef", "object": "text_completion", "created": 1700000000,
    "model": "m", "choices": [{"index": 0, "text": " word", "logprobs": None,
                               "finish_reason": None}]}).encode() + b"\n\n"


# ---- the fake engine ---------------------------------------------------------------------------


class _Engine(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.p = httptools.HttpRequestParser(self)
        self.body = b""

    def data_received(self, data: bytes) -> None:
        self.p.feed_data(data)

    def on_message_begin(self) -> None:
        self.body = b""

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        t = self.t
        if b'"stream":true' in self.body or b'"stream": true' in self.body:
            t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n")
            frame = b"%x\r\n%b\r\n" % (len(_EVENT), _EVENT)
            for _ in range(16):
                t.write(frame)
            done = b"data: [DONE]\n\n"
            t.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
        else:
            t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%b" % (len(_JSON), _JSON))


async def _engine(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Engine, "127.0.0.1", port, backlog=4096)
    async with server:
        await asyncio.Future()


# ---- the byte pump (a floor for comparison) ------------------------------------------------------


class _PumpUp(asyncio.Protocol):
    """The engine side of one pump connection: answer bytes go straight to the client."""

    def __init__(self, down: asyncio.Transport) -> None:
        self.down = down
        self.parser = httptools.HttpResponseParser(self)
        self.on_done: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        if not self.down.is_closing():
            self.down.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.on_done()  # type: ignore[operator]


class _PumpDown(asyncio.Protocol):
    engines: ClassVar[list[int]] = []
    rr = 0
    tasks: ClassVar[set[asyncio.Future[None]]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = httptools.HttpRequestParser(self)
        self.buf = b""
        self.up: _PumpUp | None = None
        self.queue: list[bytes] = []
        self.busy = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.queue.append(self.buf)  # whole requests only (the client sends one at a time)
        self.buf = b""
        if not self.busy:
            self._next()

    def _next(self) -> None:
        if not self.queue:
            self.busy = False
            return
        self.busy = True
        data = self.queue.pop(0)
        if self.up is None:
            _PumpDown.rr += 1
            port = self.engines[_PumpDown.rr % len(self.engines)]
            task = asyncio.ensure_future(self._connect(port, data))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            self.up.t.write(data)

    async def _connect(self, port: int, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: _PumpUp(self.t), "127.0.0.1", port)
        up.t.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up.on_done = self._next
        self.up = up
        up.t.write(data)


async def _pump(port: int, engines: list[int]) -> None:
    _PumpDown.engines = engines
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_PumpDown, "127.0.0.1", port, backlog=4096)
    async with server:
        await asyncio.Future()


# ---- the gateway ---------------------------------------------------------------------------------


class _InstantScheduler:
    """The `Scheduler` protocol at no cost: round robin."""

    def __init__(self, instances: list) -> None:  # type: ignore[type-arg]
        self._instances = instances
        self._i = 0

    async def schedule(self, request: object) -> list:  # type: ignore[type-arg]
        self._i += 1
        return [self._instances[self._i % len(self._instances)]]

    async def release(self, request: object) -> None:
        return None

    async def report(self, items: object) -> None:
        return None

    async def close(self) -> None:
        return None


class _FreeTokenizer:
    """Token ids at no cost (one per 4 characters), to measure the rest of the path."""

    name = "free"

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [0] * (len(text) // 4 + 1)

    def count(self, text: str, *, add_special_tokens: bool = True) -> int:
        return len(text) // 4 + 1

    def decode(self, ids: object) -> str:
        return ""

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return "".join(m["content"] for m in messages)


async def _gateway(port: int, engines: list[int], setup: str, profile: str) -> None:
    from prescient.config.gateway import load_gateway_settings
    from prescient.discovery.base import StaticResolver
    from prescient.gateway.app import Gateway
    from prescient.gateway.wiring import build_gateway
    from prescient.scheduler.wire import Endpoint, LLMInstance
    from prescient.tokenizer import ApproxTokenizer

    addresses = [f"127.0.0.1:{p}" for p in engines]
    flags = ["--llm-backend-endpoints", ",".join(addresses)]
    if setup in ("gw-fake", "gw-fake-notok"):
        instances = [LLMInstance(id=a, endpoint=Endpoint("127.0.0.1", p))
                     for a, p in zip(addresses, engines, strict=True)]
        tokenizer = ApproxTokenizer() if setup == "gw-fake" else _FreeTokenizer()
        gateway = Gateway(load_gateway_settings(flags, {}),
                          scheduler=_InstantScheduler(instances),
                          resolver=StaticResolver(addresses), tokenizer=tokenizer)
    elif setup == "gw-rr":
        gateway = build_gateway(load_gateway_settings(
            [*flags, "--scheduling-policy", "round-robin"], {}))
    elif setup == "gw-core-lite":
        gateway = build_gateway(load_gateway_settings(
            [*flags, "--enable-full-mode-scheduling=false"], {}))
    else:
        gateway = await _full_mode_gateway(flags, engines)
    await gateway.start()
    server = await gateway.serve("127.0.0.1", port)
    from prescient import service
    if hasattr(service, "freeze_heap_later"):  # (not in older checkouts measured side by side)
        service.freeze_heap_later(asyncio.get_running_loop(), 1.0)  # as `prescient gateway`
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.get_running_loop().add_signal_handler(
            15, lambda: (profiler.disable(), profiler.dump_stats(profile), os._exit(0)))
    async with server:
        await asyncio.Future()


async def _full_mode_gateway(flags: list[str], engines: list[int]) -> object:
    """The embedded core in full mode over an in-memory CMS, kept fresh like llumlets do: every
    40 ms each instance pushes a status listing the requests dispatched to it since its last
    push as (recently) waiting, so the local account retires them as in a live cluster."""
    from prescient.cms.store import MemoryStore
    from prescient.config.gateway import load_gateway_settings
    from prescient.discovery.base import StaticResolver
    from prescient.gateway.app import Gateway
    from prescient.gateway.wiring import embedded_scheduler_settings
    from prescient.model import InstanceMetadata, InstanceStatus
    from prescient.scheduler.core import SchedulerCore
    from prescient.tokenizer import ApproxTokenizer

    # the reader polls as often as the llumlet pushes, so it sees every arrival listed (with
    # the default 500 ms it would see one push in twelve, and the local account would keep the
    # rest until they expire after 10 s: ~100k entries at this request rate)
    settings = load_gateway_settings([*flags, "--cms-pull-status-interval-ms", "40"], {})
    store = MemoryStore()
    ids = [f"engine-{p}" for p in engines]
    arrived: dict[str, list[str]] = {iid: [] for iid in ids}
    for iid, p in zip(ids, engines, strict=True):
        await store.put_metadata(InstanceMetadata(
            instance_id=iid, ip="127.0.0.1", api_server_port=p, unit_id=iid), None)

    async def llumlet() -> None:
        update = 0
        while True:
            update += 1
            for iid in ids:
                waiting = tuple(arrived[iid])
                arrived[iid].clear()
                await store.put_status(InstanceStatus(
                    instance_id=iid, timestamp_ms=int(time.time() * 1000), update_id=update,
                    step_id=update, num_total_gpu_tokens=467280,
                    recent_waiting_requests=waiting, waiting_requests=waiting), None)
            await asyncio.sleep(0.04)

    class _Engines(SchedulerCore):
        async def schedule(self, request: object) -> list:  # type: ignore[type-arg]
            placed = await super().schedule(request)  # type: ignore[arg-type]
            arrived[placed[0].id].append(request.id)  # type: ignore[attr-defined]
            return placed

    task = asyncio.ensure_future(llumlet())
    core = _Engines(embedded_scheduler_settings(settings), store=store)
    gateway = Gateway(settings, scheduler=core,
                      resolver=StaticResolver(settings.llm_backend_endpoints),
                      tokenizer=ApproxTokenizer())
    gateway._llumlet = task  # type: ignore[attr-defined]
    return gateway


# ---- the client ----------------------------------------------------------------------------------


class _Client(asyncio.Protocol):
    def __init__(self, request: bytes, run: dict[str, float | int | list[float]]) -> None:
        self.request = request
        self.run = run
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send()

    def _send(self) -> None:
        self.sent = time.perf_counter()
        self.t.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        run = self.run
        if self.parser.get_status_code() != 200:
            run["errors"] += 1  # type: ignore[operator]
        if run["measuring"]:
            run["count"] += 1  # type: ignore[operator]
            run["lat"].append(now - self.sent)  # type: ignore[union-attr]
        if not run["stop"]:
            self._send()


async def _client(port: int, stream: bool, connections: int, warmup: float, duration: float,
                  watch: int) -> dict[str, float]:
    body = json.dumps({"model": "m", "prompt": PROMPT, "max_tokens": 16,
                       "stream": stream}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json"
               b"\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
    run: dict[str, float | int | list[float]] = {"measuring": 0, "stop": 0, "count": 0,
                                                 "errors": 0, "lat": []}
    loop = asyncio.get_running_loop()
    for _ in range(connections):
        await loop.create_connection(lambda: _Client(request, run), "127.0.0.1", port)
    await asyncio.sleep(warmup)
    cpu0, t0 = _cpu(watch), time.perf_counter()
    run["measuring"] = 1
    await asyncio.sleep(duration)
    run["measuring"] = 0
    cpu1, t1 = _cpu(watch), time.perf_counter()
    run["stop"] = 1
    lat = sorted(run["lat"])  # type: ignore[type-var]
    n = int(run["count"])  # type: ignore[arg-type]
    return {"rps": n / (t1 - t0), "us_per_req": (cpu1 - cpu0) / max(n, 1) * 1e6,
            "cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100, "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1e3, "errors": float(run["errors"]),
            "n": float(n)}


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


# ---- orchestration -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def _pythonpath() -> str:
    """This checkout's sources, after any PYTHONPATH given (to run another version's)."""
    given = os.environ.get("PYTHONPATH")
    return f"{given + ':' if given else ''}{ROOT / 'src'}:{ROOT}"


def _spawn(*args: str, core: int | None, pythonpath: str | None = None
           ) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": pythonpath or _pythonpath()}
    pre = ["taskset", "-c", str(core)] if core is not None and os.cpu_count() > 1 else []
    return subprocess.Popen([*pre, sys.executable, __file__, *args], env=env)


def _client_argv(port: int, watch: int, stream: bool, args: argparse.Namespace) -> list[str]:
    return ["taskset", "-c", "0", sys.executable, __file__, "--role", "client", "--port",
            str(port), "--watch", str(watch), "--connections", str(args.connections),
            "--warmup", str(args.warmup), "--duration", str(args.duration),
            *(["--stream"] if stream else [])]


def _measure(setup: str, stream: bool, args: argparse.Namespace,
             versions: tuple[str | None, ...] = (None,)) -> list[dict[str, float]]:
    """One window per version given (None: this checkout), all at once: the gateways share
    core 1, their clients core 0, so every version sees the same machine speed."""
    engine_ports = [_free_port(), _free_port()]
    procs = [_spawn("--role", "engine", "--port", str(p), core=0) for p in engine_ports]
    try:
        for p in engine_ports:
            _wait_port(p)
        targets = [(engine_ports[0], procs[0].pid)]
        if setup != "direct":
            targets = []
            for version in versions:
                port = _free_port()
                gw = _spawn("--role", "gateway", "--port", str(port), "--setup", setup,
                            "--engines", ",".join(map(str, engine_ports)),
                            "--profile-out", _profile_path(args, stream) if args.profile else "",
                            core=1, pythonpath=version and f"{version}:{ROOT}")
                procs.append(gw)
                targets.append((port, gw.pid))
            for port, _ in targets:
                _wait_port(port)
        clients = [subprocess.Popen(_client_argv(port, watch, stream, args),
                                    env={**os.environ, "PYTHONPATH": _pythonpath()},
                                    stdout=subprocess.PIPE, text=True)
                   for port, watch in targets]
        results = []
        for client in clients:
            out, _ = client.communicate()
            if client.returncode:
                raise RuntimeError(f"client exited {client.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=10)


def _main(args: argparse.Namespace) -> None:
    setups = args.setup or (("pump", "gw-fake", "gw-core-full") if args.quick else SETUPS)
    print(f"{os.cpu_count()} cores; {args.connections} connections; {args.duration:g} s windows"
          f" after {args.warmup:g} s warm-up")
    if args.against:
        _main_ab(setups, args)
        return
    print(f"{'setup':<14} {'mode':<10} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'CPU us/req':>10} {'CPU %':>6} {'errors':>6}")
    for setup in setups:
        for stream in (False, True):
            r = _measure(setup, stream, args)[0]
            print(f"{setup:<14} {'stream' if stream else 'non-stream':<10} {r['rps']:>8,.0f} "
                  f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['us_per_req']:>10.1f} "
                  f"{r['cpu_pct']:>6.0f} {r['errors']:>6.0f}", flush=True)
    if args.profile:
        import pstats

        for stream in (False, True):
            print(f"--- profile of the last setup, {'stream' if stream else 'non-stream'}")
            pstats.Stats(_profile_path(args, stream)).sort_stats("tottime").print_stats(25)


def _main_ab(setups: Sequence[str], args: argparse.Namespace) -> None:
    """This checkout against `--against` in the same windows, `--rounds` times per setup and
    mode (which version is spawned first alternates)."""
    print(f"A: {ROOT / 'src'}\nB: {args.against}")
    print(f"{'setup':<14} {'mode':<10} {'A us/req':>9} {'B us/req':>9} {'B/A':>6}  rounds")
    for setup in setups:
        for stream in (False, True) if not args.non_stream_only else (False,):
            ratios, a_us, b_us = [], [], []
            for k in range(args.rounds):
                order = (None, args.against) if k % 2 == 0 else (args.against, None)
                a, b = _measure(setup, stream, args, order)
                if k % 2:
                    a, b = b, a
                a_us.append(a["us_per_req"])
                b_us.append(b["us_per_req"])
                ratios.append(b["us_per_req"] / a["us_per_req"])
            print(f"{setup:<14} {'stream' if stream else 'non-stream':<10} "
                  f"{statistics.median(a_us):>9.1f} {statistics.median(b_us):>9.1f} "
                  f"{statistics.median(ratios):>6.3f}  "
                  + " ".join(f"{r:.3f}" for r in ratios), flush=True)


def _profile_path(args: argparse.Namespace, stream: bool) -> str:
    return f"{args.profile_out}.{'stream' if stream else 'non-stream'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=("main", "engine", "gateway", "client"), default="main")
    p.add_argument("--setup", action="append", choices=SETUPS, help="repeatable")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile the gateway (slower)")
    p.add_argument("--profile-out", default="/tmp/gateway_cpu.prof")
    p.add_argument("--port", type=int)
    p.add_argument("--engines", default="")
    p.add_argument("--watch", type=int)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--against", metavar="SRC",
                   help="another checkout's src directory: run its gateway beside this one's "
                        "in the same windows and print the CPU ratio")
    p.add_argument("--rounds", type=int, default=4, help="windows per setup with --against")
    p.add_argument("--non-stream-only", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.duration = 1.0, 2.0
    if args.role == "engine":
        uvloop.run(_engine(args.port))
    elif args.role == "gateway":
        engines = [int(x) for x in args.engines.split(",")]
        if args.setup[0] == "pump":
            uvloop.run(_pump(args.port, engines))
        else:
            uvloop.run(_gateway(args.port, engines, args.setup[0], args.profile_out))
    elif args.role == "client":
        result = uvloop.run(_client(args.port, args.stream, args.connections, args.warmup,
                                    args.duration, args.watch))
        print(json.dumps(result))
    else:
        _main(args)


if __name__ == "__main__":
    main()
