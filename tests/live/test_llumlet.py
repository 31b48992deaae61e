"""The llumlet against a MemoryStore and a real Redis: coalescing, heartbeats, silence, outages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import pytest

from prescient.cms.redis_store import RedisStore
from prescient.cms.store import CmsStore, MemoryStore
from prescient.errors import ConfigError
from prescient.llumlet import Llumlet, SnapshotSource
from prescient.model import InstanceMetadata, InstanceStatus

from .harness import RedisTarget, private_redis, shared_redis

META = InstanceMetadata(instance_id="inst-a", ip="10.0.0.1", api_server_port=8000)
FAST = {"push_interval_s": 0.05, "metadata_interval_s": 30.0, "ttl_s": 60.0,
        "engine_timeout_s": 30.0}


class CountingMemoryStore(MemoryStore):
    """A MemoryStore that remembers every status write."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[InstanceStatus] = []

    async def put_status(self, status: InstanceStatus, ttl_s: float | None) -> None:
        self.written.append(status)
        await super().put_status(status, ttl_s)


class CountingRedisStore(RedisStore):
    """A RedisStore that remembers every status write."""

    def __init__(self, target: RedisTarget, **kwargs: float) -> None:
        super().__init__(target.host, target.port, db=target.db, **kwargs)  # type: ignore[arg-type]
        self.written: list[InstanceStatus] = []

    async def put_status(self, status: InstanceStatus, ttl_s: float | None) -> None:
        self.written.append(status)
        await super().put_status(status, ttl_s)


def engine_status(update_id: int, **fields: object) -> InstanceStatus:
    return InstanceStatus(instance_id="", update_id=update_id, **fields)  # type: ignore[arg-type]


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if await result if isinstance(result, Awaitable) else result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def stored(store: CmsStore) -> InstanceStatus | None:
    return (await store.read_statuses([META.instance_id]))[META.instance_id]


async def check_coalescing(store: CountingMemoryStore | CountingRedisStore) -> None:
    llumlet = Llumlet(store, META, **FAST)
    task = asyncio.create_task(llumlet.run())
    await asyncio.sleep(0.1)  # let it register and tick with nothing to send
    for update_id in range(1, 51):  # one burst: the loop cannot run in between
        llumlet.push(engine_status(update_id, num_running_requests=update_id))

    async def newest_written() -> bool:
        status = await stored(store)
        return status is not None and status.update_id == 50

    await eventually(newest_written)
    assert [s.update_id for s in store.written] == [50]
    written = store.written[0]
    assert written.instance_id == META.instance_id  # stamped
    assert abs(written.timestamp_ms - time.time() * 1000) < 60_000  # wall-clock ms
    await llumlet.stop()
    await task


def test_pushes_coalesce_to_the_newest_in_memory() -> None:
    asyncio.run(check_coalescing(CountingMemoryStore()))


