"""Gateway overhead: what a proxy adds between a client and an engine, side by side in one run.

Our gateway sits on every request's path, so its cost is paid on every request. This benchmark
reproduces shared/reference/router-bench.md with our gateway added: against fake engines that
answer at once (bench/gateway/fake_backend.py), it measures for each setup

- sustained requests/s, closed loop (`wrk -t1`, 64 and 256 connections), non-streaming and
  streaming (16 SSE events + [DONE]), and the proxy's CPU per request;
- added latency at a fixed rate (500 and 200 req/s, open loop, bench/gateway/loadgen.py):
  p50/p99 of request write -> last byte (streams through `data: [DONE]`) minus "direct";
- 512 slow streams (16 events 20 ms apart): proxy CPU % and µs per forwarded SSE event.

Setups: `direct` (client -> one backend), `vllm-router-1c` and `sglang-router-1c` (the Rust
routers from PyPI, pinned, TOKIO_WORKER_THREADS=1, round-robin over both backends),
`prescient-lite` (`prescient gateway --enable-full-mode-scheduling=false`, static endpoints)
and `prescient-full` (the embedded scheduler reading a CMS in a private Redis, which
bench/gateway/cms_feeder.py keeps fresh as the backends' llumlets would). production-stack's
router is not on PyPI: its numbers are printed from router-bench.md, marked as not re-measured.

Pinning (2-core machine): the proxy alone on core 1 (`taskset -c 1`); backends, Redis, the
feeder and the load generator on core 0. Proxy CPU is utime+stime of its process tree from
/proc/<pid>/stat over each run. Needs Linux, `taskset`, `wrk` (`apt-get install -y wrk`) and
`redis-server` (full mode). The Rust routers are installed on first use into
bench/.peers-venv (`python -m venv` + `pip install vllm-router sglang-router`); a peer that
cannot be installed is skipped with a message, as is a prescient setup while `prescient
gateway` is not available.

Run from the repository root, on a quiet machine (nothing else running):

    .venv/bin/python bench/gateway_overhead.py                 # full run, ~20 min
    .venv/bin/python bench/gateway_overhead.py --quick         # smoke run, ~2-3 min
    .venv/bin/python bench/gateway_overhead.py --setups direct,prescient-lite --seconds 5
    .venv/bin/python bench/gateway_overhead.py --json out/gateway_overhead.json

It prints every command line it ran, one line per measurement as it goes, then the tables
(headline as router-bench.md §1, closed loop, open loop, slow streams, process facts) and the
ratios measured in this run (prescient ÷ each Rust router).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gateway import report  # bench/gateway/, found because this script's directory is on the path
from gateway.procs import (
    Child,
    Children,
    busy_shares,
    core_times,
    cpu_seconds,
    free_port,
    get,
    shell_line,
    threads_and_rss_mb,
    wait_for_port,
    wait_until_serving,
)

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "bench" / "gateway"
PEERS_VENV = REPO / "bench" / ".peers-venv"
PATH = "/v1/completions"
PROMPT = "Write a short story about a proxy that forwards requests between two engines."
SLOW_DELAY_MS = 20
SLOW_CONNECTIONS = 512
SETUPS = ("direct", "vllm-router-1c", "sglang-router-1c", "prescient-lite", "prescient-full")


def body(stream: bool, slow: bool = False) -> str:
    prompt = f"[slow:{SLOW_DELAY_MS}] {PROMPT}" if slow else PROMPT
    obj: dict[str, object] = {"model": "fake-model", "prompt": prompt, "max_tokens": 16}
    if stream:
        obj["stream"] = True
    return json.dumps(obj, separators=(",", ":"))


BODIES = {"ns": body(False), "s": body(True)}


class Skip(Exception):
    """A setup that cannot run here; the message says why."""


@dataclass
class Plan:
    """Durations and loads of one run of the benchmark."""

    seconds: float
    open_seconds: float
    open_warmup: float
    slow_seconds: float
    warmup: float
    repeats: int
    conns: list[int]
    rates: list[float]
    slow: bool
    closed: bool
    open: bool


@dataclass
class Started:
    """A setup ready to measure: where clients send, and the proxy whose CPU counts."""

    port: int
    proxy: Child | None
    helpers: list[Child] = field(default_factory=list)


@dataclass
class Ctx:
    children: Children
    backends: list[int]
    ports: dict[str, int]
    peers: dict[str, Path | str]  # peer -> its venv bin dir, or why it is missing
    gateway: list[str]  # argv prefix of `prescient gateway`
    versions: dict[str, str]
    start_timeout: float


# ---- setups ----------------------------------------------------------------------------------


def start_direct(ctx: Ctx) -> Started:
    return Started(ctx.backends[0], None)


def _workers(ctx: Ctx) -> list[str]:
    return [f"http://127.0.0.1:{p}" for p in ctx.backends]


def _peer_bin(ctx: Ctx, peer: str) -> Path:
    where = ctx.peers.get(peer, "not requested")
    if isinstance(where, str):
        raise Skip(f"{peer} is not installed: {where}")
    return where


def start_vllm_router(ctx: Ctx) -> Started:
    port = ctx.ports["vllm-router-1c"]
    argv = [str(_peer_bin(ctx, "vllm-router") / "vllm-router"), "--host", "127.0.0.1",
            "--port", str(port), "--worker-urls", *_workers(ctx), "--policy", "round_robin",
            "--prometheus-port", str(free_port()), "--log-level", "warning"]
    child = ctx.children.start("vllm-router-1c", argv, core=1,
                               env={"TOKIO_WORKER_THREADS": "1"})
    return Started(port, child)


def start_sglang_router(ctx: Ctx) -> Started:
    port = ctx.ports["sglang-router-1c"]
    argv = [str(_peer_bin(ctx, "sglang-router") / "python"), "-m", "sglang_router.launch_router",
            "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *_workers(ctx),
            "--policy", "round_robin", "--prometheus-port", str(free_port()),
            "--log-level", "warn"]
    child = ctx.children.start("sglang-router-1c", argv, core=1,
                               env={"TOKIO_WORKER_THREADS": "1"})
    return Started(port, child)


def _gateway_argv(ctx: Ctx, port: int) -> list[str]:
    return [*ctx.gateway, "--host", "127.0.0.1", "--port", str(port)]


def _fallback_endpoints(ctx: Ctx) -> list[str]:
    return ["--llm-backend-discovery", "endpoints", "--llm-backend-endpoints",
            ",".join(f"127.0.0.1:{p}" for p in ctx.backends)]


def start_prescient_lite(ctx: Ctx) -> Started:
    port = ctx.ports["prescient-lite"]
    argv = [*_gateway_argv(ctx, port), "--enable-full-mode-scheduling=false",
            *_fallback_endpoints(ctx)]
    return Started(port, ctx.children.start("prescient-lite", argv, core=1))


def start_prescient_full(ctx: Ctx) -> Started:
    port = ctx.ports["prescient-full"]
    argv = _gateway_argv(ctx, port)
    if shutil.which("redis-server") is None:
        raise Skip("redis-server is not installed (full mode needs a CMS in Redis)")
    redis_port = free_port()
    redis = ctx.children.start("redis-cms", ["redis-server", "--port", str(redis_port),
                                             "--bind", "127.0.0.1", "--save", "",
                                             "--appendonly", "no"], core=0)
    helpers = [redis]  # stopped in this order at the end: gateway, feeder, Redis
    try:
        wait_for_port(redis_port, redis)
        feeder_argv = [sys.executable, str(HERE / "cms_feeder.py"), "--redis-port",
                       str(redis_port)]
        for p in ctx.backends:
            feeder_argv += ["--backend", f"127.0.0.1:{p}"]
        helpers.insert(0, ctx.children.start("cms-feeder", feeder_argv, core=0))
        # The CMS is where the scheduler finds instances; the static endpoints only feed the
        # gateway's round-robin fallback (used when the scheduler is unavailable), so that it
        # does not poll a discovery Redis that this benchmark does not run.
        argv += ["--enable-full-mode-scheduling=true", "--cms-redis-host", "127.0.0.1",
                 "--cms-redis-port", str(redis_port), *_fallback_endpoints(ctx)]
        helpers.insert(0, ctx.children.start("prescient-full", argv, core=1))
    except BaseException:
        for child in helpers:
            ctx.children.stop(child)
        raise
    return Started(port, helpers[0], helpers)


STARTERS: dict[str, Callable[[Ctx], Started]] = {
    "direct": start_direct,
    "vllm-router-1c": start_vllm_router,
    "sglang-router-1c": start_sglang_router,
    "prescient-lite": start_prescient_lite,
    "prescient-full": start_prescient_full,
}


# ---- tools and peers -------------------------------------------------------------------------


def check_machine() -> None:
    if platform.system() != "Linux":
        sys.exit("gateway_overhead: needs Linux (/proc, taskset)")
    if shutil.which("taskset") is None:
        sys.exit("gateway_overhead: `taskset` is missing (Debian package util-linux)")
    if shutil.which("wrk") is None:
        sys.exit("gateway_overhead: `wrk` is missing; install it with `apt-get install -y wrk` "
                 "(Debian package `wrk`) and run again")
    if not {0, 1} <= os.sched_getaffinity(0):
        sys.exit("gateway_overhead: needs cores 0 and 1 (proxy on 1, load and backends on 0)")


def ensure_peers(venv: Path, wanted: set[str], install: bool) -> dict[str, Path | str]:
    """The Rust routers' venv bin dir per peer (created on first use), or why not."""
    bindir = venv / "bin"
    if not wanted:
        return {}
    missing = [p for p in sorted(wanted) if not _peer_installed(bindir, p)]
    if missing and install:
        print(f"# installing {' '.join(missing)} into {venv} (first use)", flush=True)
        try:
            if not (bindir / "python").exists():
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                               capture_output=True)
            subprocess.run([str(bindir / "python"), "-m", "pip", "install", "-q", *missing],
                           check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            print(f"# peer install failed: {(e.stderr or '')[-800:]}", flush=True)
    return {p: bindir if _peer_installed(bindir, p)
            else f"`pip install {p}` into {venv} failed or was not tried (--no-install)"
            for p in wanted}


def _peer_installed(bindir: Path, peer: str) -> bool:
    module = peer.replace("-", "_")
    return (bindir / "python").exists() and subprocess.run(
        [str(bindir / "python"), "-c", f"import {module}"], capture_output=True).returncode == 0


def peer_version(bindir: Path, peer: str) -> str:
    out = subprocess.run([str(bindir / "python"), "-c",
                          f"import importlib.metadata as m; print(m.version({peer!r}))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


GATEWAY = [sys.executable, "-m", "prescient", "gateway"]


# ---- measuring -------------------------------------------------------------------------------


@dataclass
class Run:
    """One measurement of one setup; `result` is wrk's or the load generator's JSON."""

    setup: str
    test: str  # "closed", "open" or "slow"
    mode: str  # "ns" (non-stream) or "s" (stream)
    load: float  # connections (closed, slow) or requests/s (open)
    repeat: int
    result: dict[str, float]
    proxy_cpu_s: float | None
    wall_s: float
    busy: dict[int, float]


def _measured(proxy: Child | None, go: Callable[[], dict[str, float]]
              ) -> tuple[dict[str, float], float | None, float, dict[int, float]]:
    cpu0 = cpu_seconds(proxy.pid) if proxy else None
    cores0, t0 = core_times(), time.perf_counter()
    result = go()
    wall, cores1 = time.perf_counter() - t0, core_times()
    cpu = cpu_seconds(proxy.pid) - cpu0 if proxy and cpu0 is not None else None
    return result, cpu, wall, busy_shares(cores0, cores1)


def wrk_argv(port: int, conns: int, seconds: float, timeout_s: float = 2.0) -> list[str]:
    # wrk takes whole seconds only
    return ["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout_s:g}s", "-s", str(HERE / "post.lua"),
            f"http://127.0.0.1:{port}{PATH}"]


def wrk(ctx: Ctx, port: int, body_json: str, conns: int, seconds: float,
        timeout_s: float = 2.0) -> dict[str, float]:
    argv = wrk_argv(port, conns, seconds, timeout_s)
    env = {"WRK_BODY": body_json}
    _note(ctx, "wrk", shell_line(argv, env).replace(f":{port}/", ":$PORT/"))
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env},
                         timeout=seconds + 60)
    return wrk_result(out.returncode, out.stdout + out.stderr)


def wrk_result(returncode: int, output: str) -> dict[str, float]:
    """wrk's JSON line (bench/gateway/post.lua prints it), with req/s and an error total."""
    line = next((x for x in output.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result (rc {returncode}): {output[-500:]}")
    res: dict[str, float] = json.loads(line[len("WRKJSON "):])
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["errors"] = res["connect"] + res["read"] + res["write"] + res["status"] + res["timeout"]
    return res


def loadgen(ctx: Ctx, port: int, body_json: str, rate: float, plan: Plan) -> dict[str, float]:
    argv = ["taskset", "-c", "0", sys.executable, str(HERE / "loadgen.py"), "--port", str(port),
            "--path", PATH, "--rate", f"{rate:g}", "--seconds", f"{plan.open_seconds:g}",
            "--warmup", f"{plan.open_warmup:g}", "--body", body_json]
    _note(ctx, "loadgen", shell_line(argv).replace(f"--port {port} ", "--port $PORT "))
    out = subprocess.run(argv, capture_output=True, text=True,
                         timeout=plan.open_seconds + plan.open_warmup + 60)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed (rc {out.returncode}): {out.stderr[-800:]}")
    res: dict[str, float] = json.loads(out.stdout)
    return res


def _note(ctx: Ctx, name: str, line: str) -> None:
    entry = f"[{name}] {line}"
    if entry not in ctx.children.commands:
        ctx.children.commands.append(entry)


def measure(ctx: Ctx, name: str, started: Started, plan: Plan, repeat: int) -> list[Run]:
    """Every test of one setup, in a fixed order: warm-up, closed loop, open loop, slow."""
    port, proxy = started.port, started.proxy
    for mode in ("ns", "s"):
        wrk(ctx, port, BODIES[mode], 64, plan.warmup)
    runs: list[Run] = []

    def record(test: str, mode: str, load: float, go: Callable[[], dict[str, float]]) -> None:
        res, cpu, wall, busy = _measured(proxy, go)
        run = Run(name, test, mode, load, repeat, res, cpu, wall, busy)
        runs.append(run)
        print("  " + report.run_line(run), flush=True)

    if plan.closed:
        for mode in ("ns", "s"):
            for c in plan.conns:
                record("closed", mode, c, lambda m=mode, c=c: wrk(ctx, port, BODIES[m], c,
                                                                  plan.seconds))
    if plan.open:
        for rate in plan.rates:
            for mode in ("ns", "s"):
                record("open", mode, rate, lambda m=mode, r=rate: loadgen(ctx, port, BODIES[m],
                                                                          r, plan))
    if plan.slow:
        record("slow", "s", SLOW_CONNECTIONS, lambda: wrk(
            ctx, port, body(True, slow=True), SLOW_CONNECTIONS, plan.slow_seconds, 10.0))
    return runs


def backend_counts(ctx: Ctx) -> list[int]:
    return [int(json.loads(get(p, "/stats")[1])["requests"]) for p in ctx.backends]


@dataclass
class Outcome:
    runs: list[Run] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    facts: dict[str, dict[str, object]] = field(default_factory=dict)


def run_setup(ctx: Ctx, name: str, plan: Plan, repeat: int, out: Outcome) -> None:
    print(f"# {name} (repeat {repeat + 1}/{plan.repeats})", flush=True)
    try:
        started = STARTERS[name](ctx)
    except Skip as e:
        out.skipped[name] = str(e)
        print(f"  skipped: {e}", flush=True)
        return
    try:
        wait_for_port(started.port, started.proxy, ctx.start_timeout)
        wait_until_serving(started.port, PATH, [BODIES["ns"].encode(), BODIES["s"].encode()],
                           started.proxy, ctx.start_timeout)
        before = backend_counts(ctx)
        out.runs += measure(ctx, name, started, plan, repeat)
        split = [a - b for a, b in zip(backend_counts(ctx), before, strict=True)]
        threads, rss = threads_and_rss_mb(started.proxy.pid) if started.proxy else (0, 0.0)
        out.facts[name] = {"threads": threads, "rss_mb": rss, "split": split}
    except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired) as e:
        detail = started.proxy.tail(1500) if started.proxy else ""
        out.skipped[name] = f"failed: {e}"
        print(f"  failed: {e}\n  log tail:\n{detail}", flush=True)
    finally:
        for child in started.helpers or ([started.proxy] if started.proxy else []):
            ctx.children.stop(child)


# ---- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 s runs, one repeat, 500 req/s only")
    p.add_argument("--seconds", type=int, help="closed-loop (wrk) run length, whole s (default 12)")
    p.add_argument("--open-seconds", type=float, help="open-loop window, s (default 10)")
    p.add_argument("--repeats", type=int, help="repeats of every setup (default 2)")
    p.add_argument("--setups", default=",".join(SETUPS),
                   help=f"comma-separated subset of {','.join(SETUPS)}")
    p.add_argument("--rates", help="open-loop rates, req/s (default 500,200)")
    p.add_argument("--conns", help="closed-loop connections (default 64,256)")
    p.add_argument("--no-slow", action="store_true", help="skip the 512 slow streams test")
    p.add_argument("--no-closed", action="store_true", help="skip the closed-loop runs")
    p.add_argument("--no-open", action="store_true", help="skip the open-loop runs")
    p.add_argument("--peers-venv", type=Path, default=PEERS_VENV,
                   help="venv of vllm-router and sglang-router (created on first use)")
    p.add_argument("--no-install", action="store_true",
                   help="do not create the peers venv; skip peers that are missing")
    p.add_argument("--start-timeout", type=float, default=60.0,
                   help="how long a proxy may take to serve its first request, s")
    p.add_argument("--log-dir", type=Path, help="children's logs (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write every run as JSON here")
    return p.parse_args()


def make_plan(args: argparse.Namespace) -> Plan:
    q = args.quick
    seconds = args.seconds or (2 if q else 12)
    rates = args.rates or ("500" if q else "500,200")
    return Plan(
        seconds=seconds, open_seconds=args.open_seconds or (2.0 if q else 10.0),
        open_warmup=0.5 if q else 1.0, slow_seconds=max(seconds, 3),
        warmup=1.0 if q else 2.0, repeats=args.repeats or (1 if q else 2),
        conns=[int(x) for x in (args.conns or "64,256").split(",")],
        rates=[float(x) for x in rates.split(",")],
        slow=not args.no_slow, closed=not args.no_closed, open=not args.no_open)


def main() -> int:
    args = parse_args()
    check_machine()
    names = [s.strip() for s in args.setups.split(",") if s.strip()]
    if unknown := [n for n in names if n not in STARTERS]:
        sys.exit(f"gateway_overhead: --setups: unknown {unknown}; choose from {SETUPS}")
    os.sched_setaffinity(0, {0})  # this driver and everything it starts stay off core 1
    plan = make_plan(args)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="gateway-overhead-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    wanted = {n.rsplit("-", 1)[0] for n in names if n.endswith("-router-1c")}
    peers = ensure_peers(args.peers_venv, wanted, not args.no_install)
    versions = {p: peer_version(b, p) for p, b in peers.items() if isinstance(b, Path)}
    children = Children(log_dir)
    ctx = Ctx(children, [free_port(), free_port()],
              {n: free_port() for n in names if n != "direct"}, peers,
              GATEWAY, versions, args.start_timeout)
    out = Outcome()
    print(report.preamble(plan, names, versions, log_dir, quick=args.quick), flush=True)
    try:
        for port in ctx.backends:
            b = children.start(f"backend-{port}", [sys.executable, str(HERE / "fake_backend.py"),
                                                   "--port", str(port)], core=0)
            wait_for_port(port, b)
        for repeat in range(plan.repeats):
            for name in names:
                if name not in out.skipped:
                    run_setup(ctx, name, plan, repeat, out)
    finally:
        children.stop_all()
    ports = ", ".join([f"backends {ctx.backends[0]} and {ctx.backends[1]}",
                       *(f"{n} {p}" for n, p in ctx.ports.items())])
    print(report.render(out.runs, out.skipped, out.facts, plan, versions,
                        [f"($PORT in wrk/loadgen lines: direct = the first backend; ports: "
                         f"{ports})", *children.commands], quick=args.quick))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "plan": asdict(plan), "versions": versions, "skipped": out.skipped,
            "facts": out.facts, "commands": children.commands,
            "runs": [asdict(r) for r in out.runs]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
