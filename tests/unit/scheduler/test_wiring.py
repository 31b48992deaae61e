"""Settings to backends: the resolver `--llm-backend-discovery` names, scheduler addresses."""

from __future__ import annotations

import pytest

from prescient.config.scheduler import load_scheduler_settings
from prescient.discovery.base import StaticResolver
from prescient.errors import ConfigError
from prescient.scheduler.client import RemoteScheduler, base_url
from prescient.scheduler.wiring import make_resolver, make_store


def test_endpoints_discovery_is_a_static_resolver_over_the_flag() -> None:
    settings = load_scheduler_settings(
        ["--llm-backend-discovery", "endpoints", "--llm-backend-endpoints", "b:2,a:1"], {})
    resolver = make_resolver(settings)
    assert isinstance(resolver, StaticResolver)
    assert [i.instance_id for i in resolver.instances()] == ["a:1", "b:2"]
    bad = load_scheduler_settings(
        ["--llm-backend-discovery", "endpoints", "--llm-backend-endpoints", "nohost"], {})
    with pytest.raises(ConfigError, match="--llm-backend-endpoints"):
        make_resolver(bad)


def test_the_cms_store_reads_the_database_the_flag_names() -> None:
    settings = load_scheduler_settings(
        ["--cms-redis-host", "cms", "--cms-redis-port", "7000", "--cms-redis-db", "5"], {})
    store = make_store(settings)
    assert store.address == "cms:7000/5"  # type: ignore[attr-defined]
    assert make_store(load_scheduler_settings([], {})).address.endswith("/0")  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="--cms-redis-db"):
        load_scheduler_settings(["--cms-redis-db", "-1"], {})


def test_scheduler_addresses_become_base_urls() -> None:
    assert base_url("sched:8002") == "http://sched:8002"
    assert base_url("http://sched:8002/") == "http://sched:8002"
    assert base_url("https://sched.example") == "https://sched.example"
    assert base_url("[::1]:8002") == "http://[::1]:8002"
    with pytest.raises(ConfigError, match="--scheduler-endpoints"):
        base_url("sched")
    with pytest.raises(ConfigError, match="at least one"):
        RemoteScheduler([])
