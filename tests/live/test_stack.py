"""The whole stack as real processes, driven by the official `openai` client.

Three `prescient sim-engine`s (each with its built-in llumlet), scheduler services and gateways,
in full mode (CMS on Redis) and lite mode (static endpoints), with the scheduler as a service
(`--scheduler-endpoints`) or embedded in the gateway. One module-scoped stack of three engines
serves every mode's gateway at once; the fault tests (an engine killed mid-run, a Redis outage)
build their own on a private `redis-server`, never touching the shared one.

No timing assertions: every wait is for a condition, with a deadline. A failure carries the tail
of every child's log (`Stack.diagnosis`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from prescient.cms.store import METADATA_KEY_PREFIX, STATUS_KEY_PREFIX
from prescient.gateway.balancer import FAILED_COOLDOWN_S

from .harness import RedisTarget, private_redis, shared_redis
from .stack import (
    MODEL,
    Service,
    Stack,
    cms_flags,
    engine_args,
    gateway_args,
    health,
    http_post,
    metric,
    scheduler_args,
    successes,
    wait_until,
)

MAX_BODY_BYTES = 16384
GATEWAY_FLAGS = ("--max-body-bytes", str(MAX_BODY_BYTES))
CLIENT_TIMEOUT_S = 30.0
PROMPT = "The quick brown fox jumps over the lazy dog"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
MODES = ("full-remote", "full-embedded", "lite-remote", "lite-embedded")


def client_of(gateway: Service) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0,
                  timeout=CLIENT_TIMEOUT_S)


class Cluster:
    """Three engines on the CMS of `redis`, and one gateway per mode in `MODES`."""

    def __init__(self, stack: Stack, redis: RedisTarget) -> None:
        self.stack = stack
        self.redis = redis
        self.engines = stack.start([(f"engine-{i}", engine_args(redis)) for i in range(3)])
        endpoints = ["--llm-backend-endpoints", ",".join(e.address for e in self.engines)]
        full_sched, lite_sched = stack.start([
            ("scheduler-full", scheduler_args(*cms_flags(redis))),
            ("scheduler-lite", scheduler_args("--enable-full-mode-scheduling=false",
                                              "--llm-backend-discovery", "endpoints",
                                              *endpoints))])
        self.schedulers = {"full": full_sched, "lite": lite_sched}
        gateways = stack.start([
            ("gateway-full-remote", gateway_args(
                self.engines, "--scheduler-endpoints", full_sched.address, *GATEWAY_FLAGS)),
            ("gateway-full-embedded", gateway_args(
                self.engines, *cms_flags(redis), *GATEWAY_FLAGS)),
            ("gateway-lite-remote", gateway_args(
                self.engines, "--enable-full-mode-scheduling=false", "--scheduler-endpoints",
                lite_sched.address, *GATEWAY_FLAGS)),
            ("gateway-lite-embedded", gateway_args(
                self.engines, "--enable-full-mode-scheduling=false", *GATEWAY_FLAGS)),
        ])
        self.gateways = dict(zip(MODES, gateways, strict=True))
        # full mode places requests only once the scheduler has read every llumlet's keys
        wait_until(lambda: health(full_sched).get("instances") == 3, 15,
                   "scheduler-full to see 3 instances in the CMS", stack)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    stack = Stack(tmp_path_factory.mktemp("stack-logs"))
    try:
        with shared_redis() as redis, stack.diagnosis():
            yield Cluster(stack, redis)
    finally:
        stack.close()


# ---- the OpenAI API through every mode -----------------------------------------------------------


def prompt_tokens(engine: Service, **body: object) -> int:
    """The engine's own count of a prompt (vLLM's /tokenize)."""
    status, answer = http_post(engine.url + "/tokenize",
                               json.dumps({"model": MODEL, **body}).encode())
    assert status == 200, answer
    return int(answer["count"])


def check_usage(usage: object, prompt: int, max_tokens: int, what: str) -> None:
    assert usage is not None, f"{what}: no usage"
    got = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)  # type: ignore[attr-defined]
    assert got == (prompt, max_tokens, prompt + max_tokens), f"{what}: usage {got}"


@pytest.mark.parametrize("mode", MODES)
def test_openai_client_gets_completions_and_chats_with_right_usage(cluster: Cluster,
                                                                   mode: str) -> None:
    gateway = cluster.gateways[mode]
    engine = cluster.engines[0]
    text_len = prompt_tokens(engine, prompt=PROMPT)
    chat_len = prompt_tokens(engine, messages=MESSAGES)
    with cluster.stack.diagnosis(), client_of(gateway) as client:
        assert [m.id for m in client.models.list()] == [MODEL]
        done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7)
        assert done.choices[0].finish_reason == "length" and done.choices[0].text
        check_usage(done.usage, text_len, 7, f"{mode} completion")

        chat = client.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                              max_tokens=5)
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content
        check_usage(chat.usage, chat_len, 5, f"{mode} chat")

        chunks = list(client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=6, stream=True,
            stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        check_usage(chunks[-1].usage, text_len, 6, f"{mode} streamed completion")

        deltas = list(client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}))
        assert "".join(d.choices[0].delta.content or "" for d in deltas if d.choices)
        check_usage(deltas[-1].usage, chat_len, 4, f"{mode} streamed chat")


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_requests_spread_over_the_engines(cluster: Cluster, mode: str) -> None:
    gateway = cluster.gateways[mode]
    scheduler = cluster.schedulers[mode.split("-")[0]] if mode.endswith("remote") else None
    scheduled = metric(scheduler, "prescient_scheduler_schedule_total", outcome="ok") if (
        scheduler) else 0.0
    before = successes(cluster.engines)
    with cluster.stack.diagnosis(), client_of(gateway) as client:
        def one(i: int) -> int:
            out = client.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=16,
                                            stream=i % 2 == 1)
            if i % 2 == 1:
                return sum(1 for c in out if c.choices)  # type: ignore[union-attr]
            return out.usage.completion_tokens  # type: ignore[union-attr]

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(24)))
        assert all(n > 0 for n in results)
        after = successes(cluster.engines)
        served = {name: after[name] - before[name] for name in after}
        assert sum(served.values()) == 24, served
        assert sum(1 for n in served.values() if n > 0) >= 2, f"{mode}: all on one engine {served}"
        # the scheduler placed them all: no request fell back to the gateway's round robin
        assert metric(gateway, "prescient_gateway_fallbacks_total") == 0
        if scheduler is not None:
            placed = metric(scheduler, "prescient_scheduler_schedule_total", outcome="ok")
            assert placed - scheduled == 24, f"{scheduler.name} placed {placed - scheduled}"


# ---- bad input ---------------------------------------------------------------------------------


def assert_openai_error(status: int, body: dict[str, object], expected: int, what: str) -> None:
    assert status == expected, f"{what}: HTTP {status} {body}"
    error = body.get("error")
    assert isinstance(error, dict), f"{what}: not an OpenAI error body: {body}"
    assert {"message", "type", "param", "code"} <= set(error), f"{what}: {error}"
    assert isinstance(error["message"], str) and error["message"], f"{what}: {error}"


@pytest.mark.parametrize("mode", ["full-remote", "lite-embedded"])
def test_bad_requests_get_4xx_with_an_openai_error_body(cluster: Cluster, mode: str) -> None:
    gateway = cluster.gateways[mode]
    url = gateway.url + "/v1/completions"
    with cluster.stack.diagnosis():
        status, body = http_post(url, b'{"model": "prescient-sim", "prompt": ')
        assert_openai_error(status, body, 400, "malformed JSON")
        status, body = http_post(url, json.dumps({"model": "nope", "prompt": "x"}).encode())
        assert_openai_error(status, body, 404, "unknown model")
        big = json.dumps({"model": MODEL, "prompt": "x" * (MAX_BODY_BYTES + 1)}).encode()
        status, body = http_post(url, big)
        assert_openai_error(status, body, 413, "oversized body")
        status, body = http_post(gateway.url + "/v1/chat/completions", json.dumps(
            {"model": MODEL, "messages": MESSAGES, "max_tokens": 0}).encode())
        assert_openai_error(status, body, 400, "max_tokens 0")

        with client_of(gateway) as client:  # and as the official client sees them
            with pytest.raises(openai.NotFoundError) as e404:
                client.completions.create(model="nope", prompt="x", max_tokens=1)
            with pytest.raises(openai.BadRequestError) as e400:
                client.completions.create(model=MODEL, prompt="x", max_tokens=0)
            with pytest.raises(openai.APIStatusError) as e413:
                client.completions.create(model=MODEL, prompt="x" * (MAX_BODY_BYTES + 1))
        assert e404.value.status_code == 404 and e400.value.status_code == 400
        assert e413.value.status_code == 413
        assert e400.value.param == "max_tokens" or "max_tokens" in e400.value.message


# ---- faults: each on its own stack and private redis-server --------------------------------------


class FaultCluster:
    """Three engines on a private Redis, a full-mode scheduler service, and two full-mode
    gateways: one calling the service, one with the scheduler embedded."""

    def __init__(self, stack: Stack, redis: RedisTarget, *, engines: int = 3,
                 time_scale: float = 20.0, ttl_s: float = 3.0, heartbeat_s: float = 1.0) -> None:
        self.stack = stack
        self.redis = redis
        args = engine_args(redis, time_scale=time_scale, ttl_s=ttl_s, heartbeat_s=heartbeat_s)
        self.engines = stack.start([(f"engine-{i}", args) for i in range(engines)])
        (self.scheduler,) = stack.start([("scheduler", scheduler_args(*cms_flags(redis)))])
        self.gateways = stack.start([
            ("gateway-remote", gateway_args(self.engines, "--scheduler-endpoints",
                                            self.scheduler.address)),
            ("gateway-embedded", gateway_args(self.engines, *cms_flags(redis))),
        ])
        self.wait_for_instances(engines)

    def wait_for_instances(self, n: int, timeout_s: float = 15.0) -> None:
        def ready() -> bool:
            answer = health(self.scheduler)
            return answer["http_status"] == 200 and answer.get("instances") == n

        wait_until(ready, timeout_s, f"scheduler to be ready with {n} instances", self.stack)

    def keys_of(self, engine: Service) -> list[str]:
        iid = f"sim-{engine.port}"
        return [key for key in (METADATA_KEY_PREFIX + iid, STATUS_KEY_PREFIX + iid)
                if self.redis.cli("EXISTS", key) == "1"]


@pytest.fixture
def faults(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[FaultCluster, Any]]:
    """A `FaultCluster` on a private redis-server; indirect parameters are its keywords."""
    options = getattr(request, "param", {})
    stack = Stack(tmp_path)
    try:
        with private_redis() as redis, stack.diagnosis():
            yield FaultCluster(stack, redis.target, **options), redis
    finally:
        stack.close()


def fallbacks(gateway: Service) -> float:
    return metric(gateway, "prescient_gateway_fallbacks_total")


def busiest(engines: list[Service]) -> tuple[Service, list[Service]]:
    """The engine running the most requests (it must run some), and the others."""
    running = [metric(e, "vllm:num_requests_running") for e in engines]
    most = max(range(len(engines)), key=running.__getitem__)
    assert running[most] > 0, f"no engine is running a request to kill it under: {running}"
    return engines[most], engines[:most] + engines[most + 1:]


def complete_all(gateways: list[Service], n: int, what: str) -> None:
    """`n` requests through each gateway, streamed and not; every one must succeed."""
    for gateway in gateways:
        with client_of(gateway) as client:
            for i in range(n):
                out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3,
                                                stream=i % 2 == 1)
                if i % 2:
                    assert any(c.choices for c in out), f"{what}: {gateway.name} empty stream"  # type: ignore[union-attr]
                else:
                    assert out.usage.completion_tokens == 3, f"{what}: {gateway.name}"  # type: ignore[union-attr]


def test_a_redis_outage_falls_back_and_full_mode_recovers(
        faults: tuple[FaultCluster, Any]) -> None:
    cluster, redis = faults
    gateways = cluster.gateways
    with cluster.stack.diagnosis():
        complete_all(gateways, 2, "before the outage")
        assert [fallbacks(g) for g in gateways] == [0, 0]

        redis.stop()
        wait_until(lambda: health(cluster.scheduler).get("cms_available") is False, 10,
                   "the scheduler to notice the CMS is gone", cluster.stack)
        complete_all(gateways, 4, "during the outage")  # the gateways keep serving...
        during = [fallbacks(g) for g in gateways]
        assert during[0] == 4, f"gateway-remote fell back {during[0]} times, not 4"
        # ...the embedded scheduler notices at its next poll, then falls back the same way
        assert during[1] >= 1, "gateway-embedded never fell back"

        redis.start()  # empty: every key is gone
        cluster.wait_for_instances(3)  # the llumlets re-registered, the scheduler read them
        # an idle engine's status comes back at its next pull, up to a heartbeat after its
        # metadata
        wait_until(lambda: all(len(cluster.keys_of(e)) == 2 for e in cluster.engines), 10,
                   "every engine's metadata and status keys to be back", cluster.stack)
        # the embedded scheduler polls on its own: wait until it places requests again
        embedded = gateways[1]

        def placed_by_embedded() -> bool:
            before = fallbacks(embedded)
            complete_all([embedded], 1, "recovering")
            return fallbacks(embedded) == before

        wait_until(placed_by_embedded, 15, "gateway-embedded to leave fallback", cluster.stack)
        after = [fallbacks(g) for g in gateways]
        complete_all(gateways, 4, "after the outage")
        assert [fallbacks(g) for g in gateways] == after, "still falling back after recovery"


# idle llumlets write nothing for 20 s: the emptied CMS stays empty for the whole test
@pytest.mark.parametrize("faults", [{"engines": 2, "ttl_s": 60.0, "heartbeat_s": 20.0}],
                         indirect=True)
def test_an_emptied_cms_falls_back_instead_of_failing(faults: tuple[FaultCluster, Any]) -> None:
    cluster, _ = faults
    with cluster.stack.diagnosis():
        complete_all(cluster.gateways, 2, "before the flush")
        assert [fallbacks(g) for g in cluster.gateways] == [0, 0]
        cluster.redis.cli("FLUSHDB")  # what a Redis restarted without persistence holds
        cluster.wait_for_instances(0)
        for gateway in cluster.gateways:  # the embedded scheduler polls on its own

            def falls_back(gateway: Service = gateway) -> bool:
                before = fallbacks(gateway)
                complete_all([gateway], 1, "CMS emptied")  # served, not "no instance" 503
                return fallbacks(gateway) > before

            wait_until(falls_back, 10, f"{gateway.name} to fall back on the empty CMS",
                       cluster.stack)
        complete_all(cluster.gateways, 4, "CMS still empty")


# real time: a request takes about a second, so several are running when the engine dies
@pytest.mark.parametrize("faults", [{"time_scale": 1.0}], indirect=True)
def test_killing_an_engine_mid_run_reroutes_and_its_keys_expire(
        faults: tuple[FaultCluster, Any]) -> None:
    cluster, _ = faults
    gateways = cluster.gateways

    def one(i: int) -> str:
        """"ok", or the error the client got (a hang would be a timeout error)."""
        with client_of(gateways[i % 2]) as client:
            try:
                if i % 3 == 0:
                    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100)
                    usage = out.usage
                else:
                    usage = list(client.completions.create(
                        model=MODEL, prompt=PROMPT, max_tokens=100, stream=True,
                        stream_options={"include_usage": True}))[-1].usage
            except openai.APIError as e:
                return f"{type(e).__name__}: {e}"
        assert usage is not None and usage.completion_tokens == 100, f"request {i}: {usage}"
        return "ok"

    with cluster.stack.diagnosis():
        killed_after = 6
        with ThreadPoolExecutor(30) as pool:
            futures = []
            for i in range(30):
                if i == killed_after:
                    victim, survivors = busiest(cluster.engines)
                    victim.kill()
                futures.append(pool.submit(one, i))
                time.sleep(0.05)
            outcomes = {i: f.result() for i, f in enumerate(futures)}  # every one returns
        failed = {i: o for i, o in outcomes.items() if o != "ok"}
        # requests sent after the kill were never started on the victim: all rerouted
        assert not {i for i in failed if i >= killed_after}, failed
        # a non-streaming request is retried elsewhere, a stream cut short is replayed there:
        # nothing is lost
        assert not failed, failed
        errors = [metric(g, "prescient_gateway_errors_total") for g in gateways]
        assert sum(errors) > 0, "no request hit the killed engine: the test proves nothing"
        burst_end = time.monotonic()

        # the victim's llumlet died with it: its keys expire after --cms-ttl-s
        wait_until(lambda: not cluster.keys_of(victim), 10, f"{victim.name}'s CMS keys to expire",
                   cluster.stack)
        assert all(len(cluster.keys_of(e)) == 2 for e in survivors)
        cluster.wait_for_instances(2)

        # past the gateways' own avoid-list cooldown, only the scheduler keeps requests off it
        time.sleep(max(0.0, burst_end + FAILED_COOLDOWN_S + 0.1 - time.monotonic()))
        before = successes(survivors)
        complete_all(gateways, 6, "after the kill")
        assert [metric(g, "prescient_gateway_errors_total") for g in gateways] == errors, (
            "a request went to the dead engine after its keys expired")
        served = successes(survivors)
        assert sum(served.values()) - sum(before.values()) == 12
