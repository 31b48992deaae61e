"""The scheduler service over real sockets: lite mode with static endpoints, full mode on Redis.

Each test runs the aiohttp service in its own event loop on a free port and talks to it with
`RemoteScheduler` (the gateway's client) or raw HTTP where the wire shape itself is the point.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import msgspec
import pytest
from aiohttp import web

from prescient.cms.redis_store import RedisStore
from prescient.cms.store import CmsStoreError
from prescient.config.scheduler import SchedulerSettings, load_scheduler_settings
from prescient.errors import ConfigError
from prescient.model import InstanceMetadata, InstanceStatus
from prescient.scheduler import client as client_module
from prescient.scheduler.client import RemoteScheduler
from prescient.scheduler.core import SchedulerCore
from prescient.scheduler.service import build_app, serve
from prescient.scheduler.wire import (
    NoInstanceAvailableError,
    ReportItem,
    ScheduleRequest,
    SchedulerUnavailableError,
)

from .harness import free_port, private_redis, shared_redis, wait_for_port

BACKENDS = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")
TOKEN = "s3cret"


def lite(metric: str = "num_requests", *extra: str) -> SchedulerSettings:
    return load_scheduler_settings(
        ["--enable-full-mode-scheduling=false", "--llm-backend-discovery", "endpoints",
         "--llm-backend-endpoints", ",".join(BACKENDS), "--dispatch-neutral-load-metric",
         metric, "--host", "127.0.0.1", "--port", str(free_port()), *extra], {})


@asynccontextmanager
async def serving(settings: SchedulerSettings) -> AsyncIterator[str]:
    """`serve(settings)` as a task; yields its `host:port` once it listens."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    deadline = time.monotonic() + 15
    while True:
        try:
            _, writer = await asyncio.open_connection(settings.host, settings.port)
            writer.close()
            await writer.wait_closed()
            break
        except OSError:
            if task.done() or time.monotonic() > deadline:
                await task  # raises the service's error
                raise TimeoutError("the scheduler did not listen") from None
            await asyncio.sleep(0.02)
    try:
        yield f"{settings.host}:{settings.port}"
    finally:
        stop.set()
        await task


