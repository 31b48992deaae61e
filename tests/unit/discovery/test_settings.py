"""`prescient discovery-agent` settings: shared discovery flags and the checks on pod flags."""

from __future__ import annotations

import pytest

from prescient.config.scheduler import SchedulerSettings
from prescient.config.settings import describe
from prescient.discovery.agent import engine_targets
from prescient.discovery.settings import DiscoveryAgentSettings, load_agent_settings
from prescient.errors import ConfigError
from prescient.model import InferType

POD = ["--pod-name", "pod-1", "--engine-endpoints", "127.0.0.1:8001,127.0.0.1:8002"]


def test_discovery_flags_match_the_schedulers() -> None:
    ours = {o.name: o for o in describe(DiscoveryAgentSettings) if o.name.startswith("discovery_")}
    theirs = {o.name: o for o in describe(SchedulerSettings)}
    assert len(ours) == 12
    for name, opt in ours.items():
        assert (opt.flag, opt.kind, opt.default, opt.setting.secret) == (
            theirs[name].flag, theirs[name].kind, theirs[name].default,
            theirs[name].setting.secret), name


def test_flags_env_and_targets() -> None:
    s = load_agent_settings([*POD, "--instance-type", "decode", "--entrypoint-ip", "10.0.0.7"],
                            {"PRESCIENT_DISCOVERY_AGENT_MODEL": "llama"})
    targets = engine_targets(s)
    assert [t.instance.instance_id for t in targets] == ["pod-1_dp0", "pod-1_dp1"]
    assert [t.health_url for t in targets] == ["http://127.0.0.1:8001/health",
                                               "http://127.0.0.1:8002/health"]
    first = targets[0].instance
    assert (first.host, first.port, first.dp_size, first.model, first.instance_type) == (
        "10.0.0.7", 8001, 2, "llama", InferType.DECODE)


@pytest.mark.parametrize(("argv", "flag"), [
    (["--engine-endpoints", "h:1"], "--pod-name"),
    (["--pod-name", "p"], "--engine-endpoints"),
    (["--pod-name", "p", "--engine-endpoints", "h:0"], "--engine-endpoints"),
    ([*POD, "--health-path", "health"], "--health-path"),
    ([*POD, "--llm-backend-discovery", "etcd", "--discovery-etcd-lease-ttl", "2",
      "--heartbeat-interval-s", "5"], "--heartbeat-interval-s"),
    ([*POD, "--llm-backend-discovery", "endpoints"], "--llm-backend-discovery"),
])
def test_bad_settings_name_their_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        load_agent_settings(argv, {})
