"""`prescient sim-engine` as a process, and its built-in llumlet writing to a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from prescient.cms.redis_store import RedisStore
from prescient.model import InferType, InstanceStatus

from .harness import RedisTarget, free_port, shared_redis, wait_for_port
from .test_sim_engine_server import MODEL, serving


async def wait_for(condition: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not (value := await condition()):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)
    return value


def llumlet_flags(redis: RedisTarget) -> dict[str, Any]:
    return {"enable_llumlet": True, "cms_redis_host": redis.host, "cms_redis_port": redis.port,
            "cms_redis_db": redis.db, "llumlet_status_push_interval_s": 0.02}


def test_the_llumlet_registers_pushes_statuses_with_request_ids_and_leaves() -> None:
    async def main(redis: RedisTarget) -> None:
        store = RedisStore(redis.host, redis.port, db=redis.db)
        try:
            async with serving(instance_type="prefill", max_num_seqs=1,
                               **llumlet_flags(redis)) as (base, server):
                iid = server.settings.resolved_instance_id
                metadata = (await wait_for(store.read_metadata))[iid]
                assert metadata.instance_type == InferType.PREFILL
                assert (metadata.ip, metadata.api_server_port) == ("127.0.0.1",
                                                                   server.settings.port)
                assert metadata.block_size == 16 and metadata.max_num_batched_tokens == 8192
                assert (await store.read_statuses([iid]))[iid] is not None  # from the start

                async def one_waits() -> bool:
                    status: InstanceStatus | None = (await store.read_statuses([iid]))[iid]
                    return (status is not None and status.num_running_requests == 1
                            and len(status.waiting_requests) == 1
                            and status.waiting_requests[0] in ("cms-1", "cms-2"))

                async with aiohttp.ClientSession() as http:
                    body = {"model": MODEL, "prompt": "hi", "max_tokens": 300, "stream": True}
                    posts = [asyncio.create_task(http.post(
                        base + "/v1/completions", json=body, headers={"x-request-id": rid}))
                        for rid in ("cms-1", "cms-2")]
                    await wait_for(one_waits)  # one runs, the other waits, under its own id
                    for task in posts:
                        (await task).close()
            # a clean shutdown deletes both keys
            assert iid not in await store.read_metadata()
            assert (await store.read_statuses([iid]))[iid] is None
        finally:
            await store.close()

    with shared_redis() as redis:
        asyncio.run(main(redis))


def run_cli(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "prescient.simengine", *args],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_the_cli_serves_and_shuts_down_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    with shared_redis() as redis:
        log = tmp_path / "sim.log"
        proc = run_cli(["--host", "127.0.0.1", "--port", str(port), "--time-scale", "50",
                        "--model", "tiny", "--enable-llumlet", "--cms-redis-db", str(redis.db),
                        "--cms-redis-port", str(redis.port), "--instance-id", "cli-sim"], log)
        try:
            wait_for_port(port)

            async def request() -> dict[str, Any]:
                async with aiohttp.ClientSession() as http:
                    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
                    async with http.post(f"http://127.0.0.1:{port}/v1/completions",
                                         json=body) as r:
                        assert r.status == 200
                        return dict(await r.json())

            assert asyncio.run(request())["usage"]["completion_tokens"] == 4
            deadline = time.monotonic() + 10
            while redis.cli("EXISTS", "llumnix:instance_metadata:cli-sim") != "1":
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, log.read_text()
            assert redis.cli("EXISTS", "llumnix:instance_metadata:cli-sim") == "0"
            assert redis.cli("EXISTS", "llumnix:instance_status:cli-sim") == "0"
            assert "Traceback" not in log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_bad_flags_exit_2_naming_the_flag(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = str(busy.getsockname()[1])
    for args, needle in ((["--host", "127.0.0.1", "--port", busy_port], "--port " + busy_port),
(["--preset", "gpt-9"], "--preset"),
                         (["--time-scale", "0"], "--time-scale"),
                         (["--max-num-seqs", "300", "--max-num-batched-tokens", "200"],
                          "--max-num-batched-tokens"),
                         (["--tokenizer", str(tmp_path / "none")], "none")):
        log = tmp_path / "bad.log"
        proc = run_cli(args, log)
        assert proc.wait(timeout=30) == 2, args
        text = log.read_text()
        assert needle in text and "Traceback" not in text, text
    busy.close()
