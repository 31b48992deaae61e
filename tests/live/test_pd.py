"""Prefill/decode disaggregation end to end: a prefill sim-engine, a decode sim-engine, and the
gateway (embedded lite-mode scheduler) forwarding each request as a prefill leg and a decode leg
with vLLM's `kv_transfer_params`, in front of the official `openai` client."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from openai import AsyncOpenAI

from prescient.cms.store import MemoryStore
from prescient.config.gateway import load_gateway_settings
from prescient.config.scheduler import SchedulerSettings
from prescient.config.sim_engine import SimEngineSettings
from prescient.discovery.base import DiscoveredInstance, Listener
from prescient.errors import ConfigError
from prescient.gateway.app import Gateway
from prescient.model import InferType
from prescient.scheduler.core import SchedulerCore
from prescient.simengine.server import SERVER_KEY, SimEngineServer, build_app, start_server
from prescient.tokenizer import ApproxTokenizer

from .harness import free_port
from .test_sim_engine_server import metrics

MODEL = "prescient-sim"
PROMPT = "the quick brown fox jumps over the lazy dog " * 20


class TypedResolver:
    """A fixed instance set with instance types (StaticResolver's endpoints have none)."""

    def __init__(self, instances: Sequence[DiscoveredInstance]) -> None:
        self._instances = list(instances)

    async def start(self) -> None:
        return None

    def instances(self) -> list[DiscoveredInstance]:
        return list(self._instances)

    def subscribe(self, listener: Listener) -> None:
        listener(self.instances())

    async def close(self) -> None:
        return None


@contextlib.asynccontextmanager
async def engine(instance_type: str, store: MemoryStore | None = None
                 ) -> AsyncIterator[tuple[str, SimEngineServer]]:
    port = free_port()
    settings = SimEngineSettings(host="127.0.0.1", port=port, time_scale=20.0,
                                 instance_type=instance_type,  # type: ignore[arg-type]
                                 instance_id=f"{instance_type}-{port}",
                                 enable_llumlet=store is not None)
    app = build_app(settings, store=store)
    runner = await start_server(settings, app=app)
    try:
        yield f"http://127.0.0.1:{port}", app[SERVER_KEY]
    finally:
        await runner.cleanup()


def discovered(server: SimEngineServer) -> DiscoveredInstance:
    s = server.settings
    return DiscoveredInstance(instance_id=s.resolved_instance_id, host="127.0.0.1", port=s.port,
                              instance_type=InferType(s.instance_type), model=MODEL)


class Pd:
    def __init__(self, client: AsyncOpenAI, prefill: SimEngineServer,
                 decode: SimEngineServer, gateway: Gateway) -> None:
        self.client, self.prefill, self.decode, self.gateway = client, prefill, decode, gateway


@contextlib.asynccontextmanager
async def pd_stack(*flags: str, extra: Sequence[DiscoveredInstance] = (),
                   full_mode: bool = False) -> AsyncIterator[Pd]:
    """Lite mode: the scheduler's instances come from discovery. Full mode: from the CMS (an
    in-memory store the engines' llumlets write to)."""
    store = MemoryStore() if full_mode else None
    async with engine("prefill", store) as (_, prefill), engine("decode", store) as (_, decode):
        resolver = TypedResolver([discovered(prefill), discovered(decode), *extra])
        settings = load_gateway_settings(
            ["--enable-full-mode-scheduling", str(full_mode).lower(),
             "--llm-backend-discovery", "redis", *flags], {})
        scheduler = SchedulerCore(
            SchedulerSettings(enable_full_mode_scheduling=full_mode), store=store,
            resolver=resolver)
        gateway = Gateway(settings, scheduler=scheduler, resolver=resolver,
                          tokenizer=ApproxTokenizer(), gateway_id="test-gw")
        await gateway.start()
        server = await gateway.serve("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                             max_retries=0, timeout=20)
        try:
            yield Pd(client, prefill, decode, gateway)
        finally:
            await client.close()
            server.close()
            await gateway.close()


def scraped(server: SimEngineServer) -> dict[Any, float]:
    return metrics(server.metrics.render().decode())


def count(m: dict[Any, float], name: str) -> float:
    return sum(v for (n, _), v in m.items() if n == name)


async def _all_four(client: AsyncOpenAI, max_tokens: int) -> list[tuple[int, int, str]]:
    """Completion and chat, streamed and not: (completion_tokens, pieces, text) each."""
    out = []
    done = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens)
    assert done.usage is not None
    out.append((done.usage.completion_tokens, 1, done.choices[0].text))
    stream = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True})
    texts, usage = [], None
    async for chunk in stream:
        texts += [c.text for c in chunk.choices]
        usage = chunk.usage or usage
    assert usage is not None
    out.append((usage.completion_tokens, len(texts), "".join(texts)))
    messages: Any = [{"role": "user", "content": PROMPT}]
    chat = await client.chat.completions.create(model=MODEL, messages=messages,
                                                max_tokens=max_tokens)
    assert chat.usage is not None
    out.append((chat.usage.completion_tokens, 1, chat.choices[0].message.content or ""))
    chat_stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True})
    deltas, usage = [], None
    async for chunk in chat_stream:
        deltas += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert usage is not None
    out.append((usage.completion_tokens, len(deltas), "".join(deltas)))
    return out


