"""The Mooncake backend against a real metadata service over HTTP (an aiohttp server here).

The server answers `/batch_query_keys` as Mooncake's master does; each test scripts what it
answers (holders, missing keys, `success: false`, HTTP errors, a dead port) and what the client
must make of it, including the down window and its automatic end (the clock is injected).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from prescient.cache.hashing import kvs_keys
from prescient.cache.mooncake import MooncakeClient, MooncakeIndex, parse_response
from prescient.model import InstanceMetadata

from .harness import free_port


class Service:
    """A scripted metadata service: `holders` per key, or a forced `failure`."""

    def __init__(self) -> None:
        self.holders: dict[str, list[str]] = {}
        self.failure: str | None = None  # "success-false" | "http-500" | "not-json"
        self.queries: list[list[str]] = []
        self.accept: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        keys = request.query.get("keys", "").split(",")
        self.queries.append(keys)
        self.accept.append(request.headers.get("Accept", ""))
        if self.failure == "http-500":
            return web.Response(status=500, text="boom")
        if self.failure == "not-json":
            return web.Response(text="<html>")
        if self.failure == "success-false":
            return web.json_response({"success": False, "data": {}})
        data: dict[str, Any] = {}
        for key in keys:
            ends = self.holders.get(key)
            data[key] = ({"ok": True, "values": [{"transport_endpoint_": e} for e in ends]}
                         if ends else {"ok": False, "values": []})
        return web.json_response({"success": True, "data": data})


async def serving(service: Service, body: Callable[[int], Awaitable[None]]) -> None:
    app = web.Application()
    app.router.add_get("/batch_query_keys", service.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        await body(port)
    finally:
        await runner.cleanup()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_hits_are_contiguous_per_ip_and_map_to_every_instance_on_that_ip() -> None:
    service = Service()
    tokens = list(range(1, 1001))  # 3 full chunks of 256 (the unfull rest is not queried)
    k = kvs_keys(tokens, 256)
    service.holders = {k[0]: ["10.0.0.1:1234", "10.0.0.2:99", ""], k[1]: ["10.0.0.1:1234"],
                       k[2]: ["10.0.0.1:1234", "10.0.0.2:99"]}
    metadata = {
        "a_dp0": InstanceMetadata(instance_id="a_dp0", ip_kvs="10.0.0.1"),
        "a_dp1": InstanceMetadata(instance_id="a_dp1", ip_kvs="10.0.0.1"),
        "b": InstanceMetadata(instance_id="b", ip_kvs="10.0.0.2"),
        "c": InstanceMetadata(instance_id="c", ip_kvs="10.0.0.3"),
    }

    async def body(port: int) -> None:
        client = MooncakeClient("127.0.0.1", port, retry_times=1)
        index = MooncakeIndex(client)
        try:
            assert await index.hit_lengths(k) == {"10.0.0.1": 3, "10.0.0.2": 1}
            hits = await index.instance_hits(tokens, metadata)
        finally:
            await client.close()
        # b holds chunks 1 and 3 but not 2: only its leading run counts
        assert hits == {"a_dp0": 768, "a_dp1": 768, "b": 256}
        assert service.queries[-1] == k and service.accept[-1] == "application/json"

    asyncio.run(serving(service, body))


def test_keys_are_url_escaped() -> None:
    service = Service()
    key = "iris.block/+ key"
    service.holders = {key: ["1.2.3.4:5"]}

    async def body(port: int) -> None:
        client = MooncakeClient("127.0.0.1", port, retry_times=1)
        try:
            assert await client.batch_query([key, "x"]) == {key: ["1.2.3.4"], "x": []}
        finally:
            await client.close()
        assert service.queries == [[key, "x"]]

    asyncio.run(serving(service, body))


def test_missing_keys_and_empty_answers_are_no_hits() -> None:
    service = Service()

    async def body(port: int) -> None:
        client = MooncakeClient("127.0.0.1", port, retry_times=1)
        try:
            assert await client.batch_query(["k1", "k2"]) == {"k1": [], "k2": []}
            assert await MooncakeIndex(client).hit_lengths(["k1", "k2"]) == {}
        finally:
            await client.close()

    asyncio.run(serving(service, body))


def test_failures_retry_then_mark_the_service_down_until_the_window_ends() -> None:
    service = Service()
    clock = Clock()

    async def body(port: int) -> None:
        client = MooncakeClient("127.0.0.1", port, retry_times=3, retry_interval_ms=1,
                                down_duration_s=30, clock=clock)
        try:
            for failure in ("success-false", "http-500", "not-json"):
                service.failure = failure
                before = len(service.queries)
                assert await client.batch_query(["k"]) is None
                assert len(service.queries) - before == 3  # every attempt reached the service
                assert client.is_down
                # while down: "no hits" at once, without a request
                assert await client.batch_query(["k"]) is None
                assert len(service.queries) - before == 3
                clock.now += 30  # the window ends: the next query tries again
                assert not client.is_down
            service.failure = None
            service.holders = {"k": ["10.1.1.1:1"]}
            assert await client.batch_query(["k"]) == {"k": ["10.1.1.1"]}
            assert client.num_failed_attempts == 9
        finally:
            await client.close()

    asyncio.run(serving(service, body))


def test_an_unreachable_service_is_marked_down_and_recovers_when_it_returns() -> None:
    clock = Clock()
    port = free_port()
    service = Service()
    service.holders = {"k": ["10.0.0.9:1"]}

    async def main() -> None:
        client = MooncakeClient("127.0.0.1", port, retry_times=2, retry_interval_ms=1,
                                down_duration_s=5, timeout_s=2.0, clock=clock)
        try:
            assert await client.batch_query(["k"]) is None  # connection refused, twice
            assert client.is_down and client.num_failed_attempts == 2
            assert await client.batch_query(["k"]) is None  # down: no new attempt
            assert client.num_failed_attempts == 2
            clock.now += 5
            app = web.Application()
            app.router.add_get("/batch_query_keys", service.handle)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            try:
                assert await client.batch_query(["k"]) == {"k": ["10.0.0.9"]}
            finally:
                await runner.cleanup()
        finally:
            await client.close()

    asyncio.run(main())


def test_parse_response_takes_ips_and_skips_empty_endpoints() -> None:
    body = {"success": True, "data": {
        "a": {"ok": True, "values": [{"transport_endpoint_": "1.1.1.1:80"},
                                     {"transport_endpoint_": ""}, {}]},
        "b": {"ok": False, "values": [{"transport_endpoint_": "2.2.2.2:80"}]},
        "c": "junk"}}
    assert parse_response(body) == {"a": ["1.1.1.1"], "b": [], "c": []}