@asynccontextmanager
async def app_serving(core: SchedulerCore, token: str = "") -> AsyncIterator[str]:
    """A started core behind `build_app` on a free port (full mode, with the test's store)."""
    await core.start()
    runner = web.AppRunner(build_app(core, service_token=token), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await core.close()


async def post(address: str, path: str, body: bytes, headers: dict[str, str] | None = None
               ) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.post(
            f"http://{address}{path}", data=body, headers=headers or {}) as r:
        return r.status, await r.read()


async def get(address: str, path: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.get(f"http://{address}{path}") as r:
        return r.status, await r.read()


def req(rid: str, tokens: int = 10) -> ScheduleRequest:
    return ScheduleRequest(id=rid, model="m", gateway_id="gw:1", prompt_num_tokens=tokens)


async def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


# ---- lite mode --------------------------------------------------------------------------------


def test_schedule_round_trip_speaks_upstreams_json() -> None:
    async def main() -> None:
        async with serving(lite()) as address:
            body = b'{"id":"r1","model":"m","gateway_id":"gw:1","scheduling_mode":"neutral",' \
                   b'"prompt_num_tokens":3,"prompt_token_ids":[1,2,3]}'
            status, raw = await post(address, "/schedule", body)
            assert status == 200, raw
            echoed = msgspec.json.decode(raw)
            assert set(echoed) == {"id", "model", "gateway_id", "scheduling_mode",
                                   "scheduling_stage", "prompt_num_tokens", "prompt_token_ids",
                                   "scheduling_result"}
            assert (echoed["id"], echoed["prompt_token_ids"]) == ("r1", [1, 2, 3])
            [inst] = echoed["scheduling_result"]
            assert set(inst) == {"version", "id", "model", "infer_type", "endpoint", "aux_ip",
                                 "aux_port", "dp_rank", "dp_size"}
            assert inst["endpoint"] == {"host": inst["id"].split(":")[0],
                                        "port": int(inst["id"].split(":")[1])}
            assert inst["infer_type"] == "neutral" and inst["id"] in BACKENDS
            remote = RemoteScheduler([address])
            [picked] = await remote.schedule(req("r2"))
            assert picked.id in BACKENDS and picked.id != inst["id"]
            await remote.close()

    asyncio.run(main())


def test_num_requests_balances_release_frees_and_reports_steer() -> None:
    async def main() -> None:
        async with serving(lite()) as address:
            remote = RemoteScheduler([address])
            got = [(await remote.schedule(req(f"r{k}")))[0].id for k in range(6)]
            assert {b: got.count(b) for b in BACKENDS} == {b: 2 for b in BACKENDS}
            freed = got[0]
            for k, iid in enumerate(got):
                if iid == freed:
                    await remote.release(req(f"r{k}"))
            assert [(await remote.schedule(req(f"n{k}")))[0].id for k in range(2)] == [
                freed, freed]
            await remote.close()
        async with serving(lite("num_tokens")) as address:
            remote = RemoteScheduler([address])
            first = [(await remote.schedule(req(f"t{k}", 100)))[0].id for k in range(3)]
            await remote.report([
                ReportItem(id="t0", instance_id=first[0], num_tokens=4000),
                ReportItem(id="t1", instance_id=first[1], num_tokens=2000),
                ReportItem(id="ghost", instance_id="nowhere:1", num_tokens=10**6)])
            assert (await remote.schedule(req("u", 100)))[0].id == first[2]
            status, _ = await post(address, "/report", msgspec.json.encode(
                [{"kind": "state_update", "id": "x", "instance_id": "unknown:9",
                  "num_tokens": 5}]))
            assert status == 200
            await remote.close()

    asyncio.run(main())


def test_the_service_token_is_required_where_set() -> None:
    async def main() -> None:
        async with serving(lite("num_requests", "--service-token", TOKEN)) as address:
            body = msgspec.json.encode(req("r1"))
            status, raw = await post(address, "/schedule", body)
            assert status == 401 and msgspec.json.decode(raw)["error"]["code"] == 401
            assert (await post(address, "/schedule", body, {"Authorization": "wrong"}))[0] == 401
            assert (await post(address, "/schedule", body, {"Authorization": TOKEN}))[0] == 200
            assert (await post(address, "/release", body,
                               {"Authorization": f"Bearer {TOKEN}"}))[0] == 200
            assert (await get(address, "/health"))[0] == 200  # probes carry no token
            tokenless = RemoteScheduler([address])
            with pytest.raises(SchedulerUnavailableError, match="401"):
                await tokenless.schedule(req("r2"))
            await tokenless.close()
            remote = RemoteScheduler([address], service_token=TOKEN)
            assert await remote.schedule(req("r3"))
            await remote.close()

    asyncio.run(main())


def test_bad_input_gets_a_json_400_and_unknown_routes_a_json_404() -> None:
    async def main() -> None:
        async with serving(lite()) as address:
            for path, body in (("/schedule", b"{not json"), ("/schedule", b'{"model":"m"}'),
                               ("/schedule", b'{"id":"r","prompt_num_tokens":0}'),
                               ("/schedule", b'{"id":"r","prompt_num_tokens":5,'
                                             b'"scheduling_mode":"pd_staged"}'),
                               ("/release", b"[]"), ("/report", b'{"id":"r"}')):
                status, raw = await post(address, path, body)
                error = msgspec.json.decode(raw)["error"]
                assert (status, error["code"], error["type"]) == (
                    400, 400, "invalid_request_error"), (path, body, raw)
            status, raw = await post(address, "/nope", b"{}")
            assert status == 404 and msgspec.json.decode(raw)["error"]["code"] == 404
            status, raw = await get(address, "/health")
            assert status == 200 and msgspec.json.decode(raw)["instances"] == 3
            status, raw = await get(address, "/metrics")
            text = raw.decode()
            assert status == 200
            assert 'prescient_scheduler_schedule_total{outcome="bad_request"} 4.0' in text
            assert "prescient_scheduler_instances 3.0" in text
            assert "prescient_scheduler_schedule_latency_seconds_count 4.0" in text

    asyncio.run(main())


def test_sigterm_stops_the_process_cleanly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    log = tmp_path / "scheduler.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prescient.scheduler", "--enable-full-mode-scheduling=false",
             "--llm-backend-discovery", "endpoints", "--llm-backend-endpoints", BACKENDS[0],
             "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port)
            assert asyncio.run(get(f"127.0.0.1:{port}", "/health"))[0] == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "shutting down" in log.read_text()


def test_a_port_in_use_is_a_config_error_naming_the_flag() -> None:
    async def main() -> None:
        async with serving(lite()) as address:
            settings = lite("num_requests", "--port", address.split(":")[1])
            with pytest.raises(ConfigError, match="--port"):
                await serve(settings, asyncio.Event())

    asyncio.run(main())


# ---- the client on its own --------------------------------------------------------------------


def test_a_dead_endpoint_is_unavailable_at_once_and_skipped_for_a_while() -> None:
    dead = f"127.0.0.1:{free_port()}"
    now = [100.0]

    async def main() -> None:
        remote = RemoteScheduler([dead], timeout_s=30.0, clock=lambda: now[0])
        with pytest.raises(SchedulerUnavailableError, match=r"127\.0\.0\.1"):
            await asyncio.wait_for(remote.schedule(req("r1")), 10)  # refused, not timed out
        async with serving(lite("num_requests", "--port", dead.split(":")[1])):
            with pytest.raises(SchedulerUnavailableError, match="marked down"):
                await remote.schedule(req("r2"))  # no connection attempt within retry_after
            now[0] += 1.5
            assert await remote.schedule(req("r3"))
        await remote.close()

    asyncio.run(main())


def test_several_endpoints_fail_over_in_order_and_stick() -> None:
    dead = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        async with serving(lite()) as live:
            remote = RemoteScheduler([dead, live])
            assert await remote.schedule(req("r1"))
            assert remote.urls[remote._current] == f"http://{live}"
            assert await remote.schedule(req("r2"))
            await remote.close()

    asyncio.run(main())


def test_release_retries_three_times_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "RELEASE_RETRY_INTERVAL_S", 0.01)
    calls: list[str] = []

    async def broken(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(status=503, text="busy")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/release", broken)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        remote = RemoteScheduler([f"127.0.0.1:{port}"])
        await remote.release(req("r1"))  # no exception
        assert calls == ["/release"] * 3
        await runner.cleanup()
        await remote.release(req("r2"))  # nothing listens: still no exception
        await remote.report([ReportItem(id="r2", instance_id="x")])
        await remote.close()
        with pytest.raises(SchedulerUnavailableError, match="closed"):
            await remote.schedule(req("r3"))

    asyncio.run(main())


def test_a_scheduler_answering_nonsense_is_unavailable() -> None:
    answers = iter([web.Response(text="<html>oops</html>"),
                    web.json_response({"id": "r", "scheduling_result": []}),
                    web.Response(status=500, text="boom"),
                    web.json_response({"error": {"message": "cms not available: down"}},
                                      status=400)])

    async def schedule(request: web.Request) -> web.Response:
        return next(answers)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/schedule", schedule)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        remote = RemoteScheduler([f"127.0.0.1:{port}"])
        for expected in ("bad JSON", "without instances", "boom", "cms not available: down"):
            with pytest.raises(SchedulerUnavailableError, match=expected):
                await remote.schedule(req("r"))
        await remote.close()
        await runner.cleanup()

    asyncio.run(main())


# ---- full mode on Redis -----------------------------------------------------------------------


def full(*extra: str) -> SchedulerSettings:
    return load_scheduler_settings(["--cms-pull-status-interval-ms", "20",
                                    "--cms-pull-metadata-interval-ms", "50", *extra], {})


async def publish(store: RedisStore, loads: dict[str, int], update_id: int = 1,
                  schedulable: bool = True) -> None:
    for k, (iid, load) in enumerate(sorted(loads.items())):
        await store.put_metadata(InstanceMetadata(
            instance_id=iid, ip="127.0.0.1", api_server_port=9000 + k, ip_kvt="127.0.0.1",
            kvt_port=29000 + k), 60.0)
        await store.put_status(InstanceStatus(
            instance_id=iid, timestamp_ms=int(time.time() * 1000) + update_id,
            update_id=update_id,
            schedulable=schedulable, num_uncomputed_tokens_all_waiting_prefills=load), 60.0)


def test_full_mode_picks_the_least_loaded_status_and_429s_when_none_is_schedulable() -> None:
    async def main() -> None:
        with shared_redis() as target:
            writer = RedisStore(target.host, target.port, db=target.db)
            await publish(writer, {"i-a": 5000, "i-b": 200, "i-c": 900})
            core = SchedulerCore(full(), store=RedisStore(target.host, target.port,
                                                          db=target.db))
            async with app_serving(core) as address:
                remote = RemoteScheduler([address])
                [inst] = await remote.schedule(req("r1", 100))
                assert (inst.id, inst.endpoint.port, inst.aux_port) == ("i-b", 9001, 29001)
                await publish(writer, {"i-a": 0, "i-b": 0, "i-c": 0}, update_id=2,
                              schedulable=False)
                await wait_until(lambda: all(not core.dispatcher.cms.status(i).schedulable
                                             for i in ("i-a", "i-b", "i-c")))
                with pytest.raises(NoInstanceAvailableError):
                    await remote.schedule(req("r2"))
                status, raw = await post(address, "/schedule", msgspec.json.encode(req("r3")))
                assert status == 429 and msgspec.json.decode(raw)["error"]["code"] == 429
                await remote.close()
            await writer.close()

    asyncio.run(main())


def test_a_cms_outage_is_a_400_the_client_turns_into_fallback_and_it_recovers() -> None:
    async def main() -> None:
        with private_redis() as redis_server:
            writer = RedisStore("127.0.0.1", redis_server.port)
            await publish(writer, {"i-a": 10})
            core = SchedulerCore(full(), store=RedisStore("127.0.0.1", redis_server.port,
                                                          timeout_s=0.5))
            async with app_serving(core) as address:
                remote = RemoteScheduler([address])
                assert (await remote.schedule(req("r1")))[0].id == "i-a"
                redis_server.stop()
                await wait_until(lambda: not core.ready, 20)
                status, raw = await post(address, "/schedule", msgspec.json.encode(req("r2")))
                assert status == 400
                assert "cms not available" in msgspec.json.decode(raw)["error"]["message"]
                with pytest.raises(SchedulerUnavailableError, match="cms not available"):
                    await remote.schedule(req("r3"))
                assert (await get(address, "/health"))[0] == 503
                redis_server.start()  # same port, empty data: the llumlets write again
                for _ in range(50):  # as a llumlet's next push would after a failed one
                    try:
                        await publish(writer, {"i-a": 10}, update_id=5)
                        break
                    except CmsStoreError:
                        await asyncio.sleep(0.1)
                await wait_until(lambda: core.ready and core.dispatcher.cms.status("i-a"), 20)
                assert (await remote.schedule(req("r4")))[0].id == "i-a"
                assert (await get(address, "/health"))[0] == 200
                await remote.close()
            await writer.close()

    asyncio.run(main())


def test_lite_mode_follows_redis_discovery() -> None:
    from prescient.discovery.base import DiscoveredInstance
    from prescient.discovery.redis import RedisRegistrar, RedisResolver

    def engines(pod: str, n: int, port: int) -> list[DiscoveredInstance]:
        return [DiscoveredInstance(instance_id=f"{pod}_dp{k}", host="127.0.0.1", port=port + k,
                                   dp_rank=k, dp_size=n, model="m") for k in range(n)]

    async def main() -> None:
        with shared_redis() as target:
            where = {"db": target.db}
            pod_a = RedisRegistrar(target.host, target.port, "pod-a", **where)
            pod_b = RedisRegistrar(target.host, target.port, "pod-b", **where)
            await pod_a.publish(engines("pod-a", 2, 8000))
            resolver = RedisResolver(target.host, target.port, refresh_interval_s=0.05, **where)
            core = SchedulerCore(lite(), resolver=resolver)
            async with app_serving(core) as address:
                remote = RemoteScheduler([address])
                got = {(await remote.schedule(req(f"r{k}")))[0].id for k in range(2)}
                assert got == {"pod-a_dp0", "pod-a_dp1"}
                await pod_b.publish(engines("pod-b", 1, 9000))
                await wait_until(lambda: len(core.instances()) == 3)
                [inst] = await remote.schedule(req("r2"))  # the one with no request yet
                assert (inst.id, inst.endpoint.port, inst.model) == ("pod-b_dp0", 9000, "m")
                await remote.close()
            await resolver.close()
            for registrar in (pod_a, pod_b):
                await registrar.close()

    asyncio.run(main())
