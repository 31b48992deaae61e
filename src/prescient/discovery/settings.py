"""`DiscoveryAgentSettings`: the flags of `prescient discovery-agent`, declared once.

The agent is upstream Llumnix's discovery sidecar: one per inference pod, it health-checks the
pod's engines and registers the healthy ones in Redis or etcd. The discovery store flags
(`--discovery-redis-*`, `--discovery-etcd-*`) are the scheduler's and gateway's: all three
inherit them from `config/cluster.py`. The pod flags follow upstream's sidecar (`pod_name`,
`entrypoint_ip`, `kv_transfer_*`, `model`, `health_path`) with dashes; `--engine-endpoints`
replaces its `entrypoint_port` + `dp_size_local` (consecutive ports) with an explicit list.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Annotated, ClassVar, Literal

from prescient.config.cluster import DISCOVERY, DiscoveryStoreSettings
from prescient.config.settings import Setting, add_arguments, new_parser, parse_settings
from prescient.discovery.base import parse_endpoint
from prescient.errors import ConfigError

POD = "Pod"
HEALTH = "Health checks"




class DiscoveryAgentSettings(DiscoveryStoreSettings, frozen=True, kw_only=True,
                             forbid_unknown_fields=True):
    """The discovery agent's settings; build with `load_agent_settings`."""

    env_prefix: ClassVar[str] = "PRESCIENT_DISCOVERY_AGENT_"

    # --- Pod ---
    pod_name: Annotated[str, Setting(
        POD, "This pod's name (required); instance ids are <pod-name>_dp<rank>.")] = ""
    engine_endpoints: Annotated[tuple[str, ...], Setting(
        POD, "The pod's engines (OpenAI API servers) in data-parallel rank order (required).",
        metavar="HOST:PORT,...")] = ()
    entrypoint_ip: Annotated[str, Setting(
        POD, "Address registered for the engines, if not the --engine-endpoints host (e.g. "
             "the pod IP when engines are checked on 127.0.0.1).")] = ""
    instance_type: Annotated[Literal["neutral", "prefill", "decode"], Setting(
        POD, "What the engines do (PD disaggregation role).")] = "neutral"
    model: Annotated[str, Setting(POD, "Model name the engines serve.")] = ""
    kv_transfer_ip: Annotated[str, Setting(POD, "KV-transfer address (PD), if any.")] = ""
    kv_transfer_port: Annotated[int, Setting(
        POD, "KV-transfer port (PD); 0: none.", ge=0, le=65535)] = 0

    # --- Health checks ---
    health_path: Annotated[str, Setting(
        HEALTH, "Path of each engine's health endpoint; a 2xx answer means healthy.")] = (
        "/health")
    health_timeout_s: Annotated[float, Setting(
        HEALTH, "How long a health check may take, seconds.", gt=0)] = 3.0
    heartbeat_interval_s: Annotated[float, Setting(
        HEALTH, "Time between health checks; each one re-registers the healthy engines, "
                "seconds.", gt=0)] = 5.0

    # --- Service discovery (names and defaults as the scheduler's and gateway's) ---
    llm_backend_discovery: Annotated[Literal["redis", "etcd"], Setting(
        DISCOVERY, "Where to register the engines.")] = "redis"

    def __post_init__(self) -> None:
        if not self.pod_name:
            raise ConfigError("--pod-name is required")
        if not self.engine_endpoints:
            raise ConfigError("--engine-endpoints is required (HOST:PORT,... in dp rank order)")
        for endpoint in self.engine_endpoints:
            parse_endpoint(endpoint, "--engine-endpoints")
        if not self.health_path.startswith("/"):
            raise ConfigError(f"--health-path: {self.health_path!r} must start with '/'")
        if (self.llm_backend_discovery == "etcd"
                and self.heartbeat_interval_s >= self.discovery_etcd_lease_ttl):
            raise ConfigError(
                f"--heartbeat-interval-s ({self.heartbeat_interval_s:g}) must be below "
                f"--discovery-etcd-lease-ttl ({self.discovery_etcd_lease_ttl}): resolvers "
                "ignore records older than the lease TTL")


DESCRIPTION = ("Register this pod's healthy engines for service discovery (upstream Llumnix's "
               "discovery sidecar). Each flag can also come from a --config file (key: the flag "
               "with '_' for '-') or an environment variable PRESCIENT_DISCOVERY_AGENT_<FLAG>. "
               "Precedence: defaults < --config < environment < flags < --extra-args.")


def agent_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The agent's flags, grouped for `--help`; added to `parser` if given."""
    if parser is None:
        parser = new_parser(prog="prescient discovery-agent",
                            usage="prescient discovery-agent [options]", description=DESCRIPTION)
    add_arguments(DiscoveryAgentSettings, parser)
    return parser


def load_agent_settings(argv: Sequence[str], env: Mapping[str, str]) -> DiscoveryAgentSettings:
    """Settings from `argv` (flags only) and `env`; reads only `--config`.

    Raises:
        ConfigError: naming the flag, env var, or file and key at fault.
    """
    return parse_settings(DiscoveryAgentSettings, agent_parser(), argv, env)
