"""The scheduler's CMS poller: two loops that copy the store into a sink (the Dispatcher).

As upstream's `cms_read_client.go`:

- the metadata loop (every `metadata_interval_s`, upstream 10 s) reads every instance's
  metadata and replaces the sink's instance set; the ids it finds are the ones the status
  loop asks for;
- the status loop (every `status_interval_s`, upstream 50 ms) reads the statuses of those ids
  in one round trip; the sink applies upstream's freshness rules (`CmsView`).

`now` handed to the sink is wall-clock seconds (`time.time`) by default, not monotonic: the
sink compares it with the llumlets' `timestamp_ms` (wall-clock ms written by other processes,
e.g. the staleness filter), and the scheduler must pass the same clock to `schedule()`. The
loops themselves are paced on the event loop's monotonic clock.

A failed read (`CmsStoreError`) marks the sink's CMS unavailable, so full-mode scheduling
fails over to the gateway's fallback; the loops keep polling and the next successful read
marks it available again. The first metadata poll runs before the status loop starts, so the
status loop has ids to ask for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from prescient.cms.store import CmsStore, CmsStoreError
from prescient.model import InstanceMetadata, InstanceStatus

logger = logging.getLogger(__name__)


class CmsSink(Protocol):
    """What the reader feeds; `prescient.policy.dispatcher.Dispatcher` is one."""

    def on_instances(self, metadata: Mapping[str, InstanceMetadata], now: float) -> None: ...

    def on_statuses(self, statuses: Mapping[str, InstanceStatus | None], now: float) -> None: ...

    def mark_cms_unavailable(self, reason: str) -> None: ...

    def mark_cms_available(self) -> None: ...


class CmsReader:
    """Polls a `CmsStore` into a `CmsSink`; `now` given to the sink is `clock()` seconds.

    Args:
        store: where the records are.
        sink: where they go.
        status_interval_s: status poll period (upstream `--cms-pull-status-interval-ms`).
        metadata_interval_s: metadata poll period (`--cms-pull-metadata-interval-ms`).
        clock: the `now` given to the sink, seconds; wall clock by default (see above).
    """

    def __init__(self, store: CmsStore, sink: CmsSink, *, status_interval_s: float,
                 metadata_interval_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        if status_interval_s <= 0 or metadata_interval_s <= 0:
            raise ValueError("CMS poll intervals must be > 0 "
                             f"(status {status_interval_s}, metadata {metadata_interval_s})")
        self.store = store
        self.sink = sink
        self.status_interval_s = status_interval_s
        self.metadata_interval_s = metadata_interval_s
        self._clock = clock
        self._ids: tuple[str, ...] = ()
        self._available: bool | None = None  # None until the first poll

    @property
    def instance_ids(self) -> tuple[str, ...]:
        """The ids found by the last successful metadata poll, sorted."""
        return self._ids

    async def poll_metadata(self) -> bool:
        """Read every instance's metadata into the sink; False if the store failed."""
        try:
            records = await self.store.read_metadata()
        except CmsStoreError as exc:
            self._mark_failed(str(exc))
            return False
        self._ids = tuple(sorted(records))
        self.sink.on_instances(records, self._clock())
        self._mark_ok()
        return True

    async def poll_statuses(self) -> bool:
        """Read the known instances' statuses into the sink; False if the store failed.

        With no known instance there is nothing to read, and the availability is left as is.
        """
        if not self._ids:
            return True
        try:
            records = await self.store.read_statuses(self._ids)
        except CmsStoreError as exc:
            self._mark_failed(str(exc))
            return False
        self.sink.on_statuses(records, self._clock())
        self._mark_ok()
        return True

    async def run(self) -> None:
        """Poll metadata once, then both loops until cancelled."""
        await self.poll_metadata()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._every(self.metadata_interval_s, self.poll_metadata,
                                          first_delay=True))
            group.create_task(self._every(self.status_interval_s, self.poll_statuses))

    async def _every(self, interval_s: float, poll: Callable[[], Awaitable[bool]], *,
                     first_delay: bool = False) -> None:
        """Call `poll` every `interval_s`, measured start to start; a slow poll is not
        followed by a burst of catch-up polls."""
        loop = asyncio.get_running_loop()
        next_at = loop.time() + (interval_s if first_delay else 0.0)
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            await poll()
            next_at = max(next_at + interval_s, loop.time())

    def _mark_failed(self, reason: str) -> None:
        if self._available is not False:
            logger.warning("CMS unavailable: %s", reason)
        self._available = False
        self.sink.mark_cms_unavailable(reason)

    def _mark_ok(self) -> None:
        if self._available is not True:
            if self._available is False:
                logger.info("CMS available again")
            self._available = True
            self.sink.mark_cms_available()
