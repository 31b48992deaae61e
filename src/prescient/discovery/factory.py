"""Settings to discovery objects: the one place resolvers and registrars are built from flags.

The scheduler (lite mode), the gateway and the discovery agent all carry the same discovery
flags (`--llm-backend-discovery`, `--discovery-redis-*`, `--discovery-etcd-*`, named as in
`SchedulerSettings`), so each passes its settings object here and gets the same behaviour.
The Redis and etcd modules are imported only when chosen.
"""

from __future__ import annotations

from typing import Protocol

from prescient.discovery.base import Resolver, StaticResolver
from prescient.discovery.registrar import Registrar
from prescient.errors import ConfigError


class RegistrarSettings(Protocol):
    """The discovery backend flags a registrar (and a resolver) reads."""

    llm_backend_discovery: str
    discovery_redis_host: str
    discovery_redis_port: int
    discovery_redis_db: int
    discovery_redis_username: str
    discovery_redis_password: str
    discovery_redis_socket_timeout: float
    discovery_redis_retry_times: int
    discovery_etcd_endpoints: tuple[str, ...]
    discovery_etcd_username: str
    discovery_etcd_password: str
    discovery_etcd_dial_timeout: float
    discovery_etcd_lease_ttl: int


class ResolverSettings(RegistrarSettings, Protocol):
    """Every discovery flag a resolver reads (`SchedulerSettings` has them all)."""

    llm_backend_endpoints: tuple[str, ...]
    discovery_redis_refresh_interval_ms: int
    discovery_redis_status_ttl_ms: int
    discovery_etcd_refresh_interval_sec: int


def make_resolver(settings: ResolverSettings) -> Resolver:
    """The resolver `--llm-backend-discovery` names, not yet started.

    Raises:
        ConfigError: `endpoints` with no (or a bad) `--llm-backend-endpoints`, or an unknown
            kind.
    """
    kind = settings.llm_backend_discovery
    if kind == "endpoints":
        if not settings.llm_backend_endpoints:
            raise ConfigError("--llm-backend-discovery endpoints needs --llm-backend-endpoints "
                              "HOST:PORT,...")
        return StaticResolver(settings.llm_backend_endpoints)
    if kind == "redis":
        from prescient.discovery.redis import RedisResolver

        return RedisResolver(
            settings.discovery_redis_host, settings.discovery_redis_port,
            db=settings.discovery_redis_db, username=settings.discovery_redis_username,
            password=settings.discovery_redis_password,
            timeout_s=settings.discovery_redis_socket_timeout,
            retry_times=settings.discovery_redis_retry_times,
            refresh_interval_s=settings.discovery_redis_refresh_interval_ms / 1000,
            status_ttl_s=settings.discovery_redis_status_ttl_ms / 1000)
    if kind == "etcd":
        from prescient.discovery.etcd import EtcdResolver

        return EtcdResolver(
            _etcd_endpoints(settings), username=settings.discovery_etcd_username,
            password=settings.discovery_etcd_password,
            dial_timeout_s=settings.discovery_etcd_dial_timeout,
            lease_ttl_s=settings.discovery_etcd_lease_ttl,
            refresh_interval_s=float(settings.discovery_etcd_refresh_interval_sec))
    raise ConfigError(f"--llm-backend-discovery: unknown kind {kind!r}; "
                      "known: endpoints, etcd, redis")


def make_registrar(settings: RegistrarSettings, pod_name: str) -> Registrar:
    """The registrar for `pod_name` on the backend `--llm-backend-discovery` names.

    Raises:
        ConfigError: the kind is not redis or etcd.
    """
    kind = settings.llm_backend_discovery
    if kind == "redis":
        from prescient.discovery.redis import RedisRegistrar

        return RedisRegistrar(
            settings.discovery_redis_host, settings.discovery_redis_port, pod_name,
            db=settings.discovery_redis_db, username=settings.discovery_redis_username,
            password=settings.discovery_redis_password,
            timeout_s=settings.discovery_redis_socket_timeout,
            retry_times=settings.discovery_redis_retry_times)
    if kind == "etcd":
        from prescient.discovery.etcd import EtcdRegistrar

        return EtcdRegistrar(
            _etcd_endpoints(settings), pod_name, username=settings.discovery_etcd_username,
            password=settings.discovery_etcd_password,
            dial_timeout_s=settings.discovery_etcd_dial_timeout,
            lease_ttl_s=settings.discovery_etcd_lease_ttl)
    raise ConfigError(f"--llm-backend-discovery: registering needs redis or etcd, not {kind!r}")


def _etcd_endpoints(settings: RegistrarSettings) -> tuple[str, ...]:
    if not settings.discovery_etcd_endpoints:
        raise ConfigError("--discovery-etcd-endpoints: at least one HOST:PORT is needed")
    return settings.discovery_etcd_endpoints
