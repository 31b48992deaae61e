"""Discovery through Redis: `RedisResolver` (gateway, lite-mode scheduler) and `RedisRegistrar`.

Keys and values are upstream Llumnix's: `llumnix:discovery:<pod_name>` holds a protobuf
`PodDiscoveryInfo` whose `timestamp_ms` the sidecar renews every heartbeat.

The resolver polls (`SCAN MATCH llumnix:discovery:*` + `MGET`) every
`--discovery-redis-refresh-interval-ms`. A record whose timestamp is older than
`--discovery-redis-status-ttl-ms` belongs to a dead sidecar: it is left out and its key is
deleted, as upstream does. The delete is compare-and-delete (a Lua script), so a record the
sidecar rewrote since the read survives; upstream's plain DEL can drop a live pod for one cycle.

Redis failures differ from upstream on purpose: upstream's Go resolver exits the process
(`klog.Fatalf`) when a poll fails; here the resolver keeps the last known set, logs the outage
once, and picks up where it left off when Redis answers again. A gateway thus keeps routing
through a discovery Redis restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from prescient.discovery.base import DiscoveredInstance, Listener
from prescient.discovery.codec import (
    DiscoveryCodecError,
    PodRecord,
    decode_pod,
    encode_pod,
    wall_clock_ms,
)
from prescient.discovery.instance_set import InstanceSet
from prescient.discovery.outage import OutageLog
from prescient.discovery.registrar import REDIS_KEY_PREFIX, DiscoveryError
from prescient.redis_retry import call_deadline_s, retry_policy
from prescient.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SCAN_COUNT = 1000  # keys per SCAN step and per MGET batch
# Delete the key only if it still holds the expired record we read.
_DELETE_IF_UNCHANGED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _client(host: str, port: int, db: int, username: str, password: str, timeout_s: float,
            retry_times: int) -> aioredis.Redis:
    return aioredis.Redis(
        host=host, port=port, db=db, username=username or None, password=password or None,
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        retry=retry_policy(retry_times))


class RedisResolver:
    """The instances registered in Redis, polled every `refresh_interval_s`.

    Args:
        host, port, db, username, password: the discovery Redis; empty credentials are not sent.
        timeout_s: socket connect and read timeout, seconds (`--discovery-redis-socket-timeout`).
        retry_times: reconnect attempts before a poll counts as failed.
        refresh_interval_s: time between polls.
        status_ttl_s: a record older than this is expired and deleted.
        wall_ms: the wall clock records are compared with (ms since the epoch); tests pass
            their own.
    """

    def __init__(self, host: str, port: int, *, db: int = 0, username: str = "",
                 password: str = "", timeout_s: float = 1.0, retry_times: int = 1,
                 refresh_interval_s: float = 1.0, status_ttl_s: float = 60.0,
                 wall_ms: Callable[[], int] = wall_clock_ms) -> None:
        self._redis = _client(host, port, db, username, password, timeout_s, retry_times)
        self._delete_if_unchanged = self._redis.register_script(_DELETE_IF_UNCHANGED)
        self._refresh_interval_s = refresh_interval_s
        self._status_ttl_ms = round(status_ttl_s * 1000)
        self._wall_ms = wall_ms
        self._set = InstanceSet(f"redis discovery {host}:{port}/{db}")
        self._outage = OutageLog(f"discovery Redis {host}:{port}/{db}", log)
        self._warned: dict[str, str] = {}  # key -> the last warning logged for it
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Poll once, then keep polling in the background (an unreachable Redis is retried)."""
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redis-discovery")

    def instances(self) -> list[DiscoveredInstance]:
        return self._set.instances()

    def subscribe(self, listener: Listener) -> None:
        self._set.subscribe(listener)

    async def refresh(self) -> None:
        """One poll: read every record, expire the stale ones, publish the set if it changed."""
        try:
            entries = await self._read()
        except (RedisError, OSError) as exc:
            self._outage.failed(exc, f"keeping the last {len(self._set.instances())} instances")
            return
        self._outage.ok()
        now_ms = self._wall_ms()
        live: list[PodRecord] = []
        for key, value in entries:
            record = self._decode(key, value)
            if record is None:
                continue
            if record.timestamp_ms < now_ms - self._status_ttl_ms:
                await self._expire(key, value, record, now_ms)
            else:
                live.append(record)
        self._set.replace(_unique(live))

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self._redis.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval_s)
            try:
                await self.refresh()
            except Exception:  # a bug in one poll must not end discovery for good
                log.exception("redis discovery: poll failed")

    async def _read(self) -> list[tuple[str, bytes]]:
        keys: set[str] = set()  # SCAN may return a key twice
        async for key in self._redis.scan_iter(match=REDIS_KEY_PREFIX + "*", count=SCAN_COUNT):
            keys.add(key.decode() if isinstance(key, bytes) else key)
        ordered = sorted(keys)
        entries: list[tuple[str, bytes]] = []
        for start in range(0, len(ordered), SCAN_COUNT):
            batch = ordered[start:start + SCAN_COUNT]
            values = await self._redis.mget(batch)
            # A key deleted between SCAN and MGET reads as None: gone, skip it.
            entries += [(k, v) for k, v in zip(batch, values, strict=True) if v is not None]
        self._warned = {k: w for k, w in self._warned.items() if k in keys}
        return entries

    def _decode(self, key: str, value: bytes) -> PodRecord | None:
        try:
            record = decode_pod(value, key.removeprefix(REDIS_KEY_PREFIX))
        except DiscoveryCodecError as exc:
            self._warn(key, f"skipping discovery record {key}: {exc}")
            return None
        if record.skipped:
            self._warn(key, f"discovery record {key}: skipped {'; '.join(record.skipped)}")
        else:
            self._warned.pop(key, None)
        return record

    def _warn(self, key: str, message: str) -> None:
        """Log `message` once per key until the key's problem changes."""
        if self._warned.get(key) != message:
            self._warned[key] = message
            log.warning("%s", message)

    async def _expire(self, key: str, value: bytes, record: PodRecord, now_ms: int) -> None:
        age_s = (now_ms - record.timestamp_ms) / 1000
        try:
            deleted = await self._delete_if_unchanged(keys=[key], args=[value])
        except (RedisError, OSError) as exc:
            log.warning("pod %s expired (%.0f s old) but deleting %s failed: %s",
                        record.pod_name, age_s, key, exc)
            return
        if deleted:
            log.info("pod %s expired (last heartbeat %.0f s ago); deleted %s",
                     record.pod_name, age_s, key)


