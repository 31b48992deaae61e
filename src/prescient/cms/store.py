"""The CMS store port: two keys per instance, written by its llumlet, polled by the scheduler.

Upstream Llumnix keeps the cluster's instance records in plain Redis strings:

    llumnix:instance_metadata:<id>   cms.InstanceMetadata   heartbeat every 20 s, TTL 100 s
    llumnix:instance_status:<id>     cms.InstanceStatus     pushed every 40 ms at most, same TTL

A key that expires means its llumlet died; the reader treats a missing key as a removed
instance. `CmsStore` is that contract as a small async protocol; `MemoryStore` implements it
in process (the embedded default, and a fast test double with real TTL semantics) and
`prescient.cms.redis_store.RedisStore` on Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import msgspec

from prescient.errors import PrescientError
from prescient.model import InstanceMetadata, InstanceStatus

STATUS_KEY_PREFIX = "llumnix:instance_status:"
METADATA_KEY_PREFIX = "llumnix:instance_metadata:"

_Record = TypeVar("_Record", InstanceMetadata, InstanceStatus)


class CmsStoreError(PrescientError):
    """The CMS cannot be reached or refused an operation; the message says why."""


def metadata_key(instance_id: str) -> str:
    return METADATA_KEY_PREFIX + instance_id


def status_key(instance_id: str) -> str:
    return STATUS_KEY_PREFIX + instance_id


class CmsStore(Protocol):
    """Where instance records live. Every method raises `CmsStoreError` when the store is
    unreachable; `ttl_s` None or <= 0 means the record never expires."""

    async def put_metadata(self, metadata: InstanceMetadata, ttl_s: float | None) -> None: ...

    async def put_status(self, status: InstanceStatus, ttl_s: float | None) -> None: ...

    async def delete_instance(self, instance_id: str) -> None:
        """Remove both of the instance's keys (a graceful llumlet exit)."""
        ...

    async def read_metadata(self) -> dict[str, InstanceMetadata]:
        """Every live instance's metadata, keyed by instance id."""
        ...

    async def read_statuses(self, ids: Sequence[str]) -> dict[str, InstanceStatus | None]:
        """The status of each id, None where its key is missing or expired."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """`CmsStore` in a dict, with TTLs measured on an injected clock.

    Records are copied in and out, so a writer that later mutates its status object (or a
    reader its result) cannot change what the store holds, just as with Redis.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._metadata: dict[str, tuple[InstanceMetadata, float | None]] = {}
        self._statuses: dict[str, tuple[InstanceStatus, float | None]] = {}

    async def put_metadata(self, metadata: InstanceMetadata, ttl_s: float | None) -> None:
        self._metadata[metadata.instance_id] = (metadata, self._expiry(ttl_s))

    async def put_status(self, status: InstanceStatus, ttl_s: float | None) -> None:
        self._statuses[status.instance_id] = (msgspec.structs.replace(status),
                                              self._expiry(ttl_s))

    async def delete_instance(self, instance_id: str) -> None:
        self._metadata.pop(instance_id, None)
        self._statuses.pop(instance_id, None)

    async def read_metadata(self) -> dict[str, InstanceMetadata]:
        now = self._clock()
        return {iid: record for iid in list(self._metadata)
                if (record := self._live(self._metadata, iid, now)) is not None}

    async def read_statuses(self, ids: Sequence[str]) -> dict[str, InstanceStatus | None]:
        now = self._clock()
        result: dict[str, InstanceStatus | None] = {}
        for iid in ids:
            record = self._live(self._statuses, iid, now)
            result[iid] = None if record is None else msgspec.structs.replace(record)
        return result

    async def close(self) -> None:
        return None

    def _expiry(self, ttl_s: float | None) -> float | None:
        return None if ttl_s is None or ttl_s <= 0 else self._clock() + ttl_s

    @staticmethod
    def _live(table: dict[str, tuple[_Record, float | None]], instance_id: str,
              now: float) -> _Record | None:
        """The record if it has not expired; an expired one is dropped, as Redis would."""
        entry = table.get(instance_id)
        if entry is None:
            return None
        record, expires_at = entry
        if expires_at is not None and now >= expires_at:
            del table[instance_id]
            return None
        return record
