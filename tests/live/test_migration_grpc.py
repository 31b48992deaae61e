"""Live migration over the llumlet gRPC service between two `prescient sim-engine` servers.

Both servers run in the test's event loop on real sockets (HTTP and gRPC). A client streams
from engine A through the official OpenAI client; mid-stream, `Migrate` on A's llumlet moves
the request to B, which decodes on and reports back to A, so the client's stream continues.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest

from prescient.config.sim_engine import SimEngineSettings
from prescient.llumlet.proto import llumlet_server_pb2 as pb
from prescient.llumlet.rpc import LlumletClient, LlumletRpcError
from prescient.simengine.server import SERVER_KEY, SimEngineServer, build_app, start_server

from .harness import child, free_port
from .test_sim_engine_server import oai, scrape

PROMPT = "the quick brown fox jumps over the lazy dog " * 8
SCALE = 4.0  # decode steps ~2.5 ms of wall time: a 300-token answer takes about a second


@contextlib.asynccontextmanager
async def engine(name: str, **overrides: Any) -> AsyncIterator[tuple[str, str, SimEngineServer]]:
    """A sim-engine with its llumlet's gRPC service; yields (HTTP base, gRPC address, server)."""
    port, grpc_port = free_port(), free_port()
    settings = SimEngineSettings(host="127.0.0.1", port=port, llumlet_port=grpc_port,
                                 instance_id=name, **{"time_scale": SCALE, **overrides})
    app = build_app(settings)
    runner = await start_server(settings, app=app)
    try:
        yield f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", app[SERVER_KEY]
    finally:
        await runner.cleanup()


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def migrate_to(dst_id: str, dst_address: str, src_id: str = "a",
               **value: Any) -> pb.MigrateRequest:
    host, _, port = dst_address.rpartition(":")
    value = value or {"num_reqs": 1}
    rule = {"num_reqs": "NUM_REQ", "num_tokens": "TOKEN", "kv_cache_usage_ratio": "RATIO"}
    return pb.MigrateRequest(src_engine_id=src_id, dst_engine_id=dst_id, dst_engine_ip=host,
                             dst_engine_port=int(port), migration_type=rule[next(iter(value))],
                             migration_req_policy="LCR", trigger_policy="test", **value)