def _unique(records: Iterable[PodRecord]) -> list[DiscoveredInstance]:
    """The records' instances; an id claimed by two keys keeps the first (keys sorted)."""
    seen: dict[str, DiscoveredInstance] = {}
    for record in records:
        for inst in record.instances:
            if inst.instance_id in seen:
                log.warning("discovery: instance id %s registered twice; keeping the first",
                            inst.instance_id)
                continue
            seen[inst.instance_id] = inst
    return list(seen.values())


class RedisRegistrar:
    """Writes one pod's record: `SET llumnix:discovery:<pod_name> <PodDiscoveryInfo> EX ...`.

    Args:
        pod_name: the pod; instance ids become `<pod_name>_dp<dp_rank>`.
        key_ttl_s: Redis expiry of the key, a backstop for when no resolver runs to delete
            stale records (upstream's sidecar sets 3600 s); liveness is the record's timestamp.
        Other arguments as `RedisResolver`'s.
    """

    def __init__(self, host: str, port: int, pod_name: str, *, db: int = 0, username: str = "",
                 password: str = "", timeout_s: float = 1.0, retry_times: int = 1,
                 key_ttl_s: float = 3600.0, wall_ms: Callable[[], int] = wall_clock_ms) -> None:
        self._redis = _client(host, port, db, username, password, timeout_s, retry_times)
        self._address = f"{host}:{port}/{db}"
        self._deadline_s = call_deadline_s(timeout_s, retry_times)
        self._pod_name = pod_name
        self.key = REDIS_KEY_PREFIX + pod_name
        self._key_ttl_ms = max(1, round(key_ttl_s * 1000))
        self._wall_ms = wall_ms
        self._written = False  # a record may exist: close() deletes it

    @property
    def pod_name(self) -> str:
        return self._pod_name

    async def publish(self, instances: Sequence[DiscoveredInstance]) -> None:
        """`SET` the record with a fresh timestamp; nothing when `instances` is empty.

        Raises:
            DiscoveryError: Redis failed the write.
        """
        if not instances:
            return
        value = encode_pod(self._pod_name, instances, self._wall_ms())
        self._written = True  # even a failed SET may have landed
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._redis.set(self.key, value, px=self._key_ttl_ms)
        except TimeoutError:
            raise DiscoveryError(f"discovery Redis {self._address}: SET {self.key} did not "
                                 f"answer within {self._deadline_s:g} s") from None
        except (RedisError, OSError) as exc:
            raise DiscoveryError(f"discovery Redis {self._address}: SET {self.key} failed: "
                                 f"{exc or type(exc).__name__}") from None

    async def close(self) -> None:
        """Delete the record (best effort: a failure is logged; the record then expires)."""
        if self._written:
            try:
                await self._redis.delete(self.key)
            except (RedisError, OSError) as exc:
                log.warning("discovery Redis %s: could not delete %s on shutdown: %s",
                            self._address, self.key, exc)
        await self._redis.aclose()
