"""`DiscoveryAgent`: health-check a pod's engines and register the healthy ones, every heartbeat.

This is upstream Llumnix's discovery sidecar. Each heartbeat it sends `GET <health-path>` to
every engine of the pod at once; an engine answering 2xx within the timeout is healthy. The
healthy engines are published through a `Registrar` (Redis or etcd) with a fresh timestamp.
When none is healthy nothing is written, so the pod's last record ages out (see
`prescient.discovery.registrar`); an engine that fails once is dropped from the next record.

A failed write is logged once per outage and retried at the next heartbeat; the agent never
exits because the discovery backend is down. Stopping it withdraws the pod's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import aiohttp
import msgspec

from prescient.discovery.base import DiscoveredInstance, parse_endpoint
from prescient.discovery.codec import instance_id
from prescient.discovery.outage import OutageLog
from prescient.discovery.registrar import DiscoveryError, Registrar
from prescient.discovery.settings import DiscoveryAgentSettings
from prescient.model import InferType

log = logging.getLogger(__name__)


class EngineTarget(msgspec.Struct, frozen=True, kw_only=True):
    """One engine of the pod: what is registered, and where its health is checked."""

    instance: DiscoveredInstance
    health_url: str


def engine_targets(settings: DiscoveryAgentSettings) -> list[EngineTarget]:
    """The pod's engines from `--engine-endpoints` (dp rank = position in the list)."""
    dp_size = len(settings.engine_endpoints)
    targets = []
    for rank, endpoint in enumerate(settings.engine_endpoints):
        host, port = parse_endpoint(endpoint, "--engine-endpoints")
        instance = DiscoveredInstance(
            instance_id=instance_id(settings.pod_name, rank),
            host=settings.entrypoint_ip or host, port=port,
            instance_type=InferType(settings.instance_type),
            kv_transfer_ip=settings.kv_transfer_ip, kv_transfer_port=settings.kv_transfer_port,
            dp_rank=rank, dp_size=dp_size, model=settings.model)
        url_host = f"[{host}]" if ":" in host else host
        targets.append(EngineTarget(instance=instance,
                                    health_url=f"http://{url_host}:{port}{settings.health_path}"))
    return targets


class DiscoveryAgent:
    """Checks `targets` and publishes the healthy ones through `registrar` each heartbeat.

    Args:
        registrar: where the pod's record goes (`RedisRegistrar`, `EtcdRegistrar`).
        targets: the pod's engines, in dp rank order.
        health_timeout_s: how long one health check may take.
        heartbeat_interval_s: time from the start of one heartbeat to the next.
    """

    def __init__(self, registrar: Registrar, targets: Sequence[EngineTarget], *,
                 health_timeout_s: float = 3.0, heartbeat_interval_s: float = 5.0) -> None:
        self._registrar = registrar
        self._targets = list(targets)
        self._timeout = aiohttp.ClientTimeout(total=health_timeout_s)
        self._interval_s = heartbeat_interval_s
        self._healthy: dict[str, bool] = {}  # instance id -> last verdict, to log changes only
        self._outage = OutageLog(f"discovery backend (pod {registrar.pod_name})", log)
        self._session: aiohttp.ClientSession | None = None

    async def beat(self) -> list[DiscoveredInstance]:
        """One heartbeat: check every engine, publish the healthy ones; returns them."""
        verdicts = await asyncio.gather(*(self._check(t) for t in self._targets))
        healthy = [t.instance for t, ok in zip(self._targets, verdicts, strict=True) if ok]
        try:
            await self._registrar.publish(healthy)
        except DiscoveryError as exc:
            self._outage.failed(exc, "retrying at the next heartbeat")
        else:
            self._outage.ok()
        return healthy

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat until `stop` is set."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            await self.beat()
            pause = max(0.0, self._interval_s - (loop.time() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)

    async def close(self) -> None:
        """Withdraw the pod's record and close connections."""
        await self._registrar.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _check(self, target: EngineTarget) -> bool:
        if self._session is None:  # made lazily: a session needs the running event loop
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(target.health_url) as resp:
                ok, reason = 200 <= resp.status < 300, f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, reason = False, str(exc) or type(exc).__name__
        iid = target.instance.instance_id
        if self._healthy.get(iid) != ok:
            self._healthy[iid] = ok
            log.log(logging.INFO if ok else logging.WARNING, "engine %s (%s) is %s (%s)", iid,
                    target.health_url, "healthy" if ok else "unhealthy", reason)
        return ok
