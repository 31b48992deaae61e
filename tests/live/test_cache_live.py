"""Cache-aware scheduling in the live stack, as real processes on the real Redis.

Two `prescient sim-engine`s publish their prefix caches as vLLM does (`--kv-events-config`,
ZMQ on `tcp://*:<port>`, so the scheduler must resolve the wildcard to the instance's ip), a
full-mode scheduler service with `--cache-index kv-events` learns their publishers from `GET
/kv_event_sources` when their llumlets register, and a gateway asks it. Proof comes from the
engines' own counters (`vllm:prefix_cache_hits_total`, `vllm:request_success_total`), never
from the scheduler's word: a long shared prefix sent again and again lands where it is cached,
while a round-robin gateway spreads it; history published before the scheduler subscribed
arrives by replay; an engine killed and started again is subscribed to again.

The Mooncake backend: a scheduler core asking a real HTTP metadata service before each
dispatch, through the service's outage (down window: no queries, load decides) and back.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

pytest.importorskip("zmq")

from prescient.cache.hashing import kvs_keys
from prescient.cms.store import MemoryStore
from prescient.config.scheduler import load_scheduler_settings
from prescient.model import InstanceMetadata, InstanceStatus
from prescient.scheduler.core import SchedulerCore
from prescient.scheduler.wire import ScheduleRequest

from .harness import RedisTarget, child, free_port, shared_redis
from .stack import (
    MODEL,
    Service,
    Stack,
    cms_flags,
    engine_args,
    gateway_args,
    http_post,
    metric,
    scheduler_args,
    wait_until,
)
from .test_kv_index_mooncake import Service as MetadataService
from .test_kv_index_mooncake import serving

PREFIX_TOKENS = 512  # 32 blocks of 16
SEED = "0"  # the engines' PYTHONHASHSEED and the scheduler's --prefix-caching-hash-seed


def kv_engine_args(redis: RedisTarget, pub: int, replay: int):  # type: ignore[no-untyped-def]
    config = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                         "endpoint": f"tcp://*:{pub}", "replay_endpoint": f"tcp://*:{replay}",
                         "topic": "kv"})
    base = engine_args(redis)
    return lambda port: [*base(port), "--block-size", "16", "--kv-events-config", config]


class CacheCluster:
    """Two KV-event engines, a kv-events scheduler, a cache-aware and a round-robin gateway."""

    def __init__(self, stack: Stack, redis: RedisTarget) -> None:
        self.stack, self.redis = stack, redis
        self.zmq_ports = {name: (free_port(), free_port()) for name in ("engine-a", "engine-b")}
        self.engines = dict(zip(self.zmq_ports, stack.start([
            (name, kv_engine_args(redis, *ports)) for name, ports in self.zmq_ports.items()]),
            strict=True))
        [self.scheduler] = stack.start([("scheduler", scheduler_args(
            *cms_flags(redis), "--enable-cache-aware-scheduling", "--cache-index", "kv-events",
            "--cache-aware-scheduling-min-tokens", "64", "--prefix-caching-hash-seed", SEED))])
        engines = list(self.engines.values())
        self.cache_gw, self.rr_gw = stack.start([
            ("gateway-cache", gateway_args(engines, "--scheduler-endpoints",
                                           self.scheduler.address)),
            ("gateway-rr", gateway_args(engines, "--enable-full-mode-scheduling=false",
                                        "--scheduling-policy", "round-robin"))])
        wait_until(lambda: metric(self.scheduler,
                                  "prescient_scheduler_kv_events_subscriptions") == 2, 20,
                   "the scheduler to subscribe to both engines' KV events", stack)

    def restart(self, name: str, exits: ExitStack) -> Service:
        """SIGKILL an engine and start it again on the same ports (same instance id)."""
        old = self.engines[name]
        old.kill()
        log = old.log.with_name(f"{name}-restarted.log")
        proc = exits.enter_context(child(kv_engine_args(self.redis, *self.zmq_ports[name])(
            old.port), port=old.port, log=log))
        new = Service(f"{name}-restarted", old.port, log, proc)
        self.engines[name] = new
        self.stack.services[new.name] = new
        return new


@pytest.fixture(scope="module")
def cache_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CacheCluster]:
    old_seed = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = SEED  # the children inherit it, as vLLM engines must
    stack = Stack(tmp_path_factory.mktemp("cache-stack-logs"))
    try:
        with shared_redis() as redis, stack.diagnosis():
            yield CacheCluster(stack, redis)
    finally:
        stack.close()
        if old_seed is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = old_seed


def prefix(tag: int) -> list[int]:
    return [1000 + tag * 7919 + i for i in range(PREFIX_TOKENS)]


def complete(service: Service, ids: list[int], rid: str) -> None:
    status, answer = http_post(service.url + "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": ids, "max_tokens": 2}).encode(), timeout_s=30)
    assert status == 200, f"{service.name}: {answer}"


def counters(engines: dict[str, Service]) -> dict[str, tuple[float, float]]:
    """Per engine: (requests finished, prompt tokens served from its prefix cache)."""
    return {name: (metric(e, "vllm:request_success_total"),
                   metric(e, "vllm:prefix_cache_hits_total")) for name, e in engines.items()}


def instance_id(engine: Service) -> str:
    return f"sim-{engine.port}"


def indexed(cluster: CacheCluster, engine: Service, blocks: int) -> None:
    """Wait until the scheduler's index holds exactly `blocks` of `engine`'s blocks."""
    wait_until(lambda: metric(cluster.scheduler, "prescient_scheduler_kv_index_blocks",
                              instance_id=instance_id(engine)) == blocks, 15,
               f"the scheduler's index to hold {blocks} blocks of {engine.name}", cluster.stack)


def test_a_shared_prefix_lands_where_the_engine_cached_it(cache_cluster: CacheCluster) -> None:
    c = cache_cluster
    a, b = c.engines["engine-a"], c.engines["engine-b"]
    # each engine caches a prefix of its own, asked directly (the scheduler sees only events)
    complete(a, [*prefix(1), 5], "warm-a")
    complete(b, [*prefix(2), 5], "warm-b")
    indexed(c, a, PREFIX_TOKENS // 16)
    indexed(c, b, PREFIX_TOKENS // 16)
    before = counters(c.engines)
    n = 6
    for k in range(n):
        complete(c.cache_gw, [*prefix(1), 10 + k, 11 + k], f"pa{k}")
        complete(c.cache_gw, [*prefix(2), 10 + k, 11 + k], f"pb{k}")
    after = counters(c.engines)
    for name in ("engine-a", "engine-b"):
        done = after[name][0] - before[name][0]
        hits = after[name][1] - before[name][1]
        assert done == n, f"{name} finished {done} of its prefix's {n} requests"
        assert hits == n * PREFIX_TOKENS, f"{name} served {hits} prompt tokens from its cache"
    # the same traffic through round-robin: the prefix is spread and half of it misses
    complete(a, [*prefix(3), 5], "warm-a3")
    before = counters(c.engines)
    for k in range(n):
        complete(c.rr_gw, [*prefix(3), 20 + k, 21 + k], f"rr{k}")
    after = counters(c.engines)
    assert after["engine-b"][0] - before["engine-b"][0] >= n // 2 - 1
    hits = sum(after[e][1] - before[e][1] for e in after)
    assert hits < n * PREFIX_TOKENS, "round-robin cannot hit on every request"


def test_history_before_the_subscription_is_replayed_and_a_restarted_engine_is_resubscribed(
        cache_cluster: CacheCluster, tmp_path: Path) -> None:
    c = cache_cluster
    with ExitStack() as exits:
        a = c.restart("engine-a", exits)
        # published by the new process while the scheduler's connection is still down: the
        # scheduler gets it by replay once it reconnects
        complete(a, [*prefix(4), 5], "warm-restarted")
        # exactly the new process's blocks: the killed one's are forgotten, the new ones
        # arrived by replay after the reconnection
        indexed(c, a, PREFIX_TOKENS // 16)
        before = counters(c.engines)
        n = 4
        for k in range(n):
            complete(c.cache_gw, [*prefix(4), 30 + k, 31 + k], f"pr{k}")
        after = counters(c.engines)
        assert after["engine-a"][0] - before["engine-a"][0] == n
        assert after["engine-a"][1] - before["engine-a"][1] == n * PREFIX_TOKENS
        assert metric(c.scheduler, "prescient_scheduler_kv_events_subscriptions") == 2


# ---- Mooncake ---------------------------------------------------------------------------------


def test_mooncake_hits_steer_dispatch_and_a_down_service_falls_back_to_load() -> None:
    async def body(port: int, service: MetadataService) -> None:
        store = MemoryStore()
        for iid, ip, load in (("a", "10.0.0.1", 500), ("b", "10.0.0.2", 0)):
            await store.put_metadata(InstanceMetadata(
                instance_id=iid, ip="127.0.0.1", ip_kvs=ip, api_server_port=8000), None)
            await store.put_status(InstanceStatus(
                instance_id=iid, timestamp_ms=int(time.time() * 1000),
                update_id=1, num_total_gpu_tokens=100_000,
                num_uncomputed_tokens_all_waiting_prefills=load), None)
        settings = load_scheduler_settings([
            "--enable-cache-aware-scheduling", "--cache-index", "mooncake",
            "--cache-aware-scheduling-min-tokens", "0", "--kvs-chunk-size", "256",
            "--kvs-metadata-service-http-server-host", "127.0.0.1",
            "--kvs-metadata-service-http-server-port", str(port), "--kvs-retry-times", "2",
            "--kvs-retry-interval-ms", "10", "--kvs-metadata-service-down-duration-s", "1",
            ], {})
        core = SchedulerCore(settings, store=store)
        await core.start()
        tokens = list(range(2048))
        for key in kvs_keys(tokens, 256):  # "a" (the loaded one) holds the whole prompt
            service.holders[key] = ["10.0.0.1:12345"]

        async def place(rid: str) -> str:
            [inst] = await core.schedule(ScheduleRequest(
                id=rid, prompt_num_tokens=len(tokens), prompt_token_ids=tokens))
            await core.release(ScheduleRequest(id=rid))
            return inst.id

        try:
            assert await place("hit") == "a"  # 2048 cached beats 500 queued
            asked = len(service.queries)
            service.failure = "http-500"
            assert await place("down") == "b"  # two failed attempts, then no hits: load
            assert len(service.queries) == asked + 2
            assert await place("in-window") == "b"  # down: not asked at all
            assert len(service.queries) == asked + 2
            service.failure = None
            await asyncio.sleep(1.1)  # the down window ends
            assert await place("back") == "a"
        finally:
            await core.close()

    async def main() -> None:
        service = MetadataService()
        await serving(service, lambda port: body(port, service))

    asyncio.run(main())
