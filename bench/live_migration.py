"""What a live migration costs the client: the stream's gap while a request moves between two
`prescient sim-engine` servers over the llumlet gRPC service (issue 7).

Two engines run in this process in real time (`--time-scale 1`), each with its llumlet's gRPC
service; a client streams completions from engine A through plain HTTP (aiohttp), and after
`--migrate-at` tokens `Migrate` (NUM_REQ 1) moves the request to B. Per request the bench
records the client's inter-chunk gaps: the median of the unmigrated stretch, and the largest
gap from the Migrate call to the end (the downtime the client sees: the stop, the final copy at
`--kv-transfer-bandwidth-gb-s`, the commit RPC, B's next step and the first forwarded update).
Baseline rows stream the same requests without migrating, side by side in the same run.

    .venv/bin/python bench/live_migration.py                 # 20 requests each way, ~1 min
    .venv/bin/python bench/live_migration.py --requests 5    # quick
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time

import aiohttp

from prescient.config.sim_engine import SimEngineSettings
from prescient.llumlet.proto import llumlet_server_pb2 as pb
from prescient.llumlet.rpc import LlumletClient
from prescient.simengine.server import build_app, start_server

PROMPT = "the quick brown fox jumps over the lazy dog " * 60  # ~540 tokens of KV to move


async def _engine(name: str, port: int, grpc_port: int, preset: str) -> object:
    settings = SimEngineSettings(host="127.0.0.1", port=port, llumlet_port=grpc_port,
                                 instance_id=name, preset=preset, time_scale=1.0)
    runner = await start_server(settings, app=build_app(settings))
    return runner


async def _stream(http: aiohttp.ClientSession, base: str, rid: str, max_tokens: int,
                  migrate_at: int | None, llumlets: LlumletClient, src: str, dst_port: int
                  ) -> list[float]:
    """Client-side arrival times of every chunk (Migrate called after `migrate_at`)."""
    body = {"model": "prescient-sim", "prompt": PROMPT, "max_tokens": max_tokens,
            "stream": True}
    times: list[float] = []
    called = False
    async with http.post(base + "/v1/completions", json=body,
                         headers={"x-request-id": rid}) as r:
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            times.append(time.perf_counter())
            if migrate_at is not None and not called and len(times) >= migrate_at:
                called = True
                answer = await llumlets.migrate(src, pb.MigrateRequest(
                    src_engine_id="a", dst_engine_id="b", dst_engine_ip="127.0.0.1",
                    dst_engine_port=dst_port, migration_type="NUM_REQ",
                    migration_req_policy="LCR", num_reqs=1))
                assert answer.success, answer.message
    return times


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main(args: argparse.Namespace) -> None:
    ports = [_free_port() for _ in range(4)]
    while len(set(ports)) < 4:
        ports = [_free_port() for _ in range(4)]
    a = await _engine("a", ports[0], ports[1], args.preset)
    b = await _engine("b", ports[2], ports[3], args.preset)
    llumlets = LlumletClient()
    base = f"http://127.0.0.1:{ports[0]}"
    rows: dict[str, list[tuple[float, float]]] = {"no migration": [], "migrated": []}
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(args.requests):
                for label, at in (("no migration", None), ("migrated", args.migrate_at)):
                    times = await _stream(http, base, f"{label[:2]}-{i}", args.max_tokens,
                                          at, llumlets, f"127.0.0.1:{ports[1]}", ports[3])
                    gaps = [t1 - t0 for t0, t1 in itertools.pairwise(times)]
                    cut = args.migrate_at - 1  # the gap after the chunk that triggered it
                    rows[label].append((statistics.median(gaps[:cut]) * 1000,
                                        max(gaps[cut:]) * 1000))
    finally:
        await llumlets.close()
        await a.cleanup()  # type: ignore[attr-defined]
        await b.cleanup()  # type: ignore[attr-defined]
    print(f"{args.requests} requests each, prompt ~540 tokens, {args.max_tokens} output tokens, "
          f"preset {args.preset}, migrate after {args.migrate_at} tokens\n")
    print("| stream | median gap before, ms | largest gap after the call: p50 / max, ms |")
    print("|---|---|---|")
    for label, values in rows.items():
        steady = statistics.median(v[0] for v in values)
        worst = sorted(v[1] for v in values)
        print(f"| {label} | {steady:.1f} | {statistics.median(worst):.1f} / {worst[-1]:.1f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--migrate-at", type=int, default=100)
    p.add_argument("--preset", default="llama3-8b-h100")
    asyncio.run(main(p.parse_args()))