@pytest.mark.parametrize("flags", [
    ("--pd-disagg-protocol", "vllm-mooncake"),
    ("--pd-disagg-protocol", "vllm-mooncake", "--separate-pd-scheduling", "true"),
    ("--pd-disagg-protocol", "vllm-kvt", "--separate-pd-scheduling", "true"),
], ids=["mooncake-batch", "mooncake-staged", "kvt-staged"])
def test_requests_prefill_on_p_decode_on_d_and_arrive_whole(flags: tuple[str, ...]) -> None:
    async def main() -> None:
        async with pd_stack(*flags) as pd:
            answers = await _all_four(pd.client, 12)
            p, d = scraped(pd.prefill), scraped(pd.decode)
            lite = pd.gateway.scheduler.dispatcher.lite  # type: ignore[union-attr]
        for tokens, _, text in answers:
            assert tokens == 12 and text.strip()
        assert answers[1][1] >= 12 and answers[3][1] >= 12  # streamed token by token
        # the prefill instance ran one request per client request, each one token long
        assert count(p, "vllm:request_success_total") == 4
        assert count(p, "vllm:generation_tokens_total") == 4
        assert count(p, "prescient:kv_transfer_received_requests_total") == 0
        # the decode instance generated everything and took every prompt's KV over the link
        assert count(d, "vllm:request_success_total") == 4
        assert count(d, "vllm:generation_tokens_total") == 4 * 12
        assert count(d, "prescient:kv_transfer_received_requests_total") == 4
        prompts = count(d, "vllm:prompt_tokens_total")
        assert count(d, "prescient:kv_transfer_received_tokens_total") == prompts - 4
        assert lite is not None and all(lite.num_requests(i) == 0
                                        for i in (pd.prefill.settings.resolved_instance_id,
                                                  pd.decode.settings.resolved_instance_id))

    asyncio.run(main())


def test_staged_lite_mode_frees_the_prefill_instance_before_placing_the_decode() -> None:
    async def main() -> None:
        async with pd_stack("--pd-disagg-protocol", "vllm-mooncake", "--separate-pd-scheduling",
                            "true") as pd:
            core = pd.gateway.scheduler
            assert isinstance(core, SchedulerCore) and core.dispatcher.lite is not None
            lite, events = core.dispatcher.lite, []
            p_id = pd.prefill.settings.resolved_instance_id
            schedule, release = core.schedule_now, core.release_now  # the gateway calls these

            def spy_schedule(request: Any) -> Any:
                placed = schedule(request)
                events.append(("schedule", request.scheduling_stage, lite.num_requests(p_id)))
                return placed

            def spy_release(request: Any) -> None:
                events.append(("release", [i.infer_type for i in request.scheduling_result],
                               lite.num_requests(p_id)))
                release(request)

            core.schedule_now, core.release_now = (  # type: ignore[method-assign]
                spy_schedule, spy_release)
            done = await pd.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8)
        assert done.usage is not None and done.usage.completion_tokens == 8
        assert events == [("schedule", "prefill", 1), ("release", ["prefill"], 1),
                          ("schedule", "decode", 0), ("release", ["decode"], 0)]

    asyncio.run(main())


def test_full_mode_places_both_legs_from_the_cms() -> None:
    async def main() -> None:
        async with pd_stack("--pd-disagg-protocol", "vllm-mooncake", "--separate-pd-scheduling",
                            "true", full_mode=True) as pd:
            answers = await _all_four(pd.client, 6)
            p, d = scraped(pd.prefill), scraped(pd.decode)
            fallbacks = pd.gateway.metrics.fallbacks
        assert [tokens for tokens, _, _ in answers] == [6, 6, 6, 6]
        assert fallbacks == 0  # the scheduler placed every leg, from the llumlets' records
        assert count(p, "vllm:generation_tokens_total") == 4
        assert count(d, "vllm:generation_tokens_total") == 4 * 6
        assert count(d, "prescient:kv_transfer_received_requests_total") == 4

    asyncio.run(main())


