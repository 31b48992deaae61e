"""What a resolver yields, and the static one (`--llm-backend-discovery endpoints`).

A resolver keeps the current set of healthy inference instances and tells subscribers when it
changes. The gateway uses it for its round-robin fallback and, in lite mode, the scheduler uses
it as its instance set. Fields follow upstream's `InstanceDiscoveryInfo` (`redis_discovery.proto`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from prescient.errors import ConfigError
from prescient.model import InferType, InstanceMetadata


class DiscoveredInstance(msgspec.Struct, frozen=True, kw_only=True):
    """One inference instance a resolver found."""

    instance_id: str  # "<pod_name>_dp<dp_rank>" (redis, etcd) or "host:port" (endpoints)
    host: str
    port: int
    instance_type: InferType = InferType.NEUTRAL
    kv_transfer_ip: str = ""
    kv_transfer_port: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    model: str = ""

    def metadata(self) -> InstanceMetadata:
        """The instance as the scheduling core sees it (lite mode has no CMS record)."""
        return InstanceMetadata(
            instance_id=self.instance_id, instance_type=self.instance_type, ip=self.host,
            api_server_port=self.port, ip_kvt=self.kv_transfer_ip, kvt_port=self.kv_transfer_port,
            dp_rank=self.dp_rank, data_parallel_size=self.dp_size, unit_id=self.instance_id,
            backend_type="unknown")


Listener = Callable[[Sequence[DiscoveredInstance]], None]


class Resolver(Protocol):
    """A source of the current instance set."""

    async def start(self) -> None:
        """Read the initial set and begin watching (returns once the first read is done)."""
        ...

    def instances(self) -> list[DiscoveredInstance]:
        """The current set, sorted by instance id."""
        ...

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(current set)` after every change."""
        ...

    async def close(self) -> None:
        ...


def parse_endpoint(text: str, flag: str = "--llm-backend-endpoints") -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:8000`); a bad one raises `ConfigError` naming `flag`."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{flag}: {text!r} is not host:port")
    return host, int(port_text)


class StaticResolver:
    """`--llm-backend-endpoints host:port,...`: a fixed set, ids "host:port"."""

    def __init__(self, endpoints: Sequence[str], flag: str = "--llm-backend-endpoints") -> None:
        found = {}
        for text in endpoints:
            host, port = parse_endpoint(text, flag)
            found[f"{host}:{port}"] = DiscoveredInstance(
                instance_id=f"{host}:{port}", host=host, port=port)
        self._instances = [found[k] for k in sorted(found)]

    async def start(self) -> None:
        return None

    def instances(self) -> list[DiscoveredInstance]:
        return list(self._instances)

    def subscribe(self, listener: Listener) -> None:
        listener(self.instances())

    async def close(self) -> None:
        return None