def test_pushes_coalesce_to_the_newest_in_redis() -> None:
    async def main(target: RedisTarget) -> None:
        store = CountingRedisStore(target)
        await check_coalescing(store)
        await store.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_the_metadata_heartbeat_renews_its_ttl() -> None:
    async def main(target: RedisTarget) -> None:
        store = RedisStore(target.host, target.port, db=target.db)
        llumlet = Llumlet(store, META, push_interval_s=0.05, metadata_interval_s=0.1, ttl_s=5.0,
                          engine_timeout_s=4.0)
        task = asyncio.create_task(llumlet.run())
        key = "llumnix:instance_metadata:inst-a"
        await eventually(lambda: target.cli("EXISTS", key) == "1")
        first = int(target.cli("PTTL", key))
        await eventually(lambda: int(target.cli("PTTL", key)) > first)
        registered = (await store.read_metadata())[META.instance_id]
        assert registered.ip == "10.0.0.1"
        assert registered.utc_create > 1.6e9  # stamped at registration, wall-clock seconds
        await llumlet.stop()
        await task
        await store.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_stop_deletes_both_keys_and_ends_run() -> None:
    async def main(target: RedisTarget) -> None:
        store = RedisStore(target.host, target.port, db=target.db)
        llumlet = Llumlet(store, META, **FAST)
        task = asyncio.create_task(llumlet.run())
        llumlet.push(engine_status(1))
        await eventually(lambda: len(target.cli("KEYS", "llumnix:*").split()) == 2)
        await llumlet.stop()
        assert target.cli("KEYS", "llumnix:*") == ""
        assert task.done() and not task.cancelled() and task.result() is None
        await store.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_a_silent_engine_turns_unschedulable_with_the_same_update_id() -> None:
    async def main() -> None:
        store = MemoryStore()
        llumlet = Llumlet(store, META, push_interval_s=0.05, metadata_interval_s=30.0,
                          ttl_s=60.0, engine_timeout_s=0.3)
        task = asyncio.create_task(llumlet.run())
        llumlet.push(engine_status(7, num_running_requests=3))
        await eventually(lambda: store_has(store, schedulable=True, update_id=7))
        first = await stored(store)
        await eventually(lambda: store_has(store, schedulable=False))
        keepalive = await stored(store)
        assert first is not None and keepalive is not None
        assert keepalive.update_id == 7 and keepalive.num_running_requests == 3
        assert keepalive.timestamp_ms >= first.timestamp_ms
        llumlet.push(engine_status(8))  # the engine speaks again
        await eventually(lambda: store_has(store, schedulable=True, update_id=8))
        await llumlet.stop()
        await task

    asyncio.run(main())


async def store_has(store: CmsStore, **fields: object) -> bool:
    status = await stored(store)
    return status is not None and all(getattr(status, k) == v for k, v in fields.items())


def test_a_silent_engine_is_asked_through_its_source() -> None:
    async def main() -> None:
        store = MemoryStore()
        answers = [engine_status(40, num_waiting_requests=2)]

        def snapshot() -> InstanceStatus:
            if not answers:
                raise RuntimeError("engine gone")
            return answers.pop()

        llumlet = Llumlet(store, META, source=SnapshotSource(snapshot), push_interval_s=0.05,
                          metadata_interval_s=30.0, ttl_s=60.0, engine_timeout_s=0.2,
                          source_tries=2, source_backoff_s=0.01)
        task = asyncio.create_task(llumlet.run())
        await eventually(lambda: store_has(store, schedulable=True, update_id=40,
                                           num_waiting_requests=2))
        await eventually(lambda: store_has(store, schedulable=False, update_id=40))
        await llumlet.stop()
        await task

    asyncio.run(main())


