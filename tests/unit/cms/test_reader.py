"""CmsReader over a MemoryStore: what reaches the sink, and when the CMS counts as down."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest

from prescient.cms.reader import CmsReader
from prescient.cms.store import CmsStoreError, MemoryStore
from prescient.model import InstanceMetadata, InstanceStatus


class FlakyStore(MemoryStore):
    """A MemoryStore whose reads fail while `down` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.status_reads: list[tuple[str, ...]] = []

    async def read_metadata(self) -> dict[str, InstanceMetadata]:
        if self.down:
            raise CmsStoreError("redis down")
        return await super().read_metadata()

    async def read_statuses(self, ids: Sequence[str]) -> dict[str, InstanceStatus | None]:
        if self.down:
            raise CmsStoreError("redis down")
        self.status_reads.append(tuple(ids))
        return await super().read_statuses(ids)


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def on_instances(self, metadata: Mapping[str, InstanceMetadata], now: float) -> None:
        self.events.append(("instances", sorted(metadata), now))

    def on_statuses(self, statuses: Mapping[str, InstanceStatus | None], now: float) -> None:
        self.events.append(("statuses", {k: v and v.update_id for k, v in statuses.items()},
                            now))

    def mark_cms_unavailable(self, reason: str) -> None:
        self.events.append(("unavailable", reason))

    def mark_cms_available(self) -> None:
        self.events.append(("available",))


async def filled_store() -> FlakyStore:
    store = FlakyStore()
    for iid in ("b", "a"):
        await store.put_metadata(InstanceMetadata(instance_id=iid), None)
    await store.put_status(InstanceStatus(instance_id="a", update_id=4), None)
    return store


def test_polls_hand_records_and_the_clock_to_the_sink() -> None:
    async def main() -> None:
        sink = Sink()
        reader = CmsReader(await filled_store(), sink, status_interval_s=0.05,
                           metadata_interval_s=1.0, clock=lambda: 42.0)
        assert await reader.poll_statuses()  # no ids yet: nothing read, nothing marked
        assert sink.events == []
        assert await reader.poll_metadata()
        assert reader.instance_ids == ("a", "b")
        assert await reader.poll_statuses()
        assert sink.events == [("instances", ["a", "b"], 42.0), ("available",),
                               ("statuses", {"a": 4, "b": None}, 42.0)]

    asyncio.run(main())


def test_a_failed_poll_marks_unavailable_and_the_next_success_available() -> None:
    async def main() -> None:
        store, sink = await filled_store(), Sink()
        reader = CmsReader(store, sink, status_interval_s=0.05, metadata_interval_s=1.0,
                           clock=lambda: 0.0)
        await reader.poll_metadata()
        store.down = True
        assert not await reader.poll_statuses()
        assert not await reader.poll_metadata()
        assert reader.instance_ids == ("a", "b")  # a failed poll forgets nothing
        store.down = False
        assert await reader.poll_statuses()
        assert [e[0] for e in sink.events] == [
            "instances", "available", "unavailable", "unavailable", "statuses", "available"]
        assert sink.events[2] == ("unavailable", "redis down")

    asyncio.run(main())


def test_run_polls_metadata_first_then_statuses_until_cancelled() -> None:
    async def main() -> None:
        store, sink = await filled_store(), Sink()
        reader = CmsReader(store, sink, status_interval_s=0.01, metadata_interval_s=0.05)
        task = asyncio.create_task(reader.run())
        while len(store.status_reads) < 3:
            await asyncio.sleep(0.01)
        await store.put_metadata(InstanceMetadata(instance_id="c"), None)
        while ("a", "b", "c") not in store.status_reads:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.wait([task])
        assert sink.events[0][:2] == ("instances", ["a", "b"])
        assert store.status_reads[0] == ("a", "b")

    asyncio.run(main())


def test_intervals_must_be_positive() -> None:
    with pytest.raises(ValueError, match="intervals must be > 0"):
        CmsReader(MemoryStore(), Sink(), status_interval_s=0, metadata_interval_s=1.0)