def test_a_dead_prefill_instance_is_released_and_avoided() -> None:
    async def main() -> None:
        dead_port = free_port()  # nothing listens: connections are refused
        dead = DiscoveredInstance(instance_id="prefill-dead", host="127.0.0.1", port=dead_port,
                                  instance_type=InferType.PREFILL, model=MODEL)
        async with pd_stack("--pd-disagg-protocol", "vllm-mooncake",
                            extra=[dead]) as pd:
            # at once: the least-loaded choice spreads them over both prefill instances
            answers = await asyncio.gather(*(
                pd.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5)
                for _ in range(4)))
            for done in answers:
                assert done.usage is not None and done.usage.completion_tokens == 5
            retries = pd.gateway.metrics.retries
            lite = pd.gateway.scheduler.dispatcher.lite  # type: ignore[union-attr]
        assert retries >= 1
        assert lite is not None and lite.num_requests("prefill-dead") == 0

    asyncio.run(main())


def test_a_refused_prefill_is_relayed_to_the_client() -> None:
    async def main() -> None:
        async with pd_stack("--pd-disagg-protocol", "vllm-mooncake") as pd:
            with pytest.raises(openai.NotFoundError, match="does not exist"):
                await pd.client.completions.create(model="other-model", prompt=PROMPT,
                                                   max_tokens=5)
            lite = pd.gateway.scheduler.dispatcher.lite  # type: ignore[union-attr]
            d = scraped(pd.decode)
        assert count(d, "vllm:request_success_total") == 0  # the decode leg never ran
        assert lite is not None and lite.num_requests(
            pd.prefill.settings.resolved_instance_id) == 0  # released (lite mode)

    asyncio.run(main())


def test_the_prefill_engine_answers_kv_transfer_params_and_the_decode_engine_uses_them() -> None:
    async def main() -> None:
        async with engine("prefill") as (p_url, p), engine("decode") as (d_url, d), \
                aiohttp.ClientSession() as http:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1,
                    "kv_transfer_params": {"do_remote_decode": True}}
            async with http.post(p_url + "/v1/completions", json=body) as r:
                assert r.status == 200
                answer = await r.json()
            params = answer["kv_transfer_params"]
            assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
            assert params["remote_engine_id"] == p.settings.resolved_instance_id
            assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1",
                                                                     p.settings.port)
            prompt_len = answer["usage"]["prompt_tokens"]
            assert len(params["remote_block_ids"]) == -(-prompt_len // 16)
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 7,
                    "kv_transfer_params": params}
            async with http.post(d_url + "/v1/completions", json=body) as r:
                assert r.status == 200
                decoded = await r.json()
            plain = {"model": MODEL, "prompt": PROMPT, "max_tokens": 7}
            async with http.post(d_url + "/v1/completions", json=plain) as r:
                assert "kv_transfer_params" not in await r.json()
        assert decoded["usage"]["completion_tokens"] == 7
        assert "kv_transfer_params" not in decoded
        m = scraped(d)
        assert count(m, "prescient:kv_transfer_received_requests_total") == 1
        assert count(m, "prescient:kv_transfer_received_tokens_total") == prompt_len - 1

    asyncio.run(main())


@pytest.mark.parametrize("flags,named", [
    (["--separate-pd-scheduling", "true"], "--separate-pd-scheduling"),
    (["--pd-disagg-protocol", "vllm-kvt"], "--pd-disagg-protocol"),
    (["--pd-disagg-protocol", "vllm-mooncake", "--scheduling-policy", "round-robin"],
     "--pd-disagg-protocol"),
    (["--pd-disagg-protocol", "sglang-mooncake"], "--pd-disagg-protocol"),
])
def test_bad_pd_flag_combinations_name_the_flag(flags: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_gateway_settings(flags, {})


def test_prefill_body_is_one_token_not_streamed() -> None:
    from prescient.gateway.pd import prefill_request

    body = json.loads(prefill_request({"model": MODEL, "prompt": "x", "max_tokens": 9,
                                       "stream": True,
                                       "stream_options": {"include_usage": True}}))
    assert body["max_tokens"] == 1 and body["stream"] is False and "stream_options" not in body
    assert body["kv_transfer_params"]["do_remote_decode"] is True
    chat = msgspec.json.decode(prefill_request({"model": MODEL, "messages": [],
                                                "max_completion_tokens": 9}))
    assert chat["max_completion_tokens"] == 1
