"""The CMS on a real Redis: upstream's keys and records, TTLs, SCAN, the reader and outages."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from prescient.cms import CmsUnavailableError
from prescient.cms.proto import cms_pb2
from prescient.cms.reader import CmsReader
from prescient.cms.redis_store import RedisStore
from prescient.cms.store import CmsStoreError
from prescient.config.scheduler import SchedulerSettings
from prescient.errors import ConfigError
from prescient.llumlet.agent import Llumlet
from prescient.model import InferType, InstanceMetadata, InstanceStatus, Request
from prescient.policy.dispatcher import Dispatcher
from prescient.policy.registry import make_dispatcher

from .harness import RedisTarget, private_redis, shared_redis


def store_for(target: RedisTarget, **kwargs: float) -> RedisStore:
    return RedisStore(target.host, target.port, db=target.db, **kwargs)  # type: ignore[arg-type]


def status(iid: str, **fields: object) -> InstanceStatus:
    fields.setdefault("update_id", 1)
    return InstanceStatus(instance_id=iid, timestamp_ms=int(time.time() * 1000),
                          **fields)  # type: ignore[arg-type]


async def busy_engine(llumlet: Llumlet) -> None:
    """An engine under load: a new status every 20 ms."""
    for update_id in range(1, 1_000_000):
        llumlet.push(status(llumlet.instance_id, update_id=update_id))
        await asyncio.sleep(0.02)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


def test_records_round_trip_under_upstreams_keys() -> None:
    async def main(target: RedisTarget) -> None:
        store = store_for(target)
        metadata = InstanceMetadata(instance_id="a", instance_type=InferType.PREFILL,
                                    ip="10.0.0.1", api_server_port=8000)
        sent = status("a", num_running_requests=4, waiting_requests=("r1",))
        await store.put_metadata(metadata, 30.0)
        await store.put_status(sent, 30.0)
        assert await store.read_metadata() == {"a": metadata}
        assert await store.read_statuses(["a", "gone"]) == {"a": sent, "gone": None}
        assert sorted(target.cli("KEYS", "llumnix:*").split()) == [
            "llumnix:instance_metadata:a", "llumnix:instance_status:a"]
        assert 0 < int(target.cli("PTTL", "llumnix:instance_status:a")) <= 30_000
        await store.delete_instance("a")
        assert target.cli("KEYS", "llumnix:*") == ""
        await store.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_records_interoperate_with_a_plain_protobuf_client() -> None:
    """What an upstream llumlet writes, we read; what we write, upstream's reader parses."""
    async def main(target: RedisTarget) -> None:
        store = store_for(target)
        raw = aioredis.Redis(host=target.host, port=target.port, db=target.db)
        upstream = cms_pb2.InstanceStatus(instance_id="up", schedulable=True, update_id=3,
                                          num_waiting_requests=2, profiling_id=-1)
        await raw.set("llumnix:instance_status:up", upstream.SerializeToString(), ex=30)
        assert await store.read_statuses(["up"]) == {"up": InstanceStatus(
            instance_id="up", update_id=3, num_waiting_requests=2)}
        await store.put_status(status("ours", num_running_requests=5), None)
        ours = cms_pb2.InstanceStatus.FromString(await raw.get("llumnix:instance_status:ours"))
        assert (ours.instance_id, ours.num_running_requests, ours.schedulable) == ("ours", 5, True)
        assert await raw.pttl("llumnix:instance_status:ours") == -1  # ttl None: no expiry
        await raw.aclose()
        await store.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_records_expire_after_their_ttl() -> None:
    async def main(target: RedisTarget) -> None:
        store = store_for(target)
        await store.put_metadata(InstanceMetadata(instance_id="a"), 0.3)
        await store.put_status(status("a"), 0.3)
        await store.put_metadata(InstanceMetadata(instance_id="kept"), 30.0)

        async def expired() -> bool:
            return (list(await store.read_metadata()) == ["kept"]
                    and await store.read_statuses(["a"]) == {"a": None})

        await eventually(expired)
        await store.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_scan_finds_every_instance_and_nothing_else() -> None:
    async def main(target: RedisTarget) -> None:
        store = store_for(target)
        ids = [f"inst-{i:03d}" for i in range(300)]
        await asyncio.gather(*(store.put_metadata(InstanceMetadata(instance_id=i), 30.0)
                               for i in ids))
        target.cli("SET", "llumnix:discovery:pod-1", "x")
        target.cli("SET", "other:llumnix:instance_metadata:x", "x")
        found = await store.read_metadata()
        assert sorted(found) == ids
        assert all(found[i].instance_id == i for i in ids)
        await store.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_a_garbage_record_is_skipped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def main(target: RedisTarget) -> None:
        store = store_for(target)
        await store.put_metadata(InstanceMetadata(instance_id="good"), 30.0)
        await store.put_status(status("good"), 30.0)
        target.cli("SET", "llumnix:instance_metadata:bad", "not a protobuf")
        target.cli("SET", "llumnix:instance_status:good2", "\xff\xff garbage")
        for _ in range(2):
            assert list(await store.read_metadata()) == ["good"]
            statuses = await store.read_statuses(["good", "good2"])
            assert list(statuses) == ["good"]  # skipped: neither a status nor a vanished key
        await store.close()

    with shared_redis() as target, caplog.at_level(logging.WARNING):
        asyncio.run(main(target))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any("llumnix:instance_metadata:bad" in w for w in warnings)
    assert any("llumnix:instance_status:good2" in w for w in warnings)


