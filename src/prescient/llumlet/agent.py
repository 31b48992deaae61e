"""The llumlet: one per engine instance, it keeps the instance's two CMS keys alive.

As upstream's `llumlet.py::run_busy_loop`:

1. Register: write the metadata key (`register_tries` tries, `register_backoff_s` apart;
   upstream 3 and 5 s). If every try fails the llumlet carries on and writes it as soon as the
   store answers: an engine must not die because Redis started after it.
2. Every `push_interval_s` (upstream 0.04 s) write the newest status the engine `push()`ed;
   older ones are dropped (coalescing), so a busy engine costs at most one write per interval.
3. If the engine pushed nothing for `engine_timeout_s` (idle, or stuck), pull a status from
   `source` (`source_tries` tries, `source_backoff_s` apart, `source_timeout_s` each). If that
   fails, or there is no source, re-send the last status with `schedulable=False`, a new
   timestamp and the same `update_id`: the reader treats it as a keepalive and copies only
   `timestamp_ms` and `schedulable`. This repeats every `engine_timeout_s` until the engine
   speaks again, so a hung engine stays visible but unschedulable.
4. Every `metadata_interval_s` (upstream 20 s) re-write the metadata: a heartbeat that renews
   its TTL. Both keys expire `ttl_s` (upstream 100 s) after the last write, so a llumlet that
   dies without `stop()` disappears from the cluster by itself.

Every status is stamped with the instance id and `timestamp_ms` (wall clock, ms) as it is
written. A store failure never stops the llumlet: it is logged once per outage, the unsent
status is retried at the next interval, and the first successful write after an outage also
re-writes the metadata at once (a restarted Redis has lost the metadata key, and the
heartbeat may be 20 s away).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec

from prescient.cms.store import CmsStore, CmsStoreError
from prescient.errors import ConfigError
from prescient.llumlet.sources import StatusSource
from prescient.model import InstanceMetadata, InstanceStatus
from prescient.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


def wall_ms() -> int:
    """Wall-clock milliseconds since the epoch, upstream's `timestamp_ms` unit."""
    return int(time.time() * 1000)


