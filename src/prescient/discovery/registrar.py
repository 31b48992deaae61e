"""The write side of discovery: what a registrar does, and the error registrars raise.

A registrar publishes one pod's healthy instances under the key `<prefix><pod_name>` (Redis:
`llumnix:discovery:`, etcd: `llumnix/discovery/`), re-stamped on every heartbeat so resolvers
can tell a live pod from a dead one. Implementations: `RedisRegistrar`, `EtcdRegistrar`.

An empty publish writes nothing, as upstream's sidecar does: the last record then ages out
(Redis: the resolvers' `--discovery-redis-status-ttl-ms`; etcd: the lease TTL, as keep-alives
stop too). A health check that flaps for one heartbeat therefore does not withdraw the pod.
`close()` withdraws the pod at once (Redis: DEL; etcd: lease revoked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from prescient.discovery.base import DiscoveredInstance
from prescient.errors import PrescientError

REDIS_KEY_PREFIX = "llumnix:discovery:"
ETCD_KEY_PREFIX = "llumnix/discovery/"


class DiscoveryError(PrescientError):
    """The discovery backend (Redis or etcd) failed a read or write; the message says which."""


class Registrar(Protocol):
    """Publishes one pod's healthy instances."""

    @property
    def pod_name(self) -> str:
        ...

    async def publish(self, instances: Sequence[DiscoveredInstance]) -> None:
        """Write `instances` with a fresh timestamp; an empty sequence writes nothing.

        Raises:
            DiscoveryError: the backend is unreachable or refused the write.
        """
        ...

    async def close(self) -> None:
        """Withdraw the pod's record (best effort) and release connections."""
        ...
