"""The gateway end to end: the official `openai` client in front, real engine sockets behind.

The scheduler is a scripted fake (tests/live/gateway_fakes.py) unless a test says otherwise, so
each test can make it pick a dead instance, refuse, or be unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from prescient.config.gateway import load_gateway_settings
from prescient.discovery.base import StaticResolver
from prescient.gateway.app import Gateway
from prescient.scheduler.client import RemoteScheduler
from prescient.scheduler.core import SchedulerCore
from prescient.scheduler.wire import Endpoint, LLMInstance, Scheduler
from prescient.tokenizer import ApproxTokenizer

from .gateway_fakes import MODEL, FakeEngine, FakeScheduler
from .harness import free_port


class Stack:
    def __init__(self, gateway: Gateway, port: int, client: AsyncOpenAI,
                 engines: Sequence[FakeEngine]) -> None:
        self.gateway, self.port, self.client, self.engines = gateway, port, client, engines
        self.url = f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def stack(engines: Sequence[FakeEngine], scheduler: Scheduler | None,
                *flags: str, resolver_too: bool = True) -> AsyncIterator[Stack]:
    await started(*engines)
    addresses = [e.address for e in engines] if resolver_too else []
    settings = load_gateway_settings(
        [*(["--llm-backend-endpoints", ",".join(addresses)] if addresses else []), *flags], {})
    gateway = Gateway(settings, scheduler=scheduler,
                      resolver=StaticResolver(addresses) if addresses else None,
                      tokenizer=ApproxTokenizer(), gateway_id="test-gw")
    await gateway.start()
    server = await gateway.serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test",
                         max_retries=0, timeout=20)
    try:
        yield Stack(gateway, port, client, engines)
    finally:
        await client.close()
        server.close()
        await gateway.close()
        for engine in engines:
            engine.close()


async def started(*engines: FakeEngine) -> tuple[FakeEngine, ...]:
    for engine in engines:
        await engine.start()
    return engines


class _Answer:
    def __init__(self, status: int, text: str) -> None:
        self.status_code, self.text = status, text

    def json(self) -> Any:
        return json.loads(self.text)


async def _raw(url: str, method: str, body: bytes = b"") -> _Answer:
    """One request with an independent client (aiohttp), for what the openai client hides."""
    async with aiohttp.ClientSession() as http, http.request(method, url, data=body) as r:
        return _Answer(r.status, await r.text())


def test_completions_and_chat_non_stream_reach_the_engine_with_the_request_id() -> None:
    async def main() -> None:
        a, b = await started(FakeEngine("a"), FakeEngine("b"))
        scheduler = FakeScheduler([a.instance(), b.instance()])
        async with stack([a, b], scheduler) as s:
            done = await s.client.completions.create(model=MODEL, prompt="hello there",
                                                     max_tokens=5)
            chat = await s.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-request-id": "client-chosen-id"})
        assert done.choices[0].text == "hi from a"
        assert chat.choices[0].message.content == "hi from b"
        (first_id, tokens, ids), (second_id, _, _) = scheduler.scheduled
        assert a.seen[0]["x-request-id"] == first_id and len(first_id) == 32
        assert second_id == "client-chosen-id" == b.seen[0]["x-request-id"]
        assert tokens == ids == len(ApproxTokenizer().encode("hello there"))
        assert a.seen[0]["authorization"] == "Bearer sk-test"  # end-to-end headers pass
        assert json.loads(a.bodies[0])["prompt"] == "hello there"  # the body is unchanged
        assert scheduler.released == []  # full mode: a served request is not released

    asyncio.run(main())


def test_full_mode_releases_finished_requests_only_to_an_in_process_scheduler() -> None:
    """A remote full-mode scheduler learns of finished requests from the CMS (upstream's wire:
    no round trip per request); an embedded one takes the release, so its account drops them
    at once. Lite mode always releases."""
    async def served_releases(in_process: bool, *flags: str) -> list[tuple[str, str]]:
        (a,) = await started(FakeEngine("a", events=3))
        scheduler = FakeScheduler([a.instance()])
        if in_process:
            scheduler.in_process = True  # type: ignore[attr-defined]
        async with stack([a], scheduler, *flags) as s:
            await s.client.completions.create(model=MODEL, prompt="x", max_tokens=3,
                                              extra_headers={"x-request-id": "ns"})
            stream = await s.client.completions.create(
                model=MODEL, prompt="x", stream=True, extra_headers={"x-request-id": "st"})
            assert len([c async for c in stream]) == 3
        return scheduler.released

    async def main() -> None:
        assert await served_releases(False) == []
        assert await served_releases(True) == [("ns", "a"), ("st", "a")]
        assert await served_releases(False, "--enable-full-mode-scheduling=false") == [
            ("ns", "a"), ("st", "a")]

    asyncio.run(main())
    assert SchedulerCore.in_process and not hasattr(RemoteScheduler, "in_process")


def test_streams_pass_through_event_by_event() -> None:
    async def main() -> None:
        a = FakeEngine("a", events=6)
        async with stack([a], None, "--scheduling-policy", "round-robin") as s:
            stream = await s.client.completions.create(model=MODEL, prompt="x", stream=True)
            texts = [c.choices[0].text async for c in stream]
            chat = await s.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
            deltas = [c.choices[0].delta.content async for c in chat]
            metrics = (await _raw(s.url + "/metrics", "GET")).text
        assert texts == [f"t{i} " for i in range(6)]
        assert deltas == [f"t{i} " for i in range(6)]
        assert 'prescient_gateway_requests_total{kind="chat",status="200"} 1.0' in metrics
        assert "prescient_gateway_tpot_seconds_count 2.0" in metrics
        assert "prescient_gateway_ttft_seconds_count 2.0" in metrics

    asyncio.run(main())


def test_first_event_is_not_held_back() -> None:
    async def main() -> None:
        a = FakeEngine("a", events=3)
        a.hold = asyncio.Event()  # the engine sends event 1, then waits for us
        async with stack([a], None, "--scheduling-policy", "round-robin") as s:
            stream = await s.client.completions.create(model=MODEL, prompt="x", stream=True)
            chunks = aiter(stream)
            first = await asyncio.wait_for(anext(chunks), 10)
            a.hold.set()
            rest = [c async for c in chunks]
        assert first.choices[0].text == "t0 " and len(rest) == 2

    asyncio.run(main())


def test_a_refused_connection_is_retried_on_another_instance() -> None:
    async def main() -> None:
        live, = await started(FakeEngine("live"))
        dead = LLMInstance(id="dead", endpoint=Endpoint("127.0.0.1", free_port()))
        scheduler = FakeScheduler([dead, live.instance()])
        async with stack([live], scheduler) as s:
            out = await s.client.completions.create(model=MODEL, prompt="x", max_tokens=3)
            again = await s.client.completions.create(model=MODEL, prompt="x", max_tokens=3)
            metrics = (await _raw(s.url + "/metrics", "GET")).text
        assert out.choices[0].text == again.choices[0].text == "hi from live"
        # the failed attempt was released before the retry; the second request found the dead
        # instance avoided, released its choice and went round robin
        assert ("dead" in {inst for _, inst in scheduler.released})
        assert 'prescient_gateway_errors_total{kind="upstream_connect"} 1.0' in metrics
        assert "prescient_gateway_retries_total 1.0" in metrics

    asyncio.run(main())


def test_a_5xx_before_the_first_byte_is_retried_and_released() -> None:
    async def main() -> None:
        a, b = await started(FakeEngine("a"), FakeEngine("b"))
        scheduler = FakeScheduler([a.instance(), b.instance()])
        async with stack([a, b], scheduler) as s:
            a.fail_next = 1
            stream = await s.client.completions.create(model=MODEL, prompt="x", stream=True)
            texts = [c.choices[0].text async for c in stream]
        assert len(texts) == 4
        assert len(a.seen) == 1 and len(b.seen) == 1
        assert a.seen[0]["x-request-id"] == b.seen[0]["x-request-id"]
        assert scheduler.released == [(a.seen[0]["x-request-id"], "a")]

    asyncio.run(main())


def test_exhausted_retries_pass_the_last_5xx_through() -> None:
    async def main() -> None:
        a, = await started(FakeEngine("a"))
        scheduler = FakeScheduler([a.instance()])
        async with stack([a], scheduler, "--retry-max-count", "1") as s:
            a.fail_next = 5
            with pytest.raises(openai.InternalServerError, match="engine exploded"):
                await s.client.completions.create(model=MODEL, prompt="x")
        assert len(a.seen) == 2

    asyncio.run(main())


def test_every_instance_refusing_gives_502() -> None:
    async def main() -> None:
        dead = LLMInstance(id="dead", endpoint=Endpoint("127.0.0.1", free_port()))
        scheduler = FakeScheduler([dead])
        async with stack([], scheduler, "--retry-max-count", "1") as s:
            with pytest.raises(openai.APIStatusError) as err:
                await s.client.completions.create(model=MODEL, prompt="x")
        assert err.value.status_code == 502
        assert "after 2 attempts" in err.value.message

    asyncio.run(main())


def test_scheduler_unavailable_falls_back_to_round_robin() -> None:
    async def main() -> None:
        a, b = FakeEngine("a"), FakeEngine("b")
        scheduler = FakeScheduler([])
        scheduler.unavailable = True
        async with stack([a, b], scheduler) as s:
            names = [(await s.client.completions.create(model=MODEL, prompt="x")).choices[0].text
                     for _ in range(4)]
            metrics = (await _raw(s.url + "/metrics", "GET")).text
        assert sorted(names) == ["hi from a"] * 2 + ["hi from b"] * 2
        assert "prescient_gateway_fallbacks_total 4.0" in metrics

    asyncio.run(main())


def test_no_instance_available_waits_then_succeeds_or_gives_503() -> None:
    async def main() -> None:
        a, = await started(FakeEngine("a"))
        scheduler = FakeScheduler([a.instance()])
        flags = ("--wait-scheduling-retry-interval", "0.01", "--wait-scheduling-timeout", "5")
        async with stack([a], scheduler, *flags) as s:
            scheduler.none_for = 3
            ok = await s.client.completions.create(model=MODEL, prompt="x")
        assert ok.choices[0].text == "hi from a" and scheduler.none_for == 0

        scheduler = FakeScheduler([])
        scheduler.none_forever = True
        flags = ("--wait-scheduling-retry-interval", "0.01", "--wait-scheduling-timeout", "0.05")
        async with stack([a], scheduler, *flags) as s:
            with pytest.raises(openai.APIStatusError) as err:
                await s.client.completions.create(model=MODEL, prompt="x")
        assert err.value.status_code == 503
        assert err.value.body["message"] == "no available inference worker"  # type: ignore[index]

    asyncio.run(main())


async def _until_disconnected(engine: FakeEngine) -> None:
    """Wait (10 s at most) until the engine sees the gateway close its connection."""
    for _ in range(1000):
        if engine.disconnects:
            return
        await asyncio.sleep(0.01)


def test_client_leaving_mid_stream_closes_the_engine_connection() -> None:
    async def main() -> None:
        a = FakeEngine("a", events=3)
        a.hold = asyncio.Event()  # never set: the stream stalls after event 1
        async with stack([a], None, "--scheduling-policy", "round-robin") as s:
            stream = await s.client.completions.create(model=MODEL, prompt="x", stream=True)
            await asyncio.wait_for(anext(aiter(stream)), 10)
            await stream.close()
            await _until_disconnected(a)
            metrics = (await _raw(s.url + "/metrics", "GET")).text
        assert a.disconnects == 1
        assert 'kind="completion",status="499"' in metrics

    asyncio.run(main())


def test_a_client_leaving_after_done_got_a_whole_answer() -> None:
    """The client reads `[DONE]` and hangs up before the engine ends its body: the gateway
    closes the engine's connection, yet the client got every event: a 200, not a 499."""
    async def main() -> None:
        a = FakeEngine("a", events=3)
        a.linger = asyncio.Event()  # never set: the body never ends
        async with stack([a], None, "--scheduling-policy", "round-robin") as s:
            stream = await s.client.completions.create(model=MODEL, prompt="x", stream=True)
            assert len([chunk async for chunk in stream]) == 3
            await stream.close()
            await _until_disconnected(a)
            metrics = (await _raw(s.url + "/metrics", "GET")).text
        assert a.disconnects == 1
        assert 'kind="completion",status="200"' in metrics
        assert 'status="499"' not in metrics

    asyncio.run(main())


