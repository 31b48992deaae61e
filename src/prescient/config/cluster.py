"""Settings every service that reaches the cluster's stores shares, declared once.

- `DiscoveryStoreSettings`: where discovery records live (`--discovery-redis-*`,
  `--discovery-etcd-*`): the discovery agent writes there, the scheduler and gateway read.
- `ClusterSettings` adds the reader's side of discovery (`--llm-backend-discovery`,
  `--llm-backend-endpoints`, refresh intervals) and the full-mode CMS (`--cms-*`).

`SchedulerSettings` and `GatewaySettings` extend `ClusterSettings` and
`DiscoveryAgentSettings` extends `DiscoveryStoreSettings`, so one deployment's values fit all
three and the names, defaults and help cannot drift apart. Names and defaults are upstream
Llumnix's scheduler flags (the seed guide's tables).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from prescient.config.settings import Setting

DISCOVERY = "Service discovery"
CMS = "Full-mode CMS"

PORT = {"ge": 1, "le": 65535}


class DiscoveryStoreSettings(msgspec.Struct, frozen=True, kw_only=True,
                             forbid_unknown_fields=True):
    """The Redis or etcd that holds discovery records."""

    discovery_redis_host: Annotated[str, Setting(DISCOVERY, "Discovery Redis host.")] = "redis"
    discovery_redis_port: Annotated[int, Setting(DISCOVERY, "Discovery Redis port.", **PORT)] = (
        6379)
    discovery_redis_db: Annotated[int, Setting(
        DISCOVERY, "Discovery Redis database (e.g. to share a Redis with the CMS).", ge=0)] = 0
    discovery_redis_username: Annotated[str, Setting(DISCOVERY, "Discovery Redis username.")] = ""
    discovery_redis_password: Annotated[str, Setting(
        DISCOVERY, "Discovery Redis password.", secret=True)] = ""
    discovery_redis_socket_timeout: Annotated[float, Setting(
        DISCOVERY, "Discovery Redis socket timeout, seconds.", gt=0)] = 1.0
    discovery_redis_retry_times: Annotated[int, Setting(
        DISCOVERY, "Discovery Redis retries on connection failure.", ge=0)] = 1
    discovery_etcd_endpoints: Annotated[tuple[str, ...], Setting(
        DISCOVERY, "Discovery etcd endpoints.", metavar="HOST:PORT,...")] = ("etcd:2379",)
    discovery_etcd_username: Annotated[str, Setting(DISCOVERY, "Discovery etcd username.")] = ""
    discovery_etcd_password: Annotated[str, Setting(
        DISCOVERY, "Discovery etcd password.", secret=True)] = ""
    discovery_etcd_dial_timeout: Annotated[float, Setting(
        DISCOVERY, "Discovery etcd dial timeout, seconds.", gt=0)] = 5.0
    discovery_etcd_lease_ttl: Annotated[int, Setting(
        DISCOVERY, "Discovery etcd lease TTL: a registration not renewed for this long "
        "vanishes, seconds.", gt=0)] = 60


class ClusterSettings(DiscoveryStoreSettings, frozen=True, kw_only=True,
                      forbid_unknown_fields=True):
    """How a scheduler (or a gateway) finds instances: discovery, and the CMS in full mode."""

    llm_backend_discovery: Annotated[Literal["redis", "etcd", "endpoints"], Setting(
        DISCOVERY, "How lite mode finds inference instances.")] = "redis"
    llm_backend_endpoints: Annotated[tuple[str, ...], Setting(
        DISCOVERY, "Static instances for --llm-backend-discovery endpoints.",
        metavar="HOST:PORT,...")] = ()
    discovery_redis_refresh_interval_ms: Annotated[int, Setting(
        DISCOVERY, "How often discovery entries are polled, ms.", gt=0)] = 1000
    discovery_redis_status_ttl_ms: Annotated[int, Setting(
        DISCOVERY, "A discovery entry older than this is expired and deleted, ms.", gt=0)] = 60000
    discovery_etcd_refresh_interval_sec: Annotated[int, Setting(
        DISCOVERY, "Full etcd re-read besides the watch, seconds.", gt=0)] = 3600

    cms_redis_host: Annotated[str, Setting(CMS, "CMS Redis host.")] = "redis"
    cms_redis_port: Annotated[int, Setting(CMS, "CMS Redis port.", **PORT)] = 6379
    cms_redis_db: Annotated[int, Setting(CMS, "CMS Redis database number.", ge=0)] = 0
    cms_redis_username: Annotated[str, Setting(CMS, "CMS Redis username.")] = ""
    cms_redis_password: Annotated[str, Setting(CMS, "CMS Redis password.", secret=True)] = ""
    cms_redis_timeout: Annotated[float, Setting(
        CMS, "CMS Redis socket timeout, seconds.", gt=0)] = 1.0
    cms_redis_retry_times: Annotated[int, Setting(
        CMS, "CMS Redis retries on connection failure.", ge=0)] = 1
    cms_pull_status_interval_ms: Annotated[int, Setting(
        CMS, "How often instance statuses are polled from the CMS, ms.", gt=0)] = 500
    cms_pull_metadata_interval_ms: Annotated[int, Setting(
        CMS, "How often instance metadata is polled from the CMS, ms.", gt=0)] = 10000
