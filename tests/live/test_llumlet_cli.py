"""`prescient llumlet` beside a stock-like engine: a `prescient sim-engine` process without its
own llumlet (it serves vLLM's /metrics names), a llumlet process scraping it into the shared
Redis, and what the CMS shows as the engine works, dies, and the llumlet stops."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
import redis.asyncio as aioredis

from prescient.cms.codec import decode_status
from prescient.cms.redis_store import RedisStore
from prescient.cms.store import status_key
from prescient.model import InferType, InstanceStatus

from .harness import RedisTarget, child, free_port, shared_redis

IID = "stock-0"
T = TypeVar("T")


async def wait_for(probe: Callable[[], Awaitable[T]], timeout_s: float = 15.0) -> T:
    """`probe()`'s first truthy value, or TimeoutError."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not (value := await probe()):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)
    return value


async def watch(redis: RedisTarget, engine_port: int, engine: subprocess.Popen[bytes],
                llumlet: subprocess.Popen[bytes]) -> None:
    store = RedisStore(redis.host, redis.port, db=redis.db)
    raw = aioredis.Redis(host=redis.host, port=redis.port, db=redis.db)
    base = f"http://127.0.0.1:{engine_port}"

    async def status() -> InstanceStatus | None:
        return (await store.read_statuses([IID]))[IID]

    try:
        metadata = (await wait_for(store.read_metadata))[IID]
        assert (metadata.ip, metadata.api_server_port) == ("127.0.0.1", engine_port)
        assert metadata.backend_type == "vLLM v1" and metadata.instance_type == InferType.DECODE
        first = await wait_for(status)
        assert first.schedulable and first.num_running_requests == 0
        assert first.num_total_gpu_tokens > 0  # from vllm:cache_config_info
        # the key holds upstream's protobuf InstanceStatus
        wire = decode_status(await raw.get(status_key(IID)), IID)
        assert wire.instance_id == IID and wire.timestamp_ms > 0

        async with aiohttp.ClientSession() as http:
            body = {"model": "prescient-sim", "prompt": "hello", "max_tokens": 5000,
                    "stream": True}
            async with http.post(base + "/v1/completions", json=body) as response:
                assert response.status == 200
                busy = await wait_for(lambda: _matching(status, lambda s: (
                    s.num_running_requests == 1 and s.num_used_gpu_tokens > 0)))
                assert busy.update_id > first.update_id
        await wait_for(lambda: _matching(status, lambda s: s.num_running_requests == 0))

        engine.kill()  # the engine dies: scrapes fail, the instance turns unschedulable
        engine.wait()
        down = await wait_for(lambda: _matching(status, lambda s: not s.schedulable))
        assert IID in await store.read_metadata()  # still registered, just not schedulable
        assert down.timestamp_ms > busy.timestamp_ms

        llumlet.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(llumlet.wait, 15) == 0
        assert IID not in await store.read_metadata()
        assert await status() is None
    finally:
        await raw.aclose()
        await store.close()


async def _matching(probe: Callable[[], Awaitable[InstanceStatus | None]],
                    test: Callable[[InstanceStatus], bool]) -> InstanceStatus | None:
    found = await probe()
    return found if found is not None and test(found) else None


def test_the_llumlet_cli_registers_a_stock_engine_and_tracks_it(tmp_path: Path) -> None:
    engine_port = free_port()
    with shared_redis() as redis, child(
            ["sim-engine", "--host", "127.0.0.1", "--port", str(engine_port),
             "--time-scale", "20"], port=engine_port, log=tmp_path / "engine.log") as engine, \
            child(["llumlet", "--engine-url", f"http://127.0.0.1:{engine_port}",
                   "--instance-id", IID, "--instance-type", "decode",
                   "--scrape-interval-ms", "50", "--cms-redis-host", redis.host,
                   "--cms-redis-port", str(redis.port), "--cms-redis-db", str(redis.db)],
                  log=tmp_path / "llumlet.log") as llumlet:
        asyncio.run(watch(redis, engine_port, engine, llumlet))
    assert "Traceback" not in (tmp_path / "llumlet.log").read_text()


def test_a_bad_engine_url_exits_2_naming_the_flag() -> None:
    bad = subprocess.run([sys.executable, "-m", "prescient", "llumlet", "--engine-url",
                          "localhost:8000"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--engine-url" in bad.stderr