def test_from_url_reads_host_port_and_db() -> None:
    async def main(target: RedisTarget) -> None:
        store = RedisStore.from_url(target.url)
        assert store.address == f"{target.host}:{target.port}/{target.db}"
        await store.put_metadata(InstanceMetadata(instance_id="u"), 30.0)
        assert target.cli("EXISTS", "llumnix:instance_metadata:u") == "1"
        await store.close()

    with shared_redis() as target:
        asyncio.run(main(target))
    for bad in ("http://h:1/0", "redis://h:1/x", "redis:///0", "redis://h:99999/0"):
        with pytest.raises(ConfigError, match="CMS Redis URL"):
            RedisStore.from_url(bad)


def test_an_unreachable_redis_is_a_store_error() -> None:
    async def main() -> None:
        store = RedisStore("127.0.0.1", 1, timeout_s=0.5, retry_times=0)
        with pytest.raises(CmsStoreError, match=r"CMS Redis 127.0.0.1:1/0: SCAN failed"):
            await store.read_metadata()
        with pytest.raises(CmsStoreError, match="SET failed"):
            await store.put_status(status("a"), 1.0)
        await store.close()

    asyncio.run(main())


def full_mode_dispatcher() -> Dispatcher:
    return make_dispatcher("load-balance", SchedulerSettings(), random.Random(0))


def test_the_reader_feeds_a_real_dispatcher() -> None:
    async def main(target: RedisTarget) -> None:
        store = store_for(target)
        for iid, load in (("a", 3000), ("b", 10), ("c", 3000)):
            await store.put_metadata(InstanceMetadata(instance_id=iid), 30.0)
            await store.put_status(status(
                iid, num_uncomputed_tokens_all_waiting_prefills=load), 30.0)
        await store.put_metadata(InstanceMetadata(instance_id="no-status"), 30.0)
        dispatcher = full_mode_dispatcher()
        reader = CmsReader(store, dispatcher, status_interval_s=0.05, metadata_interval_s=10.0)
        assert await reader.poll_metadata()
        assert reader.instance_ids == ("a", "b", "c", "no-status")
        assert await reader.poll_statuses()
        decision = dispatcher.schedule(Request(request_id="r1", prompt_len=100), time.time())
        assert [p.instance_id for p in decision.placements] == ["b"]
        await store.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_an_outage_marks_the_cms_unavailable_until_the_llumlet_re_registers() -> None:
    async def main() -> None:
        with private_redis() as server:
            target = server.target
            store = store_for(target, timeout_s=0.5)
            llumlet = Llumlet(store_for(target, timeout_s=0.5), InstanceMetadata(instance_id="a"),
                              push_interval_s=0.05, metadata_interval_s=30.0, ttl_s=60.0,
                              engine_timeout_s=30.0)
            engine = asyncio.create_task(busy_engine(llumlet))
            agent = asyncio.create_task(llumlet.run())
            dispatcher = full_mode_dispatcher()
            reader = CmsReader(store, dispatcher, status_interval_s=0.05, metadata_interval_s=0.1)
            polls = asyncio.create_task(reader.run())
            request = Request(request_id="r1", prompt_len=10)

            async def placed() -> bool:
                try:
                    decision = dispatcher.schedule(request, time.time())
                except CmsUnavailableError:
                    return False
                dispatcher.release(request.request_id, time.time())
                return [p.instance_id for p in decision.placements] == ["a"]

            async def unavailable() -> bool:
                try:
                    dispatcher.schedule(request, time.time())
                except CmsUnavailableError as exc:
                    return "CMS Redis" in str(exc)
                return False

            await eventually(placed)
            server.stop()
            await eventually(unavailable)
            server.start()  # empty: both keys are gone until the llumlet writes them again
            await eventually(placed)  # long before the 30 s metadata heartbeat
            assert target.cli("EXISTS", "llumnix:instance_metadata:a") == "1"
            polls.cancel()
            engine.cancel()
            await llumlet.stop()
            await asyncio.wait([agent, polls, engine])
            await store.close()
            await llumlet.store.close()

    asyncio.run(main())