def test_bad_requests_get_openai_errors() -> None:
    async def main() -> None:
        a = FakeEngine("a")
        flags = ("--scheduling-policy", "round-robin", "--max-body-bytes", "2048",
                 "--served-model-name", MODEL)
        async with stack([a], None, *flags) as s:
            url = s.url + "/v1/completions"
            bad_json = await _raw(url, "POST", b"{not json")
            no_route = await _raw(s.url + "/v1/nothing", "POST", b"{}")
            too_big = await _raw(url, "POST", json.dumps(
                {"model": MODEL, "prompt": "x" * 4000}).encode())
            with pytest.raises(openai.BadRequestError) as zero:
                await s.client.completions.create(model=MODEL, prompt="x", max_tokens=0)
            with pytest.raises(openai.NotFoundError) as unknown:
                await s.client.completions.create(model="other", prompt="x")
        for response, status in ((bad_json, 400), (no_route, 404), (too_big, 413)):
            assert response.status_code == status
            assert response.json()["error"]["code"] == status
        assert zero.value.body["param"] == "max_tokens"  # type: ignore[index]
        assert "`other` does not exist" in unknown.value.message
        assert a.seen == []  # none of them reached the engine

    asyncio.run(main())


def test_models_health_and_metrics() -> None:
    async def main() -> None:
        a = FakeEngine("a")
        async with stack([a], FakeScheduler([])) as s:
            models = await s.client.models.list()
            health = await _raw(s.url + "/health", "GET")
            metrics = await _raw(s.url + "/metrics", "GET")
        assert [m.id for m in models.data] == [MODEL]
        assert health.status_code == 200
        assert "prescient_gateway_requests_in_flight 0.0" in metrics.text

        async with stack([], FakeScheduler([]), "--scheduling-policy", "round-robin",
                         resolver_too=False) as s:
            health = await _raw(s.url + "/health", "GET")
            models = await _raw(s.url + "/v1/models", "GET")
        assert health.status_code == 503 and models.status_code == 503

    asyncio.run(main())


