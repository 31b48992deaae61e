"""Settings to live backends: the CMS store and the discovery resolver a scheduler reads.

Kept apart from `SchedulerCore` so the core imports no Redis or etcd client it does not use.
The resolver comes from `prescient.discovery.factory.make_resolver` (the gateway and the
discovery agent build theirs there too); it is re-exported here so the scheduler's wiring is in
one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from prescient.discovery.factory import make_resolver

if TYPE_CHECKING:
    from prescient.cms.store import CmsStore

__all__ = ["CmsSettings", "make_resolver", "make_store"]


class CmsSettings(Protocol):
    """The `--cms-redis-*` flags."""

    cms_redis_host: str
    cms_redis_port: int
    cms_redis_db: int
    cms_redis_username: str
    cms_redis_password: str
    cms_redis_timeout: float
    cms_redis_retry_times: int


def make_store(settings: CmsSettings) -> CmsStore:
    """The CMS Redis store of the `--cms-redis-*` flags (connects lazily; upstream always uses
    database 0, the default)."""
    from prescient.cms.redis_store import RedisStore

    return RedisStore(settings.cms_redis_host, settings.cms_redis_port,
                      db=settings.cms_redis_db, username=settings.cms_redis_username,
                      password=settings.cms_redis_password,
                      timeout_s=settings.cms_redis_timeout,
                      retry_times=settings.cms_redis_retry_times)
