"""Token replay in the live gateway: an engine killed mid-stream, its streams finish elsewhere.

Two sim-engines run as child processes (so SIGKILL is a real death: the gateway's connection
breaks mid-response) behind an in-process gateway with an embedded lite-mode scheduler. The
official `openai` client streams a completion and a chat; once text has arrived, the engine
serving it is killed. The client must see one whole stream: no error event, all `max_tokens`
tokens (counted from the text it received, not only from `usage`), one id, and the replay
counter moved. A client that leaves mid-stream is not replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from openai import AsyncOpenAI

from prescient.config.gateway import load_gateway_settings
from prescient.config.scheduler import SchedulerSettings
from prescient.discovery.base import StaticResolver
from prescient.gateway.app import Gateway
from prescient.scheduler.core import SchedulerCore
from prescient.tokenizer import ApproxTokenizer

from .harness import child, free_port, wait_for_port
from .test_sim_engine_server import metrics

MODEL = "prescient-sim"
PROMPT = "the quick brown fox jumps over the lazy dog " * 8
MAX_TOKENS = 64
TOK = ApproxTokenizer()


class Engine:
    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port, self.proc = port, proc
        self.base = f"http://127.0.0.1:{port}"

    async def running(self, http: aiohttp.ClientSession) -> float:
        """Requests running now; -1 when the engine is gone."""
        try:
            async with http.get(self.base + "/metrics") as r:
                m = metrics(await r.text())
        except aiohttp.ClientError:
            return -1
        return sum(v for (name, _), v in m.items() if name == "vllm:num_requests_running")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@contextlib.contextmanager
def engines(tmp: Path) -> Iterator[list[Engine]]:
    """Two sim-engines slowed so a 64-token stream lasts long enough to kill one mid-way."""
    ports = [free_port(), free_port()]
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(child(
            ["sim-engine", "--host", "127.0.0.1", "--port", str(port), "--time-scale", "2",
             "--instance-id", f"e{port}"], log=tmp / f"engine-{port}.log")) for port in ports]
        out = [Engine(port, proc) for port, proc in zip(ports, procs, strict=True)]
        for port in ports:
            wait_for_port(port)
        yield out


class Stack:
    def __init__(self, gateway: Gateway, client: AsyncOpenAI, engines: list[Engine],
                 http: aiohttp.ClientSession) -> None:
        self.gateway, self.client, self.engines, self.http = gateway, client, engines, http

    async def serving(self) -> Engine:
        """The engine running the one request in flight."""
        for _ in range(200):
            for engine in self.engines:
                if await engine.running(self.http) > 0:
                    return engine
            await asyncio.sleep(0.02)
        raise AssertionError("no engine runs the request")


@contextlib.asynccontextmanager
async def stack(tmp: Path, *flags: str) -> AsyncIterator[Stack]:
    with engines(tmp) as running:
        addresses = [f"127.0.0.1:{e.port}" for e in running]
        settings = load_gateway_settings(
            ["--llm-backend-endpoints", ",".join(addresses), *flags], {})
        resolver = StaticResolver(addresses)
        scheduler = SchedulerCore(SchedulerSettings(enable_full_mode_scheduling=False),
                                  resolver=resolver)
        gateway = Gateway(settings, scheduler=scheduler, resolver=resolver,
                          tokenizer=ApproxTokenizer(), gateway_id="test-gw")
        await gateway.start()
        server = await gateway.serve("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                             max_retries=0, timeout=30)
        http = aiohttp.ClientSession()
        try:
            yield Stack(gateway, client, running, http)
        finally:
            await http.close()
            await client.close()
            server.close()
            await gateway.close()


def whole(ids: set[str], created: set[int], text: str, usage: Any) -> None:
    """One stream's worth: one id, one created, all tokens in the text and in usage."""
    assert len(ids) == 1 and len(created) == 1, (ids, created)
    assert len(TOK.encode(text)) == MAX_TOKENS, text  # the text itself is complete
    assert usage is not None and usage.completion_tokens == MAX_TOKENS, usage
    assert usage.prompt_tokens > 0 and usage.total_tokens == (
        usage.prompt_tokens + usage.completion_tokens)


def test_completion_stream_survives_its_engine(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            stream = await s.client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True,
                stream_options={"include_usage": True})
            ids, created, text, usage, killed = set(), set(), "", None, None
            async for chunk in stream:  # an error event would raise here
                ids.add(chunk.id)
                created.add(chunk.created)
                if chunk.choices:
                    text += chunk.choices[0].text
                usage = chunk.usage or usage
                if text and killed is None:
                    killed = await s.serving()
                    killed.kill()
            assert killed is not None
            whole(ids, created, text, usage)
            assert usage.prompt_tokens == len(TOK.encode(PROMPT))
            assert s.gateway.metrics.replays == 1
            assert b"prescient_gateway_replays_total 1.0" in s.gateway.metrics.render()

    asyncio.run(main())


