"""Discovery through etcd: `EtcdResolver` (watch + periodic re-read) and `EtcdRegistrar` (lease).

Keys and values are upstream Llumnix's: `llumnix/discovery/<pod_name>` holds a protobuf
`PodDiscoveryInfo`, put under a lease of `--discovery-etcd-lease-ttl` seconds (60) that the
sidecar keeps alive every TTL/3. A sidecar that dies stops the keep-alives; etcd deletes its key
when the lease runs out and every resolver's watch sees the delete. A sidecar that stops cleanly
revokes its lease, which deletes the key at once.

The resolver reads the whole prefix at start, then watches from the next revision, so no change
between the read and the watch is lost. Every `--discovery-etcd-refresh-interval-sec` (3600) and
after any watch failure it reads the whole prefix again and re-watches: a watch that reconnects
does not replay deletes that happened while it was down, and the re-read also drops records
whose timestamp is older than the lease TTL (a sidecar that keeps its lease alive but stopped
writing), as upstream's resolver does. While etcd is unreachable the last known set is kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from prescient.discovery.base import DiscoveredInstance, Listener
from prescient.discovery.codec import (
    DiscoveryCodecError,
    PodRecord,
    decode_pod,
    encode_pod,
    wall_clock_ms,
)
from prescient.discovery.etcd_client import GRPC_NOT_FOUND, EtcdClient, EtcdError, WatchEvent
from prescient.discovery.instance_set import InstanceSet
from prescient.discovery.outage import OutageLog
from prescient.discovery.registrar import ETCD_KEY_PREFIX
from prescient.tasks import cancel_and_wait

log = logging.getLogger(__name__)

RETRY_INTERVAL_S = 1.0  # pause before re-reading after etcd failed a read or a watch


class EtcdResolver:
    """The instances registered in etcd under `prefix`, kept current by a watch.

    Args:
        endpoints: etcd members, `host:port` or URLs (`--discovery-etcd-endpoints`).
        username, password: etcd credentials; none when `username` is empty.
        dial_timeout_s: connect timeout per member, seconds.
        lease_ttl_s: a record whose timestamp is older than this is ignored.
        refresh_interval_s: time between full re-reads besides the watch.
        prefix: the key prefix (upstream's by default).
        wall_ms: the wall clock records are compared with (ms since the epoch).
    """

    def __init__(self, endpoints: Sequence[str], *, username: str = "", password: str = "",
                 dial_timeout_s: float = 5.0, lease_ttl_s: float = 60.0,
                 refresh_interval_s: float = 3600.0, prefix: str = ETCD_KEY_PREFIX,
                 wall_ms: Callable[[], int] = wall_clock_ms) -> None:
        self._client = EtcdClient(endpoints, username=username, password=password,
                                  dial_timeout_s=dial_timeout_s)
        self._prefix = prefix
        self._stale_ms = round(lease_ttl_s * 1000)
        self._refresh_interval_s = refresh_interval_s
        self._wall_ms = wall_ms
        where = ",".join(self._client.endpoints)
        self._set = InstanceSet(f"etcd discovery {where}")
        self._outage = OutageLog(f"discovery etcd {where}", log)
        self._pods: dict[str, PodRecord] = {}  # key -> its usable record
        self._warned: dict[str, str] = {}  # key -> the last warning logged for it
        self._revision: int | None = None  # of the last full read; None: read again
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the prefix once, then watch it in the background (etcd down: retried)."""
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="etcd-discovery")

    def instances(self) -> list[DiscoveredInstance]:
        return self._set.instances()

    def subscribe(self, listener: Listener) -> None:
        self._set.subscribe(listener)

    async def refresh(self) -> bool:
        """Re-read every record under the prefix; False (set kept) when etcd is unreachable."""
        try:
            revision, kvs = await self._client.range_prefix(self._prefix)
        except EtcdError as exc:
            self._outage.failed(exc, f"keeping the last {len(self._set.instances())} instances")
            self._revision = None
            return False
        self._outage.ok()
        self._pods = {}
        present = {key for key, _ in kvs}
        self._warned = {k: w for k, w in self._warned.items() if k in present}
        for key, value in kvs:
            self._apply_put(key, value)
        self._revision = revision
        self._publish()
        return True

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self._client.close()

    async def _run(self) -> None:
        while True:
            try:
                await self._watch_until_refresh()
            except Exception:  # a bug in one round must not end discovery for good
                log.exception("etcd discovery: watch round failed")
                await asyncio.sleep(RETRY_INTERVAL_S)

    async def _watch_until_refresh(self) -> None:
        """Watch from the last full read until the refresh interval ends or the watch fails;
        then read everything again."""
        if self._revision is not None:
            try:
                async with asyncio.timeout(self._refresh_interval_s):
                    await self._client.watch_prefix(self._prefix, self._revision + 1,
                                                    self._on_events)
            except TimeoutError:
                pass  # the periodic full refresh is due
            except EtcdError as exc:
                self._outage.failed(exc, "re-reading and watching again")
                await asyncio.sleep(RETRY_INTERVAL_S)
        if not await self.refresh():
            await asyncio.sleep(RETRY_INTERVAL_S)

    def _on_events(self, events: list[WatchEvent]) -> None:
        self._outage.ok()
        for event in events:
            if event.kind == "DELETE":
                self._warned.pop(event.key, None)
                if self._pods.pop(event.key, None) is not None:
                    log.info("etcd discovery: %s deleted", event.key)
            else:
                self._apply_put(event.key, event.value)
        self._publish()

    def _apply_put(self, key: str, value: bytes) -> None:
        """Take the key's new value, or forget the key when the value is unusable or stale."""
        self._pods.pop(key, None)
        try:
            record = decode_pod(value, key.removeprefix(self._prefix))
        except DiscoveryCodecError as exc:
            self._warn(key, f"etcd discovery: skipping {key}: {exc}")
            return
        if record.timestamp_ms < self._wall_ms() - self._stale_ms:
            self._warn(key, f"etcd discovery: {key} is stale (written at {record.timestamp_ms} "
                            "ms since the epoch, older than the lease TTL); ignored")
            return
        if record.skipped:
            self._warn(key, f"etcd discovery: {key}: skipped {'; '.join(record.skipped)}")
        else:
            self._warned.pop(key, None)
        self._pods[key] = record

    def _warn(self, key: str, message: str) -> None:
        """Log `message` once per key until the key's problem changes (records are re-put
        every heartbeat)."""
        if self._warned.get(key) != message:
            self._warned[key] = message
            log.warning("%s", message)

    def _publish(self) -> None:
        seen: dict[str, DiscoveredInstance] = {}
        for key in sorted(self._pods):
            for inst in self._pods[key].instances:
                seen.setdefault(inst.instance_id, inst)
        self._set.replace(seen.values())


