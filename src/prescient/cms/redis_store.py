"""`CmsStore` on Redis, with upstream Llumnix's keys and protobuf records.

Writes are `SET <key> <protobuf> PX <ttl ms>` (upstream uses `EX` seconds; milliseconds let a
fractional TTL through unchanged). The reader finds instances with `SCAN MATCH
llumnix:instance_metadata:* COUNT 1000` plus `MGET`, and reads the statuses of known ids with a
single `MGET`, as upstream's `cms_read_client.go` does.

Any Redis or socket failure becomes `CmsStoreError`, which the reader turns into "CMS
unavailable" and the llumlet into "retry at the next push".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from prescient.cms.codec import (
    CmsCodecError,
    decode_metadata,
    decode_status,
    encode_metadata,
    encode_status,
)
from prescient.cms.store import (
    METADATA_KEY_PREFIX,
    CmsStoreError,
    metadata_key,
    status_key,
)
from prescient.errors import ConfigError
from prescient.model import InstanceMetadata, InstanceStatus
from prescient.redis_retry import call_deadline_s, retry_policy

logger = logging.getLogger(__name__)

SCAN_COUNT = 1000  # keys per SCAN step and per MGET batch
MAX_CONNECTIONS = 32  # per store; a llumlet or a reader uses one at a time

_T = TypeVar("_T")
_Record = TypeVar("_Record", InstanceMetadata, InstanceStatus)


class RedisStore:
    """Instance records in Redis.

    A record that fails to decode (a garbage value, a mismatched id, an unknown
    `instance_type`) is skipped with one warning until it decodes again: one bad llumlet must
    not blind the scheduler to every other instance. Its status counts as "unchanged" (it is
    left out of `read_statuses`' result), not as a vanished key.

    Args:
        host, port, db, username, password: where Redis is; empty credentials are not sent.
        timeout_s: socket connect and read timeout, seconds.
        retry_times: reconnect attempts on a connection error or timeout before a command
            fails, 0.1 s apart (upstream `REDIS_RETRY_TIMES`).
    """

    def __init__(self, host: str, port: int, *, db: int = 0, username: str = "",
                 password: str = "", timeout_s: float = 1.0, retry_times: int = 1) -> None:
        self.address = f"{host}:{port}/{db}"
        # a blocking pool: a burst of concurrent commands waits for a connection instead of
        # failing with "Too many connections"
        pool = aioredis.BlockingConnectionPool(
            max_connections=MAX_CONNECTIONS, timeout=timeout_s, host=host, port=port, db=db,
            username=username or None, password=password or None, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, retry=retry_policy(retry_times))
        self._redis = aioredis.Redis.from_pool(pool)
        self._bad_keys: set[str] = set()
        self._deadline_s = call_deadline_s(timeout_s, retry_times)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 1.0, retry_times: int = 1) -> RedisStore:
        """A store for `redis://[[user]:password@]host[:port][/db]`.

        Raises:
            ConfigError: the URL is not of that form.
        """
        parts = urlsplit(url)
        db_text = parts.path.strip("/") or "0"
        if parts.scheme != "redis" or not parts.hostname or not db_text.isdigit():
            raise ConfigError(f"CMS Redis URL {url!r}: expected redis://[user:pass@]host[:port][/db]")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ConfigError(f"CMS Redis URL {url!r}: bad port") from None
        return cls(parts.hostname, port, db=int(db_text), username=unquote(parts.username or ""),
                   password=unquote(parts.password or ""), timeout_s=timeout_s,
                   retry_times=retry_times)

    async def put_metadata(self, metadata: InstanceMetadata, ttl_s: float | None) -> None:
        await self._set(metadata_key(metadata.instance_id), encode_metadata(metadata), ttl_s)

    async def put_status(self, status: InstanceStatus, ttl_s: float | None) -> None:
        await self._set(status_key(status.instance_id), encode_status(status), ttl_s)

    async def delete_instance(self, instance_id: str) -> None:
        await self._call("DEL", lambda: self._redis.delete(
            metadata_key(instance_id), status_key(instance_id)))

    async def read_metadata(self) -> dict[str, InstanceMetadata]:
        keys = await self._call("SCAN", self._scan_metadata_keys)
        records: dict[str, InstanceMetadata] = {}
        for start in range(0, len(keys), SCAN_COUNT):
            batch = keys[start:start + SCAN_COUNT]
            values = await self._call("MGET", lambda b=batch: self._redis.mget(b))
            for key, value in zip(batch, values, strict=True):
                if value is None:
                    continue  # expired between SCAN and MGET
                iid = key[len(METADATA_KEY_PREFIX):]
                record = self._decode(decode_metadata, key, iid, value)
                if record is not None:
                    records[iid] = record
        return records

    async def read_statuses(self, ids: Sequence[str]) -> dict[str, InstanceStatus | None]:
        if not ids:
            return {}
        keys = [status_key(iid) for iid in ids]
        values = await self._call("MGET", lambda: self._redis.mget(keys))
        statuses: dict[str, InstanceStatus | None] = {}
        for iid, key, value in zip(ids, keys, values, strict=True):
            if value is None:
                statuses[iid] = None
            elif (record := self._decode(decode_status, key, iid, value)) is not None:
                statuses[iid] = record
        return statuses

    async def close(self) -> None:
        await self._redis.aclose()

    async def _set(self, key: str, value: bytes, ttl_s: float | None) -> None:
        px = None if ttl_s is None or ttl_s <= 0 else max(1, round(ttl_s * 1000))
        await self._call("SET", lambda: self._redis.set(key, value, px=px))

    async def _scan_metadata_keys(self) -> list[str]:
        keys: set[str] = set()  # SCAN may return a key twice
        async for key in self._redis.scan_iter(match=METADATA_KEY_PREFIX + "*",
                                               count=SCAN_COUNT):
            keys.add(key.decode() if isinstance(key, bytes) else key)
        return sorted(keys)

    async def _call(self, command: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        try:
            async with asyncio.timeout(self._deadline_s):
                return await operation()
        except TimeoutError:
            raise CmsStoreError(f"CMS Redis {self.address}: {command} did not answer within "
                                f"{self._deadline_s:g} s") from None
        except (RedisError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise CmsStoreError(f"CMS Redis {self.address}: {command} failed: {reason}") from None

    def _decode(self, decode: Callable[[bytes, str], _Record], key: str, instance_id: str,
                value: bytes) -> _Record | None:
        try:
            record = decode(value, instance_id)
        except CmsCodecError as exc:
            if key not in self._bad_keys:
                self._bad_keys.add(key)
                logger.warning("skipping CMS record %s: %s", key, exc)
            return None
        self._bad_keys.discard(key)
        return record