def test_chat_stream_survives_its_engine(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": PROMPT}]

    async def main() -> None:
        async with stack(tmp_path) as s:
            stream = await s.client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                stream=True, stream_options={"include_usage": True})
            ids, created, text, usage, killed, roles = set(), set(), "", None, None, 0
            async for chunk in stream:
                ids.add(chunk.id)
                created.add(chunk.created)
                if chunk.choices:
                    delta = chunk.choices[0].delta
                    roles += delta.role is not None
                    text += delta.content or ""
                usage = chunk.usage or usage
                if text and killed is None:
                    killed = await s.serving()
                    killed.kill()
            assert killed is not None
            whole(ids, created, text, usage)
            assert roles == 1  # the continuation's opening delta was dropped
            prompt = TOK.encode(TOK.apply_chat_template(messages), add_special_tokens=False)
            assert usage.prompt_tokens == len(prompt)
            assert s.gateway.metrics.replays == 1

    asyncio.run(main())


def test_raw_stream_has_one_done(tmp_path: Path) -> None:
    """On the wire: whole events, one `[DONE]`, no error event."""
    async def main() -> None:
        async with stack(tmp_path) as s:
            url = str(s.client.base_url) + "completions"
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}
            raw, killed = b"", None
            async with s.http.post(url, json=body) as r:
                assert r.status == 200
                async for data in r.content.iter_any():
                    raw += data
                    if b'"text":"' in raw and killed is None:
                        killed = await s.serving()
                        killed.kill()
            assert killed is not None
            events = raw.split(b"\n\n")
            assert events[-1] == b"" and events[-2] == b"data: [DONE]", raw[-200:]
            assert raw.count(b"[DONE]") == 1 and b'"error"' not in raw
            assert s.gateway.metrics.replays == 1

    asyncio.run(main())


def test_replays_stop_at_the_retry_limit(tmp_path: Path) -> None:
    """--retry-max-count 1: the first death is replayed, the second ends with an error event."""
    async def main() -> None:
        async with stack(tmp_path, "--retry-max-count", "1") as s:
            url = str(s.client.base_url) + "completions"
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}
            raw, killed = b"", []
            async with s.http.post(url, json=body) as r:
                async for data in r.content.iter_any():
                    raw += data
                    if raw.count(b'"text":"') > 2 * len(killed) and len(killed) < 2:
                        victim = await s.serving()
                        victim.kill()
                        killed.append(victim)
                        s.engines.remove(victim)
            assert len(killed) == 2
            error = json.loads(raw.split(b"\n\n")[-3][6:])
            assert "cut short" in error["error"]["message"], raw[-300:]
            assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"[DONE]") == 1
            assert s.gateway.metrics.replays == 1

    asyncio.run(main())


def test_a_client_that_leaves_is_not_replayed(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            stream = await s.client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    break
            serving = await s.serving()
            await stream.close()
            for _ in range(200):  # the engine aborts the request it was running
                if await serving.running(s.http) == 0:
                    break
                await asyncio.sleep(0.02)
            assert await serving.running(s.http) == 0
            others = [e for e in s.engines if e is not serving]
            assert [await e.running(s.http) for e in others] == [0]
            assert s.gateway.metrics.replays == 0

    asyncio.run(main())


def test_a_stream_migrated_by_token_replay_arrives_whole(tmp_path: Path) -> None:
    """`POST /admin/migrate` moves a running stream to the other engine, which finishes it;
    the source engine aborted its copy (the disconnect), and the client saw one stream."""
    async def main() -> None:
        async with stack(tmp_path, "--admin-token", "secret") as s:
            admin = str(s.client.base_url).removesuffix("v1/") + "admin/migrate"
            auth = {"Authorization": "Bearer secret"}
            stream = await s.client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True,
                stream_options={"include_usage": True},
                extra_headers={"x-request-id": "move-me"})
            ids, created, text, usage, source, moved = set(), set(), "", None, None, None
            async for chunk in stream:
                ids.add(chunk.id)
                created.add(chunk.created)
                if chunk.choices:
                    text += chunk.choices[0].text
                usage = chunk.usage or usage
                if text and source is None:
                    source = await s.serving()
                    async with s.http.post(admin, json={"request_id": "move-me"},
                                           headers=auth) as r:
                        assert r.status == 200, await r.text()
                        moved = await r.json()
            assert source is not None and moved == {
                "request_id": "move-me", "from": f"127.0.0.1:{source.port}"}
            whole(ids, created, text, usage)
            assert s.gateway.metrics.migrations == 1
            assert s.gateway.metrics.replays == 0 and not s.gateway.metrics.errors
            assert all(e.proc.poll() is None for e in s.engines)  # nobody died
            assert await source.running(s.http) == 0  # the source let its copy go
            # a finished stream cannot be migrated; nor without the token
            async with s.http.post(admin, json={"request_id": "move-me"}, headers=auth) as r:
                assert r.status == 404 and (await r.json())["error"]["param"] == "request_id"
            async with s.http.post(admin, json={"request_id": "move-me"}) as r:
                assert r.status == 401
            async with s.http.post(admin, json={"id": "x"}, headers=auth) as r:
                assert r.status == 400

    asyncio.run(main())


def test_admin_routes_are_off_without_a_token(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            admin = str(s.client.base_url).removesuffix("v1/") + "admin/migrate"
            async with s.http.post(admin, json={"request_id": "x"}) as r:
                assert r.status == 403 and "--admin-token" in (await r.json())["error"]["message"]

    asyncio.run(main())
