"""Gateway settings: upstream's names and defaults, our deliberate changes, and the rules
that tie flags together."""

from __future__ import annotations

import pytest

from prescient.config.gateway import GatewaySettings, gateway_parser, load_gateway_settings
from prescient.config.scheduler import SchedulerSettings
from prescient.config.settings import describe
from prescient.errors import ConfigError
from prescient.gateway.wiring import embedded_scheduler_settings


def test_defaults_follow_upstream_except_the_documented_changes() -> None:
    s = load_gateway_settings([], {})
    assert (s.host, s.port, s.enable_full_mode_scheduling, s.scheduling_policy) == (
        "0.0.0.0", 8001, True, "load-balance")
    assert (s.wait_scheduling_timeout, s.wait_scheduling_retry_interval) == (5.0, 1.0)
    assert (s.forward_tokens, s.requests_report_duration, s.scheduler_endpoints) == (
        True, 0.0, ())
    assert s.retry_max_count == 2  # upstream: 0
    assert s.discovery_kind == "redis"  # upstream's default when no endpoints are given


def test_backend_endpoints_alone_select_static_discovery() -> None:
    s = load_gateway_settings(["--llm-backend-endpoints", "a:1,b:2"], {})
    assert s.discovery_kind == "endpoints" and s.llm_backend_endpoints == ("a:1", "b:2")
    with pytest.raises(ConfigError, match="only read with --llm-backend-discovery endpoints"):
        load_gateway_settings(["--llm-backend-discovery", "redis",
                               "--llm-backend-endpoints", "a:1"], {})
    with pytest.raises(ConfigError, match="needs --llm-backend-endpoints"):
        load_gateway_settings(["--llm-backend-discovery", "endpoints"], {})


def test_round_robin_calls_no_scheduler_so_endpoints_for_one_are_refused() -> None:
    with pytest.raises(ConfigError, match="round-robin"):
        load_gateway_settings(["--scheduling-policy", "round-robin",
                               "--scheduler-endpoints", "s:8002"], {})


def test_shared_flags_have_the_schedulers_names_and_defaults() -> None:
    scheduler = {o.name: o for o in describe(SchedulerSettings)}
    shared = [o for o in describe(GatewaySettings) if o.name in scheduler]
    assert len(shared) > 20
    for opt in shared:
        other = scheduler[opt.name]
        assert opt.flag == other.flag
        assert opt.env == "PRESCIENT_GATEWAY_" + other.env.removeprefix("PRESCIENT_SCHEDULER_")
        if opt.name not in ("llm_backend_discovery", "port"):
            assert opt.default == other.default, opt.flag


def test_the_embedded_scheduler_takes_the_gateways_shared_flags(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "scheduler.yaml"
    config.write_text("dispatch_top_k: 3\nscheduling_policy: flood\n")
    s = load_gateway_settings(["--scheduler-config", str(config), "--enable-full-mode-scheduling"
                               "=false", "--llm-backend-endpoints", "a:1",
                               "--cms-pull-status-interval-ms", "40", "--cms-redis-db", "7"],
                              {})
    embedded = embedded_scheduler_settings(s)
    assert embedded.dispatch_top_k == 3  # from the file
    assert embedded.scheduling_policy == "load-balance"  # the gateway's flag wins
    assert embedded.enable_full_mode_scheduling is False
    assert embedded.llm_backend_discovery == "endpoints"
    assert embedded.cms_pull_status_interval_ms == 40
    assert embedded.cms_redis_db == 7
    assert embedded.port == SchedulerSettings().port  # not the gateway's own port


def test_environment_variables_carry_the_gateways_prefix() -> None:
    s = load_gateway_settings([], {"PRESCIENT_GATEWAY_PORT": "9100", "PRESCIENT_PORT": "1"})
    assert s.port == 9100


def test_help_lists_every_group() -> None:
    text = gateway_parser().format_help()
    for flag in ("--retry-max-count", "--served-model-name", "--scheduler-config",
                 "--cms-redis-db", "--max-body-bytes", "--discovery-etcd-endpoints"):
        assert flag in text
