"""Prescient in front of two real vLLM CPU engines, driven by the official `openai` client.

Full mode: each engine runs Prescient's stat-logger plugin (integrations/vllm), which pushes its
per-step status to a `prescient llumlet --status-endpoint` beside it; the llumlets write the CMS
on Redis; a `prescient scheduler` reads it and a gateway asks that scheduler. Lite mode: a
gateway with an embedded lite scheduler over `--llm-backend-endpoints`, nothing in the engines.

Proved here on a real engine: the OpenAI API passes through both modes (streams and not, usage
exact); the CMS carries the plugin's statuses (waiting request ids that line up with the ids the
gateway forced, token loads, step timings as profiling samples); a running stream migrated by
token replay and a stream whose engine is killed both arrive whole.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from openai import OpenAI
from redis import Redis

from prescient.cms.codec import decode_status
from prescient.cms.store import STATUS_KEY_PREFIX
from prescient.model import InstanceStatus
from prescient.policy.account import normalize_request_id

from ..harness import RedisTarget, child, shared_redis
from ..stack import (
    Service,
    Stack,
    cms_flags,
    health,
    http_post,
    metric,
    scheduler_args,
    successes,
    wait_until,
)
from .engine import BLOCK_SIZE, HASH_SEED, MODEL, VllmEngine

pytestmark = pytest.mark.timeout(900)

MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "why is the queue slow when the cache is cold?"}]
PROMPT = "the cat runs over the red server and the blue queue " * 4
ADMIN_TOKEN = "e2e-admin"
BURST, BURST_PROMPT = 24, 1200  # ~30k prompt tokens: prefills queue for about a second


class Prescient:
    """Llumlets, a full-mode scheduler and two gateways (full, lite) over `engines`."""

    def __init__(self, stack: Stack, exit_stack: ExitStack, redis: RedisTarget,
                 engines: list[VllmEngine], logs: Path) -> None:
        self.stack, self.redis, self.engines = stack, redis, engines
        self._redis = exit_stack.enter_context(
            Redis(host=redis.host, port=redis.port, db=redis.db))
        for engine in engines:
            exit_stack.enter_context(child(
                ["llumlet", "--engine-url", engine.url, "--instance-id", engine.name,
                 "--status-endpoint", engine.status_endpoint, "--block-size", str(BLOCK_SIZE),
                 "--scrape-interval-ms", "1000", "--cms-redis-host", redis.host,
                 "--cms-redis-port", str(redis.port), "--cms-redis-db", str(redis.db)],
                log=logs / f"llumlet-{engine.port}.log"))
        self.scheduler, self.cache_scheduler = stack.start([
            ("scheduler", scheduler_args(*cms_flags(redis))),
            ("scheduler-cache", scheduler_args(
                *cms_flags(redis), "--enable-cache-aware-scheduling", "--cache-index",
                "kv-events", "--prefix-caching-hash-seed", HASH_SEED,
                "--cache-aware-scheduling-min-tokens", "256"))])
        tokenizer = str(engines[0].venv / MODEL)
        common = ["--llm-backend-endpoints", ",".join(e.address for e in engines),
                  "--served-model-name", MODEL, "--tokenizer-path", tokenizer,
                  "--admin-token", ADMIN_TOKEN]
        self.full, self.lite, self.cache = stack.start([
            ("gateway-full", lambda port: ["gateway", "--host", "127.0.0.1", "--port", str(port),
                                           "--scheduler-endpoints", self.scheduler.address,
                                           *common]),
            ("gateway-lite", lambda port: ["gateway", "--host", "127.0.0.1", "--port", str(port),
                                           "--enable-full-mode-scheduling=false", *common]),
            ("gateway-cache", lambda port: ["gateway", "--host", "127.0.0.1", "--port",
                                            str(port), "--scheduler-endpoints",
                                            self.cache_scheduler.address, *common])])
        for scheduler in (self.scheduler, self.cache_scheduler):
            wait_until(lambda s=scheduler: health(s).get("instances") == 2, 30,
                       f"{scheduler.name} to see both vLLM instances in the CMS", stack)

    def status(self, engine: VllmEngine) -> InstanceStatus | None:
        raw = self._redis.get(STATUS_KEY_PREFIX + engine.name)
        return None if raw is None else decode_status(raw, engine.name)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def prescient(vllm_engines: list[VllmEngine], tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Prescient]:
    logs = tmp_path_factory.mktemp("prescient-logs")
    stack = Stack(logs)
    try:
        with shared_redis() as redis, ExitStack() as exits, stack.diagnosis():
            yield Prescient(stack, exits, redis, vllm_engines, logs)
    finally:
        stack.close()


def client_of(gateway: Service) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=60)


def tokens(engine: VllmEngine, **body: object) -> int:
    status, answer = http_post(engine.url + "/tokenize",
                               json.dumps({"model": MODEL, **body}).encode())
    assert status == 200, answer
    return int(answer["count"])


@pytest.mark.parametrize("mode", ["full", "lite"])
def test_the_openai_api_passes_through_to_vllm(prescient: Prescient, mode: str) -> None:
    gateway = prescient.full if mode == "full" else prescient.lite
    text_len = tokens(prescient.engines[0], prompt=PROMPT)
    chat_len = tokens(prescient.engines[0], messages=MESSAGES)
    ignore_eos = {"ignore_eos": True}
    with prescient.stack.diagnosis(), client_of(gateway) as client:
        assert [m.id for m in client.models.list()] == [MODEL]
        done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7,
                                         extra_body=ignore_eos)
        assert done.usage is not None
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (text_len, 7)
        chat = client.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                              max_tokens=5, extra_body=ignore_eos)
        assert chat.choices[0].message.role == "assistant" and chat.usage is not None
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (chat_len, 5)
        chunks = list(client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, stream=True, extra_body=ignore_eos,
            stream_options={"include_usage": True}))
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
        deltas = list(client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=9, stream=True,  # type: ignore[arg-type]
            extra_body=ignore_eos, stream_options={"include_usage": True}))
        assert deltas[-1].usage is not None
        assert (deltas[-1].usage.prompt_tokens, deltas[-1].usage.completion_tokens) == (
            chat_len, 9)
    assert metric(gateway, "prescient_gateway_fallbacks_total") == 0


def test_full_mode_reads_the_plugins_statuses(prescient: Prescient) -> None:
    """While a burst runs, the CMS shows each engine's own view: the prefilling requests by the
    ids the gateway forced, their prompt tokens, and step timings; the burst is spread."""
    seen: dict[str, InstanceStatus] = {}
    last: dict[str, InstanceStatus | None] = {}
    pushed = 0
    ids = {f"burst-{i}" for i in range(BURST)}
    before = successes(prescient.engines)
    # one client for all threads: the burst arrives at once, and prefills queue up
    with prescient.stack.diagnosis(), client_of(prescient.full) as client, \
            ThreadPoolExecutor(BURST) as pool:
        def one(i: int) -> int:
            out = client.completions.create(
                model=MODEL, prompt=[7 + (i * 13 + j) % 1000 for j in range(BURST_PROMPT)],
                max_tokens=48, extra_body={"ignore_eos": True},
                extra_headers={"x-request-id": f"burst-{i}"})
            return out.usage.completion_tokens if out.usage else 0

        futures = [pool.submit(one, i) for i in range(BURST)]
        deadline = time.monotonic() + 60
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            for engine in prescient.engines:
                status = last[engine.name] = prescient.status(engine)
                pushed += status is not None and status.step_id > 0
                if status is not None and status.waiting_requests:
                    seen.setdefault(engine.name, status)
            time.sleep(0.005)
        assert [f.result() for f in futures] == [48] * BURST
    assert seen, (f"no status showed a waiting request (the plugin's fields); pushed statuses "
                  f"seen: {pushed}; last {last}")
    for name, status in seen.items():
        waiting = {normalize_request_id(rid) for rid in status.waiting_requests}
        assert waiting <= ids, f"{name}: ids do not line up with the gateway's: {waiting}"
        assert status.num_uncomputed_tokens_all_waiting_prefills >= BURST_PROMPT * len(waiting)
    served = {k: successes(prescient.engines)[k] - before[k] for k in before}
    assert sum(served.values()) == BURST and min(served.values()) > 0, served
    for engine in prescient.engines:
        final = wait_until(lambda e=engine: _idle(prescient.status(e)), 10,
                           f"{engine.name}'s idle status")
        assert final.num_total_gpu_tokens > 0
    # a busy status carries a step timing: the predictor's profiling sample
    sampled = [s for s in seen.values() if s.profiling_id >= 0]
    assert sampled and all(s.step_duration > 0 for s in sampled)


def _idle(status: InstanceStatus | None) -> InstanceStatus | None:
    return status if status is not None and status.num_running_requests == 0 and (
        not status.waiting_requests) else None


def _stream(gateway: Service, request_id: str, max_tokens: int,
            on_text: object = None) -> tuple[set[str], str, object]:
    """Stream a completion; `on_text()` is called once, after the first text arrives."""
    with client_of(gateway) as client:
        stream = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=max_tokens, stream=True,
            extra_body={"ignore_eos": True}, extra_headers={"x-request-id": request_id},
            stream_options={"include_usage": True, "continuous_usage_stats": True})
        ids, text, usage, called = set(), "", None, False
        for chunk in stream:
            ids.add(chunk.id)
            if chunk.choices:
                text += chunk.choices[0].text
            usage = chunk.usage or usage
            if text and not called and on_text is not None:
                called = True
                on_text()  # type: ignore[operator]
    return ids, text, usage


def test_a_cached_prefix_is_routed_to_the_engine_holding_it(prescient: Prescient) -> None:
    """Cache-aware full mode on vLLM's own KV events: the scheduler learns each engine's
    publisher from `GET /kv_event_sources`; a long prefix cached on one engine draws every
    request sharing it there, as vLLM's prefix-cache hit counter shows. The holder is the
    engine that an idle tie would *not* pick, so load alone cannot explain it."""
    rng_prefix = [11 + (i * 17) % 1300 for i in range(BLOCK_SIZE * 24)]  # 768 tokens
    with client_of(prescient.cache) as client:
        before = successes(prescient.engines)
        client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=1)
        after = successes(prescient.engines)
        favourite = next(e for e in prescient.engines if after[e.name] > before[e.name])
        holder = next(e for e in prescient.engines if e is not favourite)
        # cache the prefix on the holder directly, behind Prescient's back
        status, answer = http_post(holder.url + "/v1/completions", json.dumps(
            {"model": MODEL, "prompt": [*rng_prefix, 1], "max_tokens": 1}).encode())
        assert status == 200, answer
        time.sleep(1.0)  # its BlockStored events reach the scheduler's index
        hits = {e.name: metric(e, "vllm:prefix_cache_hits_total") for e in prescient.engines}
        before = successes(prescient.engines)
        for i in range(4):
            client.completions.create(model=MODEL, prompt=[*rng_prefix, 100 + i, 200 + i],
                                      max_tokens=2)
        after = successes(prescient.engines)
    served = {e.name: after[e.name] - before[e.name] for e in prescient.engines}
    assert served == {holder.name: 4, favourite.name: 0}, served
    gained = metric(holder, "vllm:prefix_cache_hits_total") - hits[holder.name]
    assert gained >= 4 * len(rng_prefix), f"{holder.name} hit only {gained} tokens"
    assert metric(favourite, "vllm:prefix_cache_hits_total") == hits[favourite.name]


def test_a_running_stream_migrates_between_the_vllm_engines(prescient: Prescient) -> None:
    """Token replay: the gateway aborts the request on its engine and resumes it on the other;
    the client's stream stays whole (one id, every token)."""
    moved: dict[str, object] = {}
    generated = {e.name: metric(e, "vllm:generation_tokens_total") for e in prescient.engines}

    def migrate() -> None:
        status, body = http_post(prescient.full.url + "/admin/migrate",
                                 json.dumps({"request_id": "mig-1"}).encode(),
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        moved.update(status=status, **body)

    with prescient.stack.diagnosis():
        ids, text, usage = _stream(prescient.full, "mig-1", 1500, migrate)
    assert moved.get("status") == 200, moved
    assert len(ids) == 1 and text
    assert usage is not None and usage.completion_tokens == 1500  # type: ignore[attr-defined]
    assert metric(prescient.full, "prescient_gateway_migrations_total") >= 1
    source = next(e for e in prescient.engines if e.address == moved["from"])
    target = next(e for e in prescient.engines if e is not source)
    # the source stopped generating at the cut (the disconnect aborted its copy), and the
    # destination generated the rest: together about the 1500 tokens, not 1500 more
    by_source = metric(source, "vllm:generation_tokens_total") - generated[source.name]
    by_target = metric(target, "vllm:generation_tokens_total") - generated[target.name]
    assert 0 < by_source < 1500 and 0 < by_target <= 1500, (by_source, by_target)
    assert by_source + by_target <= 1500 + 64, (by_source, by_target)


def test_killing_a_vllm_engine_mid_stream_loses_no_request(prescient: Prescient) -> None:
    """Runs last: it kills an engine (the `vllm_pair` fixture restarts it for later tests).
    Every stream has text before the kill, and the engine killed is the one running the most
    of them, so its streams are cut mid-answer and must be replayed."""
    streaming = threading.Barrier(6, timeout=60)
    length = 1200  # tokens: long enough that streams still run when the last shows text
    killed: list[VllmEngine] = []
    seen: list[object] = []  # (running requests by engine, the victim): for a failure

    def running(engine: VllmEngine) -> int:
        # from the plugin's step trace: a busy engine's /metrics can keep a client waiting
        # for seconds on this 2-core machine
        step = engine.last_step()
        return 0 if step is None else step["running"] + step["waiting"]

    # work an earlier test left on an engine would make that engine look the busiest
    wait_until(lambda: not any(running(e) for e in prescient.engines), 60,
               "both vLLM engines idle", prescient.stack)

    def kill_the_busiest() -> None:
        busy = {e.name: running(e) for e in prescient.engines}
        victim = max(prescient.engines, key=lambda e: busy[e.name])
        seen.append((busy, victim.name))
        assert busy[victim.name] > 0, busy
        victim.kill()
        killed.append(victim)

    def one(i: int) -> str:
        def on_text() -> None:
            streaming.wait()  # all six streams are running
            if i == 0:
                kill_the_busiest()
        try:
            ids, _text, usage = _stream(prescient.lite, f"kill-{i}", length, on_text)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        done = usage is not None and usage.completion_tokens == length  # type: ignore[attr-defined]
        return "ok" if done and len(ids) == 1 else f"incomplete: {usage}"

    with prescient.stack.diagnosis(), ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(one, range(6)))
    assert outcomes == ["ok"] * 6, outcomes
    assert killed and not killed[0].running
    assert metric(prescient.lite, "prescient_gateway_replays_total") >= 1, (
        f"no stream was cut: {seen}\n{prescient.lite.log.read_text()[-2000:]}")
