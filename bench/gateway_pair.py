"""Requests per core, side by side in the same windows: a Rust router and our gateway at once.

bench/gateway_overhead.py runs one proxy at a time. On these VMs the speed of a core drifts
10-20 % between windows minutes apart, more than the differences it is asked to settle (our
gateway against vllm-router, per core). Here both proxies run at the same time, both pinned to
core 1, each under its own `wrk -t1 -c64` on core 0 (with the fake backends, Redis and the CMS
feeder, as in gateway_overhead.py). Each window starts both proxies afresh (a proxy whose cost
grew with its age would otherwise weigh on the later windows), warms them up for 2 s, then
measures both proxies' CPU (utime+stime of the process tree) and completed requests; CPU per
request is what a saturated core divides into requests/s, so the ratio peer / ours of CPU per
request is ours / peer of requests per core, measured under the same machine speed. Each
window prints both, then the median over windows.

Sharing a core makes every request cost a little more than on a core of its own (fewer events
per wake-up), for both proxies alike; absolute numbers are for gateway_overhead.py.

Run from the repository root, on a quiet machine:

    .venv/bin/python bench/gateway_pair.py                       # both pairs, ~8 minutes
    .venv/bin/python bench/gateway_pair.py --pairs vllm-router-1c:prescient-full --windows 9

Needs what gateway_overhead.py needs (Linux, taskset, wrk, redis-server for full mode; the Rust
routers are installed into bench/.peers-venv on first use).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gateway.procs import Children, cpu_seconds, free_port, wait_for_port, wait_until_serving
from gateway_overhead import (
    BODIES,
    GATEWAY,
    HERE,
    PATH,
    PEERS_VENV,
    STARTERS,
    Ctx,
    Skip,
    Started,
    check_machine,
    ensure_peers,
    peer_version,
    wrk_argv,
    wrk_result,
)

DEFAULT_PAIRS = "vllm-router-1c:prescient-full,vllm-router-1c:prescient-lite"


def window(started: dict[str, Started], mode: str, conns: int, seconds: int
           ) -> dict[str, tuple[float, float]]:
    """One window: a wrk per proxy at once; per proxy (req/s, CPU us per request)."""
    env = {**os.environ, "WRK_BODY": BODIES[mode]}
    cpu0 = {n: cpu_seconds(s.proxy.pid) for n, s in started.items() if s.proxy}
    runs = {n: subprocess.Popen(wrk_argv(s.port, conns, seconds), env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for n, s in started.items()}
    outs = {n: p.communicate(timeout=seconds + 60)[0] for n, p in runs.items()}
    cpu = {n: cpu_seconds(s.proxy.pid) - cpu0[n] for n, s in started.items() if s.proxy}
    out = {}
    for name, text in outs.items():
        res = wrk_result(runs[name].returncode, text)
        if res["errors"]:
            raise RuntimeError(f"{name}: {res['errors']:.0f} wrk errors in a window "
                               f"({res['timeout']:.0f} over wrk's 2 s timeout; p99 "
                               f"{res['p99_us'] / 1000:.0f} ms)")
        # the proxy's CPU while its wrk ran (connecting included) against the requests done
        out[name] = (res["rps"], cpu[name] / res["requests"] * 1e6 if res["requests"] else 0.0)
    return out


def fresh_window(ctx: Ctx, peer: str, ours: str, mode: str, args: argparse.Namespace
                 ) -> dict[str, tuple[float, float]]:
    """Both proxies started afresh, warmed up together, then one measured window."""
    started: dict[str, Started] = {}
    try:
        for name in (peer, ours):
            started[name] = STARTERS[name](ctx)
        for s in started.values():
            wait_for_port(s.port, s.proxy, ctx.start_timeout)
            wait_until_serving(s.port, PATH, [BODIES["ns"].encode(), BODIES["s"].encode()],
                               s.proxy, ctx.start_timeout)
        window(started, mode, args.conns, 2)  # warm-up
        return window(started, mode, args.conns, args.seconds)
    finally:
        for s in started.values():
            for child in s.helpers or ([s.proxy] if s.proxy else []):
                ctx.children.stop(child)


def run_pair(ctx: Ctx, peer: str, ours: str, args: argparse.Namespace) -> list[str]:
    """`args.windows` windows per mode, each with both proxies fresh; summary table rows."""
    lines = []
    for mode in args.modes.split(","):
        ratios = []
        for k in range(args.windows):
            w = fresh_window(ctx, peer, ours, mode, args)
            (p_rps, p_us), (o_rps, o_us) = w[peer], w[ours]
            ratios.append(p_us / o_us)
            print(f"  {mode:>2} window {k + 1}: {peer} {p_rps:,.0f} req/s {p_us:.1f} us/req"
                  f" | {ours} {o_rps:,.0f} req/s {o_us:.1f} us/req | "
                  f"{ours} / {peer} per core {ratios[-1]:.3f}", flush=True)
        label = "non-stream" if mode == "ns" else "stream (16 events)"
        lines.append(f"| {ours} / {peer} | {label} | {statistics.median(ratios):.3f} | "
                     f"{min(ratios):.3f} - {max(ratios):.3f} | "
                     + " ".join(f"{r:.2f}" for r in ratios) + " |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--pairs", default=DEFAULT_PAIRS,
                   help=f"comma-separated peer:ours pairs (default {DEFAULT_PAIRS})")
    p.add_argument("--windows", type=int, default=7, help="measured windows per pair and mode")
    p.add_argument("--seconds", type=int, default=8, help="window length, whole s")
    p.add_argument("--conns", type=int, default=64, help="wrk connections per proxy")
    p.add_argument("--modes", default="ns,s", help="ns (non-stream) and/or s (stream)")
    p.add_argument("--peers-venv", type=Path, default=PEERS_VENV)
    p.add_argument("--start-timeout", type=float, default=60.0)
    args = p.parse_args()
    check_machine()
    pairs = [tuple(x.split(":")) for x in args.pairs.split(",") if x]
    for pair in pairs:
        if len(pair) != 2 or any(n not in STARTERS or n == "direct" for n in pair):
            sys.exit(f"gateway_pair: --pairs: bad pair {':'.join(pair)!r}; use peer:ours "
                     f"with names from {', '.join(n for n in STARTERS if n != 'direct')}")
    os.sched_setaffinity(0, {0})
    names = sorted({n for pair in pairs for n in pair})
    wanted = {n.rsplit("-", 1)[0] for n in names if n.endswith("-router-1c")}
    peers = ensure_peers(args.peers_venv, wanted, install=True)
    versions = {p: peer_version(b, p) for p, b in peers.items() if isinstance(b, Path)}
    children = Children(Path(tempfile.mkdtemp(prefix="gateway-pair-")))
    ctx = Ctx(children, [free_port(), free_port()], {n: free_port() for n in names}, peers,
              GATEWAY, versions, args.start_timeout)
    print(f"# same-window pairs, both proxies on core 1; wrk -t1 -c{args.conns} each, "
          f"{args.seconds} s windows; peers: {versions}", flush=True)
    table = ["| pair | mode | ours / peer, requests per core (median) | range | windows |",
             "|---|---|---|---|---|"]
    try:
        for port in ctx.backends:
            b = children.start(f"backend-{port}", [sys.executable, str(HERE / "fake_backend.py"),
                                                   "--port", str(port)], core=0)
            wait_for_port(port, b)
        for peer, ours in pairs:
            print(f"# {ours} beside {peer}", flush=True)
            try:
                table += run_pair(ctx, peer, ours, args)
            except Skip as e:
                print(f"  skipped: {e}", flush=True)
    finally:
        children.stop_all()
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