async def stream_text(client: openai.AsyncOpenAI, request_id: str, max_tokens: int,
                      on_chunk: Any = None) -> tuple[str, str | None, int]:
    """Stream a completion; returns (text, finish reason, completion tokens)."""
    stream = await client.completions.create(
        model="prescient-sim", prompt=PROMPT, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-request-id": request_id})
    text, reason, usage, n = "", None, 0, 0
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += choice.text
            reason = choice.finish_reason or reason
        n += 1
        if on_chunk is not None:
            await on_chunk(n)
    return text, reason, usage


def test_a_request_migrated_mid_stream_arrives_whole_and_identical() -> None:
    asyncio.run(_test_a_request_migrated_mid_stream_arrives_whole_and_identical())


async def _test_a_request_migrated_mid_stream_arrives_whole_and_identical() -> None:
    llumlets = LlumletClient()
    async with (engine("a") as (base_a, addr_a, a), engine("b") as (base_b, addr_b, b),
                oai(base_a) as client, aiohttp.ClientSession() as http):
        # the reference: the same request id, never migrated (tokens are seeded by the id)
        reference, reason, usage = await stream_text(client, "req-1", 300)
        assert (reason, usage) == ("length", 300)

        moved: list[pb.MigrateResponse] = []

        async def migrate_once(n: int) -> None:
            if n == 40 and not moved:  # well into the decode
                moved.append(await llumlets.migrate(addr_a, migrate_to("b", addr_b)))

        text, reason, usage = await stream_text(client, "req-1", 300, migrate_once)
        assert moved and moved[0].success, moved
        assert (reason, usage) == ("length", 300)
        assert text == reference  # whole, in order, the same tokens

        ma, mb = await scrape(http, base_a), await scrape(http, base_b)
        assert ma[("prescient:migrated_requests_total", (("direction", "out"),))] == 1
        assert mb[("prescient:migrated_requests_total", (("direction", "in"),))] == 1
        # B decoded the rest (its engine counted no prefill), A holds nothing any more
        assert a.migration is not None and not a.migration._away
        assert b.migration is not None
        await until(lambda: not b.migration._forwarded)  # B forgets it once finished
        assert b.driver.num_live == 0 and a.driver.num_live == 0
        assert b.engine.snapshot(b.driver.now(), 0).num_running_requests == 0
    await llumlets.close()


def test_migrate_refuses_bad_commands_with_upstream_status_codes() -> None:
    asyncio.run(_test_migrate_refuses_bad_commands_with_upstream_status_codes())


async def _test_migrate_refuses_bad_commands_with_upstream_status_codes() -> None:
    llumlets = LlumletClient()
    async with engine("a") as (_, addr_a, _a), engine("b") as (_, addr_b, _b):
        bad_value = migrate_to("b", addr_b, num_tokens=512)
        bad_value.migration_type = "NUM_REQ"  # the oneof must match the type
        with pytest.raises(LlumletRpcError) as e:
            await llumlets.migrate(addr_a, bad_value)
        assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(LlumletRpcError) as e:
            await llumlets.migrate(addr_a, migrate_to("b", addr_b, num_reqs=3))
        assert e.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED  # 1 migrate-out slot
        idle = await llumlets.migrate(addr_a, migrate_to("b", addr_b))
        assert not idle.success and "no request" in idle.message
    await llumlets.close()


def test_a_client_that_leaves_aborts_the_request_where_it_runs_now() -> None:
    asyncio.run(_test_a_client_that_leaves_aborts_the_request_where_it_runs_now())


async def _test_a_client_that_leaves_aborts_the_request_where_it_runs_now() -> None:
    llumlets = LlumletClient()
    async with (engine("a") as (base_a, addr_a, a), engine("b") as (_, addr_b, b),
                oai(base_a) as client):
        async def migrate_then_leave(n: int) -> None:
            if n == 20:
                answer = await llumlets.migrate(addr_a, migrate_to("b", addr_b))
                assert answer.success
            if n == 30:
                await until(lambda: b.driver.num_live == 1)  # it runs on B now
                raise asyncio.CancelledError  # the client goes away mid-stream

        with pytest.raises(asyncio.CancelledError):
            await stream_text(client, "req-2", 2000, migrate_then_leave)
        await until(lambda: b.driver.num_live == 0)  # aborted on B through A's llumlet
        assert a.migration is not None and not a.migration._away
    await llumlets.close()


def test_a_request_migrated_twice_still_reports_to_the_first_engine() -> None:
    asyncio.run(_test_a_request_migrated_twice_still_reports_to_the_first_engine())


async def _test_a_request_migrated_twice_still_reports_to_the_first_engine() -> None:
    llumlets = LlumletClient()
    async with (engine("a") as (base_a, addr_a, a), engine("b") as (_, addr_b, b),
                engine("c") as (_, addr_c, c), oai(base_a) as client):
        reference, _, _ = await stream_text(client, "req-3", 400)
        hops: list[pb.MigrateResponse] = []

        async def hop(n: int) -> None:
            if n == 30:
                hops.append(await llumlets.migrate(addr_a, migrate_to("b", addr_b)))
            if n == 150:
                await until(lambda: b.driver.num_live == 1)
                hops.append(await llumlets.migrate(addr_b, migrate_to("c", addr_c, "b")))

        text, reason, usage = await stream_text(client, "req-3", 400, hop)
        assert [h.success for h in hops] == [True, True]
        assert (text, reason, usage) == (reference, "length", 400)
        assert b.migration is not None and b.migration.num_migrated_out == 1
        assert c.migration is not None and c.migration.num_migrated_in == 1
        assert a.migration is not None and not a.migration._away
    await llumlets.close()


def test_a_stream_whose_new_engine_dies_is_cut_so_a_gateway_can_replay_it(
        tmp_path: Path) -> None:
    asyncio.run(_test_a_stream_whose_new_engine_dies_is_cut(tmp_path))


async def _test_a_stream_whose_new_engine_dies_is_cut(tmp_path: Path) -> None:
    port, grpc_port = free_port(), free_port()
    llumlets = LlumletClient()
    with child(["sim-engine", "--host", "127.0.0.1", "--port", str(port), "--instance-id", "b",
                "--llumlet-port", str(grpc_port), "--time-scale", str(SCALE)],
               port=port, log=tmp_path / "b.log") as b:
        async with engine("a") as (base_a, addr_a, a), oai(base_a) as client:
            assert a.migration is not None
            a.migration.silence_s = 0.5

            async def migrate_then_kill(n: int) -> None:
                if n == 20:
                    answer = await llumlets.migrate(
                        addr_a, migrate_to("b", f"127.0.0.1:{grpc_port}"))
                    assert answer.success
                    await until(lambda: bool(a.migration and a.migration._away))
                    b.kill()  # SIGKILL: B cannot say goodbye

            with pytest.raises(openai.APIError):  # the connection breaks: no clean finish
                await stream_text(client, "req-4", 5000, migrate_then_kill)
            assert not a.migration._away
    await llumlets.close()


def test_a_destination_without_room_leaves_the_request_where_it_was() -> None:
    asyncio.run(_test_a_destination_without_room_leaves_the_request_where_it_was())


async def _test_a_destination_without_room_leaves_the_request_where_it_was() -> None:
    llumlets = LlumletClient()
    async with (engine("a") as (base_a, addr_a, a), engine("b", num_gpu_blocks=4) as (_, addr_b, b),
                oai(base_a) as client):
        reference, _, _ = await stream_text(client, "req-5", 300)
        tried: list[pb.MigrateResponse] = []

        async def migrate_once(n: int) -> None:
            if n == 40 and not tried:
                tried.append(await llumlets.migrate(addr_a, migrate_to("b", addr_b)))

        text, reason, usage = await stream_text(client, "req-5", 300, migrate_once)
        assert tried and tried[0].success  # the command was taken; the move was abandoned
        assert (text, reason, usage) == (reference, "length", 300)
        assert a.migration is not None and a.migration.num_migrated_out == 0
        assert a.engine.num_migrating_out == 0  # its slot is free again
        assert b.engine.num_migrating_in == 0 and b.driver.num_live == 0  # nothing left reserved
    await llumlets.close()