class Llumlet:
    """The agent of one instance; `await run()` in a task, `await stop()` to leave the CMS.

    The caller owns `store` and closes it after `stop()`.

    Args:
        store: the CMS.
        metadata: the instance's metadata; its `instance_id` names both keys. Zero
            `utc_create`/`utc_update` are stamped with the registration time.
        source: pulls a status when the engine has been silent for `engine_timeout_s`.
        push_interval_s: status write period (`LLUMNIX_STATUS_PUSH_INTERVAL`).
        metadata_interval_s: metadata heartbeat period (`LLUMNIX_METADATA_PUSH_INTERVAL`).
        ttl_s: key lifetime after a write; None or <= 0: never expire
            (`LLUMNIX_CMS_EXPIRED_TIME`). Must exceed both intervals and the engine timeout.
        engine_timeout_s: silence after which the source is asked, or the instance is marked
            unschedulable (`LLUMNIX_ENGINE_GET_STATUS_TIMEOUT`).
        register_tries, register_backoff_s: initial registration attempts and their spacing.
        source_tries, source_backoff_s, source_timeout_s: pull attempts, spacing, timeout each.
        clock: monotonic seconds, for intervals and the engine timeout.
        wall_ms: wall-clock milliseconds, for `timestamp_ms`.

    Raises:
        ConfigError: an interval is not positive, or `ttl_s` does not exceed them.
    """

    def __init__(
        self,
        store: CmsStore,
        metadata: InstanceMetadata,
        *,
        source: StatusSource | None = None,
        push_interval_s: float = 0.04,
        metadata_interval_s: float = 20.0,
        ttl_s: float | None = 100.0,
        engine_timeout_s: float = 30.0,
        register_tries: int = 3,
        register_backoff_s: float = 5.0,
        source_tries: int = 3,
        source_backoff_s: float = 2.0,
        source_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = wall_ms,
    ) -> None:
        _validate(push_interval_s, metadata_interval_s, ttl_s, engine_timeout_s)
        self.store = store
        self.metadata = metadata
        self.instance_id = metadata.instance_id
        self.source = source
        self.push_interval_s = push_interval_s
        self.metadata_interval_s = metadata_interval_s
        self.ttl_s = ttl_s
        self.engine_timeout_s = engine_timeout_s
        self.register_tries = max(1, register_tries)
        self.register_backoff_s = register_backoff_s
        self.source_tries = max(1, source_tries)
        self.source_backoff_s = source_backoff_s
        self.source_timeout_s = source_timeout_s
        self._clock = clock
        self._wall_ms = wall_ms
        self._pending: InstanceStatus | None = None  # newest push not yet taken
        self._last = InstanceStatus(instance_id=self.instance_id, schedulable=False)
        self._unsent: InstanceStatus | None = None  # a status whose write failed
        self._last_event_at = clock()  # last push or source pull
        self._metadata_due_at = 0.0
        self._metadata_dirty = True
        self._outage = False
        self._engine_down = False  # the last pull failed: log once per engine outage
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def push(self, status: InstanceStatus) -> None:
        """An engine event: `status` is the newest; an older one not yet written is dropped.

        Call it from the event loop's thread (it is a plain assignment, no locking)."""
        self._pending = status
        self._last_event_at = self._clock()

    @property
    def cms_writable(self) -> bool:
        """False from a failed CMS write until the next successful one."""
        return not self._outage

    async def run(self) -> None:
        """Register, then write statuses and heartbeats until `stop()` (returns) or
        cancellation (raises; the keys then expire after `ttl_s`)."""
        if self._stopping:
            return  # stop() came first
        self._task = asyncio.current_task()
        try:
            await self._register()
            while True:
                started = self._clock()
                await self._tick(started)
                await asyncio.sleep(max(0.0, started + self.push_interval_s - self._clock()))
        except asyncio.CancelledError:
            if self._stopping:
                return
            raise

    async def stop(self) -> None:
        """Stop the loop and delete both keys (best effort: a store error is logged)."""
        self._stopping = True
        task = self._task
        if task is not None and task is not asyncio.current_task() and not task.done():
            await cancel_and_wait(task)  # its Redis writes may swallow one cancel
        try:
            await self.store.delete_instance(self.instance_id)
        except CmsStoreError as exc:
            logger.warning("llumlet %s: could not delete its CMS keys: %s", self.instance_id, exc)

    # ---- the loop ----------------------------------------------------------------------------

    async def _register(self) -> None:
        if self.metadata.utc_create == 0.0 and self.metadata.utc_update == 0.0:
            now_s = self._wall_ms() / 1000
            self.metadata = msgspec.structs.replace(self.metadata, utc_create=now_s,
                                                    utc_update=now_s)
        for attempt in range(1, self.register_tries + 1):
            if await self._put_metadata():
                logger.info("llumlet %s registered with the CMS", self.instance_id)
                return
            if attempt < self.register_tries:
                await asyncio.sleep(self.register_backoff_s)
        logger.error("llumlet %s: CMS registration failed %d times; retrying in the background",
                     self.instance_id, self.register_tries)

    async def _tick(self, now: float) -> None:
        """One interval: the metadata if due, then the status to write, if any."""
        if self._metadata_dirty or now >= self._metadata_due_at:
            await self._put_metadata()
        status = await self._next_status(now)
        if status is not None and await self._put_status(status) and self._metadata_dirty:
            await self._put_metadata()  # recovered from an outage: re-register at once

    async def _next_status(self, now: float) -> InstanceStatus | None:
        """The newest push; else a retry of a failed write; else, after `engine_timeout_s`
        of silence, a pulled status or an unschedulable keepalive."""
        if self._pending is not None:
            self._last, self._pending = self._pending, None
            return self._last
        if self._unsent is not None:
            return self._unsent
        if now - self._last_event_at < self.engine_timeout_s:
            return None
        self._last_event_at = now  # the next fallback is engine_timeout_s away
        pulled = await self._pull()
        if pulled is not None:
            self._last = pulled
            return pulled
        return msgspec.structs.replace(self._last, schedulable=False)

    async def _pull(self) -> InstanceStatus | None:
        if self.source is None:
            return None
        for attempt in range(1, self.source_tries + 1):
            try:
                status = await asyncio.wait_for(self.source.get_status(), self.source_timeout_s)
            except Exception as exc:  # any engine failure means "no status"
                if not self._engine_down:
                    logger.warning("llumlet %s: engine status pull %d/%d failed: %s",
                                   self.instance_id, attempt, self.source_tries, exc)
            else:
                if self._engine_down:
                    self._engine_down = False
                    logger.info("llumlet %s: the engine answers again", self.instance_id)
                return status
            if attempt < self.source_tries:
                await asyncio.sleep(self.source_backoff_s)
        if not self._engine_down:
            self._engine_down = True
            logger.warning("llumlet %s: the engine does not answer; reporting it unschedulable "
                           "until it does", self.instance_id)
        return None

    # ---- writes ------------------------------------------------------------------------------

    async def _put_metadata(self) -> bool:
        try:
            await self.store.put_metadata(self.metadata, self.ttl_s)
        except CmsStoreError as exc:
            self._metadata_dirty = True
            self._on_failure(exc)
            return False
        self._on_success()
        self._metadata_dirty = False
        self._metadata_due_at = self._clock() + self.metadata_interval_s
        return True

    async def _put_status(self, status: InstanceStatus) -> bool:
        stamped = msgspec.structs.replace(status, instance_id=self.instance_id,
                                          timestamp_ms=self._wall_ms())
        try:
            await self.store.put_status(stamped, self.ttl_s)
        except CmsStoreError as exc:
            self._unsent = status
            self._on_failure(exc)
            return False
        self._unsent = None
        self._on_success()
        return True

    def _on_failure(self, exc: CmsStoreError) -> None:
        if not self._outage:
            self._outage = True
            logger.warning("llumlet %s: CMS write failed, retrying every %g s: %s",
                           self.instance_id, self.push_interval_s, exc)

    def _on_success(self) -> None:
        if self._outage:
            self._outage = False
            self._metadata_dirty = True  # the store may have lost the metadata key
            logger.info("llumlet %s: CMS writable again", self.instance_id)


def _validate(push_interval_s: float, metadata_interval_s: float, ttl_s: float | None,
              engine_timeout_s: float) -> None:
    for name, value in (("push_interval_s", push_interval_s),
                        ("metadata_interval_s", metadata_interval_s),
                        ("engine_timeout_s", engine_timeout_s)):
        if not value > 0:
            raise ConfigError(f"llumlet {name} must be > 0, got {value}")
    if ttl_s is None or ttl_s <= 0:
        return
    for name, value in (("push_interval_s", push_interval_s),
                        ("metadata_interval_s", metadata_interval_s),
                        ("engine_timeout_s", engine_timeout_s)):
        if not ttl_s > value:
            raise ConfigError(f"llumlet ttl_s ({ttl_s:g} s) must exceed {name} ({value:g} s), "
                              "or the keys expire between writes")
