"""MemoryStore: the CMS contract in process, TTLs on an injected clock."""

from __future__ import annotations

import asyncio

from prescient.cms.store import METADATA_KEY_PREFIX, STATUS_KEY_PREFIX, MemoryStore, status_key
from prescient.model import InstanceMetadata, InstanceStatus


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_key_prefixes_are_upstreams() -> None:
    assert METADATA_KEY_PREFIX == "llumnix:instance_metadata:"
    assert STATUS_KEY_PREFIX == "llumnix:instance_status:"
    assert status_key("a") == "llumnix:instance_status:a"


def test_records_round_trip_and_missing_statuses_read_none() -> None:
    async def main() -> None:
        store = MemoryStore()
        await store.put_metadata(InstanceMetadata(instance_id="a"), 10.0)
        await store.put_status(InstanceStatus(instance_id="a", update_id=3), 10.0)
        assert await store.read_metadata() == {"a": InstanceMetadata(instance_id="a")}
        assert await store.read_statuses(["a", "b"]) == {
            "a": InstanceStatus(instance_id="a", update_id=3), "b": None}
        await store.delete_instance("a")
        assert await store.read_metadata() == {}
        assert await store.read_statuses(["a"]) == {"a": None}
        await store.close()

    asyncio.run(main())


def test_records_expire_after_their_ttl_and_a_rewrite_renews_it() -> None:
    async def main() -> None:
        clock = Clock()
        store = MemoryStore(clock)
        await store.put_metadata(InstanceMetadata(instance_id="a"), 5.0)
        await store.put_status(InstanceStatus(instance_id="a"), 5.0)
        clock.now += 4.0
        await store.put_metadata(InstanceMetadata(instance_id="a"), 5.0)  # heartbeat
        clock.now += 2.0
        assert list(await store.read_metadata()) == ["a"]
        assert await store.read_statuses(["a"]) == {"a": None}
        clock.now += 3.0
        assert await store.read_metadata() == {}

    asyncio.run(main())


def test_no_ttl_or_a_non_positive_one_never_expires() -> None:
    async def main() -> None:
        clock = Clock()
        store = MemoryStore(clock)
        await store.put_metadata(InstanceMetadata(instance_id="a"), None)
        await store.put_metadata(InstanceMetadata(instance_id="b"), 0)
        await store.put_status(InstanceStatus(instance_id="a"), -1.0)
        clock.now += 1e9
        assert sorted(await store.read_metadata()) == ["a", "b"]
        assert (await store.read_statuses(["a"]))["a"] is not None

    asyncio.run(main())


def test_the_store_holds_copies() -> None:
    async def main() -> None:
        store = MemoryStore()
        status = InstanceStatus(instance_id="a", num_running_requests=1)
        await store.put_status(status, None)
        status.num_running_requests = 5
        read = (await store.read_statuses(["a"]))["a"]
        assert read is not None and read.num_running_requests == 1
        read.num_running_requests = 7
        again = (await store.read_statuses(["a"]))["a"]
        assert again is not None and again.num_running_requests == 1

    asyncio.run(main())
