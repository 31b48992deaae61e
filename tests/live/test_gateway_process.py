"""The gateway as it runs: built from settings (embedded full-mode scheduler on a Redis CMS) and
as a process (`python -m prescient.gateway`) that shuts down cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest
from openai import AsyncOpenAI

from prescient.cms.redis_store import RedisStore
from prescient.config.gateway import load_gateway_settings
from prescient.errors import ConfigError
from prescient.gateway.wiring import build_gateway
from prescient.model import InstanceMetadata, InstanceStatus

from .gateway_fakes import MODEL, FakeEngine
from .harness import free_port, shared_redis, wait_for_port


async def _publish(store: RedisStore, engines: dict[str, FakeEngine], loads: dict[str, int],
                   update_id: int) -> None:
    for iid, engine in engines.items():
        await store.put_metadata(InstanceMetadata(
            instance_id=iid, ip="127.0.0.1", api_server_port=engine.port, unit_id=iid), 60.0)
        await store.put_status(InstanceStatus(
            instance_id=iid, timestamp_ms=int(time.time() * 1000), update_id=update_id,
            num_total_gpu_tokens=100000, num_uncomputed_tokens_all_waiting_prefills=loads[iid]),
            60.0)


def test_embedded_full_mode_scheduler_reads_the_cms_and_follows_its_loads() -> None:
    async def main() -> None:
        a, b = FakeEngine("a"), FakeEngine("b")
        await a.start()
        await b.start()
        with shared_redis() as redis:
            writer = RedisStore(redis.host, redis.port, db=redis.db)
            engines = {"inst-a": a, "inst-b": b}
            await _publish(writer, engines, {"inst-a": 50000, "inst-b": 0}, 1)
            settings = load_gateway_settings(
                ["--cms-redis-host", redis.host, "--cms-redis-port", str(redis.port),
                 "--cms-redis-db", str(redis.db), "--cms-pull-status-interval-ms", "20",
                 "--llm-backend-discovery", "endpoints", "--llm-backend-endpoints",
                 f"{a.address},{b.address}"], {})
            gateway = build_gateway(settings)
            await gateway.start()
            server = await gateway.serve("127.0.0.1", 0)
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
                                 "/v1", api_key="x", max_retries=0)
            try:
                first = await client.completions.create(model=MODEL, prompt="hello")
                await _publish(writer, engines, {"inst-a": 0, "inst-b": 50000}, 2)
                deadline = time.monotonic() + 10
                while True:  # the next poll moves the load: requests follow it to a
                    out = await client.completions.create(model=MODEL, prompt="hello")
                    if out.choices[0].text == "hi from a" or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.02)
            finally:
                await client.close()
                server.close()
                await gateway.close()
                await writer.close()
                a.close()
                b.close()
        assert first.choices[0].text == "hi from b"
        assert out.choices[0].text == "hi from a"

    asyncio.run(main())


def test_sigterm_stops_the_gateway_process_cleanly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        engine = await FakeEngine("a").start()
        port = free_port()
        log = tmp_path / "gateway.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prescient.gateway", "--host", "127.0.0.1", "--port",
                 str(port), "--scheduling-policy", "round-robin", "--llm-backend-endpoints",
                 engine.address], stdout=out, stderr=subprocess.STDOUT)
        try:
            await asyncio.to_thread(wait_for_port, port)
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                 max_retries=0)
            done = await client.completions.create(model=MODEL, prompt="x")
            await client.close()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            engine.close()
        assert done.choices[0].text == "hi from a"
        assert code == 0, log.read_text()
        assert "gateway listening" in log.read_text()

    asyncio.run(main())


def test_print_config_and_bad_flags() -> None:
    out = subprocess.run([sys.executable, "-m", "prescient.gateway", "--print-config",
                          "--llm-backend-endpoints", "h:1", "--service-token", "t0ken"],
                         capture_output=True, text=True, check=True).stdout
    assert "retry_max_count: 2" in out and "t0ken" not in out
    bad = subprocess.run([sys.executable, "-m", "prescient.gateway", "--retry-max-count", "-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--retry-max-count" in bad.stderr


def test_a_port_in_use_is_a_config_error_naming_the_flag() -> None:
    async def main() -> None:
        from prescient.gateway.cli import serve_until_signalled

        blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = blocker.sockets[0].getsockname()[1]
        settings = load_gateway_settings(
            ["--host", "127.0.0.1", "--port", str(port), "--scheduling-policy", "round-robin",
             "--llm-backend-endpoints", "127.0.0.1:1"], {})
        with pytest.raises(ConfigError, match="--port"):
            await serve_until_signalled(settings, asyncio.Event())
        blocker.close()

    asyncio.run(main())
