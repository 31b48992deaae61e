"""`prescient sim-engine`'s HTTP API on a real socket, through the official OpenAI client and
plain aiohttp. The server runs in the test's event loop at 50x real time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from prescient.config.sim_engine import SimEngineSettings
from prescient.llumlet.sources import MetricsScrapeSource
from prescient.simengine.server import SERVER_KEY, SimEngineServer, build_app, start_server

from .harness import free_port

MODEL = "prescient-sim"


@contextlib.asynccontextmanager
async def serving(app_hook: Callable[[web.Application], None] | None = None,
                  **overrides: Any) -> AsyncIterator[tuple[str, SimEngineServer]]:
    port = free_port()
    settings = SimEngineSettings(host="127.0.0.1", port=port, **{"time_scale": 50.0,
                                                                 **overrides})
    app = build_app(settings)
    if app_hook is not None:
        app_hook(app)
    runner = await start_server(settings, app=app)
    try:
        yield f"http://127.0.0.1:{port}", app[SERVER_KEY]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def oai(base: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    try:
        yield client
    finally:
        await client.close()


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items()
                                  if k not in ("model_name", "engine")))
            out[(s.name, labels)] = s.value
    return out


async def scrape(http: aiohttp.ClientSession, base: str) -> dict[Any, float]:
    async with http.get(base + "/metrics") as r:
        assert r.status == 200
        return metrics(await r.text())


async def wait_for(condition: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


# ---- the OpenAI client ------------------------------------------------------------------


def test_completion_usage_and_ids_through_the_openai_client() -> None:
    async def main() -> None:
        async with serving() as (base, _), oai(base) as client, aiohttp.ClientSession() as http:
            prompt = "Why is the queue slow? The server must find the next request."
            async with http.post(base + "/tokenize", json={"prompt": prompt}) as r:
                counted = (await r.json())["count"]
            out = await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=17,
                extra_headers={"x-request-id": "req-1"}, extra_body={"ignore_eos": True})
            assert out.id == "cmpl-req-1"
            assert out.usage is not None
            assert out.usage.prompt_tokens == counted > 5
            assert out.usage.completion_tokens == 17
            assert out.usage.total_tokens == counted + 17
            assert out.choices[0].finish_reason == "length"
            assert len(out.choices[0].text.split()) == 17  # one word per token

    asyncio.run(main())


def test_streamed_chat_with_usage_matches_the_unstreamed_text() -> None:
    async def main() -> None:
        async with serving() as (base, _), oai(base) as client:
            messages = [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "What is a cache?"}]
            whole = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=12,  # type: ignore[arg-type]
                extra_headers={"x-request-id": "chat-1"})
            stream = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=12, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True}, extra_headers={"x-request-id": "chat-1"})
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
            assert text and text == whole.choices[0].message.content
            assert chunks[0].choices[0].delta.role == "assistant"
            assert reasons.count("length") == 1 and reasons[-1] == "length"
            final = chunks[-1]
            assert final.choices == [] and final.usage is not None
            assert final.usage.completion_tokens == 12
            assert whole.usage is not None
            assert final.usage.prompt_tokens == whole.usage.prompt_tokens > 0
            assert all(c.id == "chatcmpl-chat-1" for c in chunks)

    asyncio.run(main())


def test_token_id_prompts_and_prompt_lists() -> None:
    async def main() -> None:
        async with serving() as (base, _), oai(base) as client:
            out = await client.completions.create(model=MODEL, prompt=list(range(100, 140)),
                                                  max_tokens=3)
            assert out.usage is not None and out.usage.prompt_tokens == 40
            one = await client.completions.create(model=MODEL, prompt=["hello world"],
                                                  max_tokens=2)
            assert one.usage is not None and one.usage.prompt_tokens == 2
            ids = await client.completions.create(model=MODEL, prompt=[[5, 6, 7]], max_tokens=2)
            assert ids.usage is not None and ids.usage.prompt_tokens == 3
            with pytest.raises(openai.BadRequestError, match="one prompt"):
                await client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2)

    asyncio.run(main())


def test_twenty_concurrent_streams_all_complete() -> None:
    async def main() -> None:
        async with serving(max_num_seqs=8) as (base, server), oai(base) as client:
            async def one(i: int) -> tuple[int, int]:
                stream = await client.completions.create(
                    model=MODEL, prompt=f"request number {i} " * 20, max_tokens=10 + i,
                    stream=True, stream_options={"include_usage": True})
                text, usage = "", 0
                async for chunk in stream:
                    if chunk.choices:
                        text += chunk.choices[0].text
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
                return len(text.split()), usage

            results = await asyncio.gather(*(one(i) for i in range(20)))
            assert results == [(10 + i, 10 + i) for i in range(20)]
            assert server.driver.num_live == 0
            engine = server.engine
            assert not engine.has_work and engine.pool.num_free == engine.pool.num_blocks

    asyncio.run(main())


# ---- errors, as vLLM answers them -------------------------------------------------------


def test_bad_requests_get_openai_error_bodies() -> None:
    async def main() -> None:
        async with serving(max_model_len=256) as (base, _), aiohttp.ClientSession() as http:
            async def post(path: str, body: Any, status: int, needle: str) -> None:
                kw = {"data": body} if isinstance(body, bytes) else {"json": body}
                async with http.post(base + path, **kw) as r:
                    error = (await r.json())["error"]
                    assert r.status == status, error
                    assert set(error) == {"message", "type", "param", "code"}
                    assert error["code"] == status
                    assert needle in error["message"], error

            ok = {"model": MODEL, "prompt": "hi"}
            await post("/v1/completions", b"{not json", 400, "malformed JSON")
            await post("/v1/completions", {"prompt": "hi"}, 400, "model")
            await post("/v1/completions", {**ok, "model": "gpt-9"}, 404,
                       "The model `gpt-9` does not exist.")
            await post("/v1/completions", {**ok, "max_tokens": 0}, 400, "max_tokens")
            await post("/v1/completions", {**ok, "max_tokens": 500}, 400, "too large")
            await post("/v1/completions", {**ok, "prompt": list(range(300))}, 400,
                       "maximum context length is 256 tokens")
            await post("/v1/completions", {**ok, "prompt": [1, "a"]}, 400, "mix")
            await post("/v1/completions", {**ok, "prompt": [-1]}, 400, "out of vocab")
            await post("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "empty")
            await post("/tokenize", {"model": "other", "prompt": "x"}, 404, "does not exist")
            async with http.get(base + "/nowhere") as r:
                assert r.status == 404 and "error" in await r.json()

    asyncio.run(main())


def test_requests_beyond_the_kv_cache_are_refused() -> None:
    async def main() -> None:
        async with serving(num_gpu_blocks=8) as (base, _), aiohttp.ClientSession() as http:
            body = {"model": MODEL, "prompt": list(range(1, 200)), "max_tokens": 10}
            async with http.post(base + "/v1/completions", json=body) as r:
                assert r.status == 400
                assert "KV cache" in (await r.json())["error"]["message"]

    asyncio.run(main())


# ---- the other endpoints ----------------------------------------------------------------


def test_models_health_tokenize_detokenize() -> None:
    async def main() -> None:
        async with serving(max_model_len=4096) as (base, _), aiohttp.ClientSession() as http:
            async with http.get(base + "/health") as r:
                assert r.status == 200 and await r.read() == b""
            async with http.get(base + "/v1/models") as r:
                data = (await r.json())["data"]
                assert [m["id"] for m in data] == [MODEL] and data[0]["max_model_len"] == 4096
            async with http.post(base + "/tokenize", json={"prompt": "the dog ran"}) as r:
                out = await r.json()
                assert out["count"] == 3 == len(out["tokens"]) and out["max_model_len"] == 4096
            async with http.post(base + "/detokenize", json={"tokens": out["tokens"]}) as r:
                assert (await r.json())["prompt"] == "the dog ran"
            chat = {"messages": [{"role": "user", "content": "the dog ran"}]}
            async with http.post(base + "/tokenize", json=chat) as r:
                assert (await r.json())["count"] > 3  # the template's role lines

    asyncio.run(main())


def test_metrics_use_vllm_names_and_move_with_requests() -> None:
    async def main() -> None:
        async with serving() as (base, _), aiohttp.ClientSession() as http:
            before = await scrape(http, base)
            for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                         "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                         "vllm:generation_tokens_total"):
                assert before[(name, ())] == 0.0, name
            assert before[("vllm:time_to_first_token_seconds_count", ())] == 0
            for n in (5, 7):
                body = {"model": MODEL, "prompt": list(range(1, 21)), "max_tokens": n}
                async with http.post(base + "/v1/completions", json=body) as r:
                    assert r.status == 200
            after = await scrape(http, base)
            assert after[("vllm:prompt_tokens_total", ())] == 40
            assert after[("vllm:generation_tokens_total", ())] == 12
            assert after[("vllm:request_success_total", (("finished_reason", "length"),))] == 2
            for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                      "request_time_per_output_token_seconds"):
                assert after[(f"vllm:{h}_count", ())] == 2, h
            assert after[("vllm:inter_token_latency_seconds_count", ())] == 10
            assert after[("vllm:num_requests_running", ())] == 0
            info = [k for k in after if k[0] == "vllm:cache_config_info"]
            assert dict(info[0][1])["num_gpu_blocks"] == "29205"
            # the llumlet's scraper for stock vLLM servers reads this page too
            async with http.get(base + "/metrics") as r:
                status = MetricsScrapeSource(base + "/metrics", "x").parse(await r.text())
            assert status.num_total_gpu_tokens == 29205 * 16
            assert (status.num_running_requests, status.num_used_gpu_tokens) == (0, 0)

    asyncio.run(main())


# ---- clients that go away ---------------------------------------------------------------


def test_a_client_leaving_mid_stream_aborts_its_request() -> None:
    async def main() -> None:
        async with serving(time_scale=1.0) as (base, server), aiohttp.ClientSession() as http:
            async def running() -> float:
                return (await scrape(http, base))[("vllm:num_requests_running", ())]

            body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 4000,
                    "stream": True}
            async with aiohttp.ClientSession() as leaver:
                r = await leaver.post(base + "/v1/completions", json=body)
                await r.content.readline()  # the first chunk arrived
                assert await running() == 1
                r.close()  # drop the connection
            await wait_for(lambda: _is(running, 0.0))
            assert server.driver.num_live == 0
            aborted = (await scrape(http, base))[
                ("vllm:request_success_total", (("finished_reason", "abort"),))]
            assert aborted == 1

    asyncio.run(main())


def test_a_client_leaving_a_non_streamed_request_aborts_it() -> None:
    async def main() -> None:
        async with serving(time_scale=1.0) as (base, server), aiohttp.ClientSession() as http:
            body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 4000}
            leaver = aiohttp.ClientSession()
            task = asyncio.create_task(leaver.post(base + "/v1/completions", json=body))

            async def live() -> bool:
                return server.driver.num_live == 1 and server.engine.num_steps > 2

            await wait_for(live)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await leaver.close()

            async def gone() -> bool:
                return server.driver.num_live == 0 and not server.engine.has_work

            await wait_for(gone)
            assert (await scrape(http, base))[("vllm:num_requests_running", ())] == 0

    asyncio.run(main())


async def _is(probe: Callable[[], Any], value: float) -> bool:
    return bool(await probe() == value)


def test_duplicate_live_request_ids_both_run() -> None:
    async def main() -> None:
        async with serving() as (base, server), oai(base) as client:
            async def one() -> str:
                out = await client.completions.create(
                    model=MODEL, prompt="hi", max_tokens=30,
                    extra_headers={"x-request-id": "twin"})
                assert out.usage is not None and out.usage.completion_tokens == 30
                return out.id

            assert await asyncio.gather(one(), one()) == ["cmpl-twin", "cmpl-twin"]
            assert server.driver.num_live == 0

    asyncio.run(main())


def test_x_request_id_is_echoed_and_tcp_nodelay_is_on() -> None:
    seen: list[int] = []

    async def nodelay(request: web.Request) -> web.Response:
        sock = request.transport.get_extra_info("socket")  # type: ignore[union-attr]
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return web.Response()

    def hook(app: web.Application) -> None:
        app.router.add_get("/_nodelay", nodelay)

    async def main() -> None:
        async with serving(hook) as (base, _), aiohttp.ClientSession() as http:
            for body, stream in ((b"{}", False), ({"model": MODEL, "prompt": "x",
                                                   "max_tokens": 2, "stream": True}, True)):
                kw = {"data": body} if isinstance(body, bytes) else {"json": body}
                async with http.post(base + "/v1/completions", headers={"x-request-id": "e-1"},
                                     **kw) as r:
                    assert r.headers["x-request-id"] == "e-1"
                    if stream:
                        assert (await r.text()).endswith("data: [DONE]\n\n")
            async with http.get(base + "/_nodelay") as r:
                assert r.status == 200
        assert seen and seen[0] != 0

    asyncio.run(main())


def hf_tokenizer_dir(directory: Path) -> Path:
    """A tiny byte-level BPE tokenizer with a chat template, made here."""
    corpus = ["the cat runs over the dog", "a server answers the request fast",
              "why is the queue slow today", "hello world the model is a cache"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}))
    return directory


def test_a_real_tokenizer_streams_the_same_text_and_counts_the_template(tmp_path: Path) -> None:
    directory = hf_tokenizer_dir(tmp_path / "tiny")

    async def main() -> None:
        async with serving(tokenizer=str(directory)) as (base, _), oai(base) as client, \
                aiohttp.ClientSession() as http:
            messages = [{"role": "user", "content": "why is the queue slow"}]
            async with http.post(base + "/tokenize", json={"messages": messages}) as r:
                counted = (await r.json())["count"]
            async with http.post(base + "/tokenize", json={"prompt": messages[0]["content"],
                                                           "add_special_tokens": False}) as r:
                content_only = (await r.json())["count"]
            whole = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=25,  # type: ignore[arg-type]
                extra_headers={"x-request-id": "hf-1"})
            stream = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=25, stream=True,  # type: ignore[arg-type]
                extra_headers={"x-request-id": "hf-1"})
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            assert whole.usage is not None and whole.usage.prompt_tokens == counted
            assert counted > content_only + 3  # BOS and the role markers were tokenized too
            assert text == whole.choices[0].message.content and text.strip()
            with pytest.raises(openai.BadRequestError, match="out of vocabulary"):
                await client.completions.create(model=MODEL, prompt=[5, 10**6], max_tokens=2)

    asyncio.run(main())


def test_an_engine_failure_turns_health_and_new_requests_to_503() -> None:
    async def main() -> None:
        async with serving() as (base, server), aiohttp.ClientSession() as http:
            def broken(now: float) -> float:
                raise RuntimeError("injected engine bug")

            server.engine.start_step = broken  # type: ignore[method-assign]
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 5}
            async with http.post(base + "/v1/completions", json=body) as r:
                assert r.status == 503  # its stream ended: the engine stopped
            async with http.get(base + "/health") as r:
                assert r.status == 503
            async with http.post(base + "/v1/completions", json=body) as r:
                assert r.status == 503
                assert "injected engine bug" in (await r.json())["error"]["message"]

    asyncio.run(main())