def test_lite_mode_releases_every_request_and_reports_streams() -> None:
    async def main() -> None:
        a, = await started(FakeEngine("a", events=5))
        scheduler = FakeScheduler([a.instance()])
        flags = ("--enable-full-mode-scheduling=false", "--requests-report-duration", "0.000001",
                 "--forward-tokens=false")
        async with stack([a], scheduler, *flags) as s:
            await s.client.completions.create(model=MODEL, prompt="x")
            stream = await s.client.completions.create(model=MODEL, prompt="x", stream=True)
            _ = [c async for c in stream]
            for _ in range(100):
                await asyncio.sleep(0)  # reports go out in the background
        ids = [rid for rid, _, _ in scheduler.scheduled]
        assert [rid for rid, _ in scheduler.released] == ids
        assert all(n is None for _, _, n in scheduler.scheduled)  # --forward-tokens=false
        assert scheduler.reports and {r.id for r in scheduler.reports} == {ids[1]}
        assert scheduler.reports[-1].num_tokens > scheduler.scheduled[1][1]

    asyncio.run(main())


def test_embedded_lite_scheduler_places_requests_on_discovered_instances() -> None:
    async def main() -> None:
        from prescient.gateway.wiring import build_gateway

        a, b = await started(FakeEngine("a"), FakeEngine("b"))
        settings = load_gateway_settings(
            ["--enable-full-mode-scheduling=false", "--llm-backend-endpoints",
             f"{a.address},{b.address}"], {})
        gateway = build_gateway(settings)
        await gateway.start()
        server = await gateway.serve("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        try:
            outs = await asyncio.gather(*(
                client.completions.create(model=MODEL, prompt="hello " * 20) for _ in range(8)))
        finally:
            await client.close()
            server.close()
            await gateway.close()
            a.close()
            b.close()
        assert len(outs) == 8 and a.seen and b.seen  # load-balance spread concurrent requests

    asyncio.run(main())


def test_a_long_prompt_is_counted_and_forwarded_unchanged() -> None:
    async def main() -> None:
        a, = await started(FakeEngine("a"))
        scheduler = FakeScheduler([a.instance()])
        prompt = "many words " * 20000  # 220 KB: tokenized in a worker thread
        async with stack([a], scheduler) as s:
            out = await s.client.completions.create(model=MODEL, prompt=prompt)
        assert out.choices[0].text == "hi from a"
        assert scheduler.scheduled[0][1] == len(ApproxTokenizer().encode(prompt))
        assert json.loads(a.bodies[0])["prompt"] == prompt

    asyncio.run(main())


def test_client_leaving_before_the_first_byte_aborts_and_releases_in_full_mode() -> None:
    async def main() -> None:
        a, = await started(FakeEngine("a"))
        a.stall = True  # a long non-stream generation
        scheduler = FakeScheduler([a.instance()])
        async with stack([a], scheduler) as s:
            impatient = s.client.with_options(timeout=0.3)
            with pytest.raises(openai.APITimeoutError):
                await impatient.completions.create(model=MODEL, prompt="x")
            for _ in range(1000):
                if a.disconnects and scheduler.released:
                    break
                await asyncio.sleep(0.01)
        assert a.disconnects == 1  # the engine saw the client's disconnect
        assert scheduler.released == [(a.seen[0]["x-request-id"], "a")]

    asyncio.run(main())