def test_keys_expire_when_the_llumlet_dies_without_stop() -> None:
    async def main(target: RedisTarget) -> None:
        store = RedisStore(target.host, target.port, db=target.db)
        llumlet = Llumlet(store, META, push_interval_s=0.05, metadata_interval_s=0.2,
                          ttl_s=0.5, engine_timeout_s=0.3)
        task = asyncio.create_task(llumlet.run())
        llumlet.push(engine_status(1))
        await eventually(lambda: len(target.cli("KEYS", "llumnix:*").split()) == 2)
        task.cancel()  # a crash: no stop(), no DEL
        await asyncio.wait([task])
        assert task.cancelled()
        await eventually(lambda: target.cli("KEYS", "llumnix:*") == "")
        await store.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_the_llumlet_survives_an_outage_and_re_registers(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    async def main() -> None:
        with private_redis() as server:
            target = server.target
            store = RedisStore(target.host, target.port, timeout_s=0.5)
            llumlet = Llumlet(store, META, **FAST)
            task = asyncio.create_task(llumlet.run())
            meta_key = "llumnix:instance_metadata:inst-a"
            llumlet.push(engine_status(1))
            await eventually(lambda: target.cli("EXISTS", meta_key) == "1")
            server.stop()
            for update_id in range(2, 6):  # the engine keeps working; every write fails
                llumlet.push(engine_status(update_id))
                await asyncio.sleep(0.06)
            await eventually(lambda: not llumlet.cms_writable)
            server.start()  # empty: the metadata key is gone, the heartbeat is 30 s away
            await eventually(lambda: target.cli("EXISTS", meta_key) == "1")
            assert llumlet.cms_writable and not task.done()
            assert await store_has(store, update_id=5)
            await llumlet.stop()
            await task
            await store.close()

    with caplog.at_level(logging.WARNING, logger="prescient.llumlet.agent"):
        asyncio.run(main())
    failures = [r for r in caplog.records if "CMS write failed" in r.getMessage()]
    assert len(failures) == 1  # once per outage, not once per write


def test_an_idle_llumlet_re_registers_on_its_heartbeat() -> None:
    async def main() -> None:
        with private_redis() as server:
            target = server.target
            store = RedisStore(target.host, target.port, timeout_s=0.5)
            llumlet = Llumlet(store, META, push_interval_s=0.05, metadata_interval_s=0.2,
                              ttl_s=60.0, engine_timeout_s=30.0)
            task = asyncio.create_task(llumlet.run())
            meta_key = "llumnix:instance_metadata:inst-a"
            await eventually(lambda: target.cli("EXISTS", meta_key) == "1")
            server.stop()
            server.start()
            await eventually(lambda: target.cli("EXISTS", meta_key) == "1")
            await llumlet.stop()
            await task
            await store.close()

    asyncio.run(main())


def test_registration_waits_for_a_cms_that_starts_late() -> None:
    async def main() -> None:
        with private_redis() as server:
            server.stop()
            target = server.target
            store = RedisStore(target.host, target.port, timeout_s=0.5, retry_times=0)
            llumlet = Llumlet(store, META, register_tries=2, register_backoff_s=0.01, **FAST)
            task = asyncio.create_task(llumlet.run())
            llumlet.push(engine_status(1))
            await eventually(lambda: not llumlet.cms_writable)
            server.start()
            await eventually(lambda: len(target.cli("KEYS", "llumnix:*").split()) == 2)
            await llumlet.stop()
            await task
            await store.close()

    asyncio.run(main())


def test_stop_tolerates_a_dead_cms() -> None:
    async def main() -> None:
        store = RedisStore("127.0.0.1", 1, timeout_s=0.2, retry_times=0)
        llumlet = Llumlet(store, META, register_tries=1, **FAST)
        task = asyncio.create_task(llumlet.run())
        await eventually(lambda: not llumlet.cms_writable)
        await llumlet.stop()  # logs, does not raise
        assert task.done()
        await store.close()

    asyncio.run(main())


@pytest.mark.parametrize(("setting", "kwargs"), [
    ("push_interval_s", {"ttl_s": 0.04, "metadata_interval_s": 0.01, "engine_timeout_s": 0.01}),
    ("metadata_interval_s", {"ttl_s": 10.0, "metadata_interval_s": 20.0,
                             "engine_timeout_s": 1.0}),
    ("engine_timeout_s", {"ttl_s": 10.0, "metadata_interval_s": 1.0, "engine_timeout_s": 30.0}),
])
def test_a_ttl_shorter_than_an_interval_is_refused(setting: str, kwargs: dict[str, float]
                                                   ) -> None:
    with pytest.raises(ConfigError, match=f"ttl_s .* must exceed {setting}"):
        Llumlet(MemoryStore(), META, **kwargs)


def test_no_ttl_needs_no_ordering_but_intervals_must_be_positive() -> None:
    Llumlet(MemoryStore(), META, ttl_s=None)
    Llumlet(MemoryStore(), META, ttl_s=0)
    with pytest.raises(ConfigError, match="push_interval_s must be > 0"):
        Llumlet(MemoryStore(), META, push_interval_s=0)
