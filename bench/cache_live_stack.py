"""Cache-aware scheduling through the live stack: prefix hits and TTFT by `--cache-index`.

Real processes on the shared Redis (a database of its own): four `prescient sim-engine`s
(llama3-8b-h100 step times at `--time-scale 10`, KV events on, a small KV cache of 500 blocks
= 8k tokens each, `GPU_BLOCKS=` to change, so sessions evict each other's history), one
full-mode scheduler service per configuration and a gateway in front of it:

- `round-robin`: a lite-mode gateway cycling over the engines;
- `load-balance`: full mode, no cache awareness;
- `approximate`: cache-aware on the router's own history (TTL 120 s);
- `kv-events`: cache-aware on the engines' KV events.

Workload: 64 chat sessions, 5 turns each, run 7 at a time (not a multiple of the engines, so
round-robin does not send a session back to its engine by lockstep); a turn sends the session's
history (first prompt 2,000-4,000 token ids, then +300 per turn) as a streamed completion of 16
tokens and waits 0.1-0.5 s. Every configuration gets the same sessions on freshly started
engines (empty caches). Measured: prefix hit rate from the engines' own counters
(`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`), client TTFT (first SSE
chunk; p50 / p99, wall ms), and wall time.

    .venv/bin/python bench/cache_live_stack.py [CONFIG,...]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.live.harness import free_port, shared_redis
from tests.live.stack import (
    MODEL,
    Stack,
    cms_flags,
    engine_args,
    gateway_args,
    metric,
    scheduler_args,
    wait_until,
)

ENGINES = 4
GPU_BLOCKS = int(os.environ.get("GPU_BLOCKS", "500"))
SESSIONS, TURNS, CONCURRENCY = 64, 5, 7  # 7: no lockstep with round-robin's 4
SEED = "0"
CONFIGS = {
    "round-robin": None,
    "load-balance": (),
    "approximate": ("--enable-cache-aware-scheduling", "--cache-aware-scheduling-min-tokens",
                    "256"),
    "kv-events": ("--enable-cache-aware-scheduling", "--cache-aware-scheduling-min-tokens",
                  "256", "--cache-index", "kv-events", "--prefix-caching-hash-seed", SEED),
}


def sessions() -> list[list[list[int]]]:
    rng = random.Random(0)
    out = []
    for s in range(SESSIONS):
        history = [rng.randrange(100, 30_000) for _ in range(rng.randrange(2000, 4000))]
        turns = []
        for _ in range(TURNS):
            turns.append(list(history))
            history += [rng.randrange(100, 30_000) for _ in range(300)]
        out.append(turns)
        del s
    return out


async def run_sessions(url: str, work: list[list[list[int]]]) -> list[float]:
    ttfts: list[float] = []
    gate = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def one(k: int, turns: list[list[int]]) -> None:
            think = random.Random(k)
            async with gate:
                for prompt in turns:
                    t0 = time.perf_counter()
                    async with http.post(url + "/v1/completions", json={
                            "model": MODEL, "prompt": prompt, "max_tokens": 16,
                            "stream": True}) as r:
                        assert r.status == 200, await r.text()
                        first = None
                        async for _ in r.content:
                            if first is None:
                                first = time.perf_counter() - t0
                    ttfts.append(first or 0.0)
                    await asyncio.sleep(think.uniform(0.1, 0.5))

        await asyncio.gather(*(one(k, t) for k, t in enumerate(work)))
    return ttfts


def measure(name: str, flags: tuple[str, ...] | None, work: list[list[list[int]]],
            logs: Path) -> str:
    stack = Stack(logs / name)
    (logs / name).mkdir()
    try:
        with shared_redis() as redis:
            def kv_engine(port: int) -> list[str]:
                events = json.dumps({"enable_kv_cache_events": True,
                                     "endpoint": f"tcp://*:{free_port()}",
                                     "replay_endpoint": f"tcp://*:{free_port()}"})
                return [*engine_args(redis, time_scale=10.0, ttl_s=10.0)(port),
                        "--num-gpu-blocks", str(GPU_BLOCKS), "--kv-events-config", events]

            engines = stack.start([(f"engine-{i}", kv_engine) for i in range(ENGINES)])
            if flags is None:
                [gateway] = stack.start([("gateway", gateway_args(
                    engines, "--enable-full-mode-scheduling=false", "--scheduling-policy",
                    "round-robin"))])
            else:
                [sched] = stack.start([("scheduler", scheduler_args(*cms_flags(redis),
                                                                    *flags))])
                wait_until(lambda: metric(sched, "prescient_scheduler_instances") == ENGINES,
                           20, "the scheduler to see every engine", stack)
                if "kv-events" in flags:
                    wait_until(lambda: metric(
                        sched, "prescient_scheduler_kv_events_subscriptions") == ENGINES, 20,
                        "the KV-event subscriptions", stack)
                [gateway] = stack.start([("gateway", gateway_args(
                    engines, "--scheduler-endpoints", sched.address))])
            t0 = time.perf_counter()
            ttfts = asyncio.run(run_sessions(gateway.url, work))
            wall = time.perf_counter() - t0
            hits = sum(metric(e, "vllm:prefix_cache_hits_total") for e in engines)
            queries = sum(metric(e, "vllm:prefix_cache_queries_total") for e in engines)
            p99 = sorted(ttfts)[int(0.99 * (len(ttfts) - 1))]
            return (f"| {name} | {hits / queries:.1%} | {statistics.median(ttfts) * 1e3:.0f} | "
                    f"{p99 * 1e3:.0f} | {wall:.1f} |")
    finally:
        stack.close()


def main() -> int:
    only = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CONFIGS)
    os.environ["PYTHONHASHSEED"] = SEED  # the engines' hash root, as vLLM's must be set
    work = sessions()
    print(f"{SESSIONS} sessions x {TURNS} turns, {CONCURRENCY} at a time, {ENGINES} engines\n")
    print("| configuration | prefix hit rate | p50 TTFT (ms) | p99 TTFT (ms) | wall (s) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in only:
            flags = CONFIGS[name]
            print(measure(name, flags, work, Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
