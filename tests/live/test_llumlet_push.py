"""`prescient llumlet --status-endpoint`: statuses pushed by an engine plugin reach the CMS.

The pushing side is the vLLM plugin's own encoder (`prescient_vllm.status`, integrations/vllm)
on a real ZMQ PUSH socket; the engine beside it is a `prescient sim-engine` without a llumlet,
which the llumlet scrapes whenever the pushes stop. A real vLLM drives the same path in
tests/live/vllm."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import msgspec
import zmq

from prescient.cms.redis_store import RedisStore
from prescient.model import InstanceStatus

from .harness import RedisTarget, child, free_port, shared_redis
from .test_llumlet_cli import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integrations/vllm/src"))
from prescient_vllm.status import engine_status

IID = "pushed-0"


def plugin_status(step: int, running: int, prefilling: list[str]) -> bytes:
    stats = SimpleNamespace(num_running_reqs=running, num_waiting_reqs=0,
                            num_skipped_waiting_reqs=0, kv_cache_usage=0.5,
                            iteration_details=SimpleNamespace(
                                iteration_index=step, num_ctx_tokens=64, elapsed_ms=12.5,
                                is_dummy=False))
    table = [SimpleNamespace(external_req_id=rid, request_id=rid, prompt_len=64,
                             is_prefilling=True) for rid in prefilling]
    return msgspec.msgpack.encode(engine_status(stats, capacity=1024, step_id=step,
                                                requests=table))


async def exercise(redis: RedisTarget, endpoint: str) -> None:
    store = RedisStore(redis.host, redis.port, db=redis.db)
    try:
        await _exercise(store, endpoint)
    finally:
        await store.close()


async def _exercise(store: RedisStore, endpoint: str) -> None:
    async def status() -> InstanceStatus | None:
        return (await store.read_statuses([IID]))[IID]

    scraped = await wait_for(status)  # the idle engine's scrape
    assert scraped.num_total_gpu_tokens > 0 and scraped.profiling_id == -1
    # the engine's seq limit, as given to the llumlet, is registered for the predictor's replay
    assert (await store.read_metadata())[IID].max_num_seqs == 48
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.bind(endpoint)  # the engine binds, as the vLLM plugin does
    try:
        push.send(b"\x93not a status")  # dropped, logged: the llumlet carries on
        stop = asyncio.Event()

        async def engine_steps() -> None:
            step = 0
            while not stop.is_set():
                step += 1
                push.send(plugin_status(step, running=2, prefilling=["cmpl-r1-0"]))
                await asyncio.sleep(0.01)

        pushing = asyncio.create_task(engine_steps())
        pushed = await wait_for(lambda: _if(status, lambda s: s.num_running_requests == 2))
        assert pushed.update_id > scraped.update_id  # one counter for both kinds
        assert pushed.waiting_requests == ("cmpl-r1-0",)
        assert pushed.num_uncomputed_tokens_all_waiting_prefills == 64
        assert (pushed.num_total_gpu_tokens, pushed.num_used_gpu_tokens) == (1024, 512)
        assert pushed.profiling_id > 0 and pushed.step_duration == 12.5
        stop.set()
        await pushing
        # pushes stopped: after a scrape interval the idle engine's scrape takes over again
        again = await wait_for(lambda: _if(status, lambda s: s.num_running_requests == 0))
        assert again.update_id > pushed.update_id and again.waiting_requests == ()
    finally:
        push.close(linger=0)


async def _if(probe, test):  # type: ignore[no-untyped-def]
    found = await probe()
    return found if found is not None and test(found) else None


def test_pushed_statuses_win_while_the_engine_works_and_scrapes_resume(tmp_path: Path) -> None:
    engine_port = free_port()
    endpoint = f"ipc://{tmp_path}/status.ipc"
    with shared_redis() as redis, child(
            ["sim-engine", "--host", "127.0.0.1", "--port", str(engine_port)],
            port=engine_port, log=tmp_path / "engine.log"), \
            child(["llumlet", "--engine-url", f"http://127.0.0.1:{engine_port}",
                   "--instance-id", IID, "--status-endpoint", endpoint,
                   "--scrape-interval-ms", "100", "--max-num-seqs", "48",
                   "--cms-redis-host", redis.host,
                   "--cms-redis-port", str(redis.port), "--cms-redis-db", str(redis.db)],
                  log=tmp_path / "llumlet.log"):
        asyncio.run(exercise(redis, endpoint))
    log = (tmp_path / "llumlet.log").read_text()
    assert "Traceback" not in log and "does not decode" in log


def test_a_malformed_endpoint_exits_2_naming_the_flag() -> None:
    bad = subprocess.run([sys.executable, "-m", "prescient", "llumlet", "--status-endpoint",
                          "bogus://x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--status-endpoint" in bad.stderr, bad.stderr