class EtcdRegistrar:
    """Puts one pod's record under a lease and keeps the lease alive while the pod is healthy.

    Each `publish` re-puts the record with a fresh timestamp under the current lease (granting
    a new one when there is none or etcd lost it). A keep-alive runs every TTL/3 while the last
    publish listed instances; after an empty publish it stops, so the lease and the record
    expire after the TTL, the counterpart of upstream's "write nothing" on Redis. `close`
    revokes the lease, which deletes the record at once.

    Args:
        endpoints, username, password, dial_timeout_s, prefix, wall_ms: as `EtcdResolver`'s.
        pod_name: the pod; instance ids become `<pod_name>_dp<dp_rank>`.
        lease_ttl_s: lease TTL, seconds (`--discovery-etcd-lease-ttl`).
    """

    def __init__(self, endpoints: Sequence[str], pod_name: str, *, username: str = "",
                 password: str = "", dial_timeout_s: float = 5.0, lease_ttl_s: int = 60,
                 prefix: str = ETCD_KEY_PREFIX,
                 wall_ms: Callable[[], int] = wall_clock_ms) -> None:
        self._client = EtcdClient(endpoints, username=username, password=password,
                                  dial_timeout_s=dial_timeout_s)
        self._pod_name = pod_name
        self.key = prefix + pod_name
        self._lease_ttl_s = lease_ttl_s
        self._wall_ms = wall_ms
        self._lease: int | None = None
        self._live = False  # the last publish listed instances: keep the lease alive
        self._keepalive_task: asyncio.Task[None] | None = None
        self._outage = OutageLog(f"discovery etcd {','.join(self._client.endpoints)}", log)

    @property
    def pod_name(self) -> str:
        return self._pod_name

    @property
    def lease(self) -> int | None:
        """The current lease id (None before the first publish or after it was lost)."""
        return self._lease

    async def publish(self, instances: Sequence[DiscoveredInstance]) -> None:
        """Put the record with a fresh timestamp; nothing (and no keep-alives) when empty.

        Raises:
            EtcdError: etcd is unreachable or refused the write.
        """
        self._live = bool(instances)
        if not instances:
            return
        value = encode_pod(self._pod_name, instances, self._wall_ms())
        if self._lease is None:
            self._lease = await self._client.grant(self._lease_ttl_s)
        try:
            await self._client.put(self.key, value, self._lease)
        except EtcdError as exc:
            if exc.code != GRPC_NOT_FOUND:  # anything but "requested lease not found"
                raise
            log.info("etcd lease of %s expired; granting a new one", self.key)
            self._lease = await self._client.grant(self._lease_ttl_s)
            await self._client.put(self.key, value, self._lease)
        if self._keepalive_task is None:
            self._keepalive_task = asyncio.create_task(self._keep_alive(),
                                                       name="etcd-lease-keepalive")

    async def close(self) -> None:
        """Stop the keep-alives and revoke the lease (best effort: else the lease expires)."""
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            await asyncio.gather(self._keepalive_task, return_exceptions=True)
            self._keepalive_task = None
        if self._lease is not None:
            try:
                await self._client.revoke(self._lease)
            except EtcdError as exc:
                log.warning("could not revoke the etcd lease of %s (it will expire): %s",
                            self.key, exc)
            self._lease = None
        await self._client.close()

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ttl_s / 3)
            if not self._live or self._lease is None:
                continue
            try:
                ttl = await self._client.keepalive(self._lease)
            except EtcdError as exc:
                self._outage.failed(exc, "the lease may expire; the next publish re-grants it")
                continue
            self._outage.ok()
            if ttl <= 0:
                log.info("etcd lease of %s is gone; the next publish grants a new one", self.key)
                self._lease = None
