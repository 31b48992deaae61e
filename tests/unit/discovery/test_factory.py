"""`make_resolver` / `make_registrar` build what the discovery flags name (nothing connects)."""

from __future__ import annotations

import asyncio

import pytest

from prescient.config.scheduler import load_scheduler_settings
from prescient.discovery.base import StaticResolver
from prescient.discovery.etcd import EtcdRegistrar, EtcdResolver
from prescient.discovery.factory import make_registrar, make_resolver
from prescient.discovery.redis import RedisRegistrar, RedisResolver
from prescient.discovery.settings import load_agent_settings
from prescient.errors import ConfigError


def test_each_kind_builds_its_resolver() -> None:
    async def main() -> None:
        for kind, cls in (("redis", RedisResolver), ("etcd", EtcdResolver)):
            resolver = make_resolver(load_scheduler_settings(
                ["--llm-backend-discovery", kind], {}))
            assert isinstance(resolver, cls)
            await resolver.close()

    asyncio.run(main())
    static = make_resolver(load_scheduler_settings(
        ["--llm-backend-discovery", "endpoints", "--llm-backend-endpoints", "h:1,h:2"], {}))
    assert isinstance(static, StaticResolver)
    assert [i.instance_id for i in static.instances()] == ["h:1", "h:2"]


def test_endpoints_without_a_list_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--llm-backend-endpoints"):
        make_resolver(load_scheduler_settings(["--llm-backend-discovery", "endpoints"], {}))


def test_each_kind_builds_its_registrar() -> None:
    async def main() -> None:
        for kind, cls in (("redis", RedisRegistrar), ("etcd", EtcdRegistrar)):
            settings = load_agent_settings(["--pod-name", "p", "--engine-endpoints", "h:1",
                                            "--llm-backend-discovery", kind], {})
            registrar = make_registrar(settings, "p")
            assert isinstance(registrar, cls)
            assert registrar.pod_name == "p"
            await registrar.close()

    asyncio.run(main())
