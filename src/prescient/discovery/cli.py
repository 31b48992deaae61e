"""`prescient discovery-agent`: register this pod's healthy engines until SIGTERM.

Settings resolve as every service's do (defaults < `--config` < `PRESCIENT_DISCOVERY_AGENT_*`
env < flags < `--extra-args`); `--print-config` shows them. SIGTERM or SIGINT stops the agent
cleanly: the pod's record is withdrawn (Redis DEL, etcd lease revoked) so resolvers drop its
engines at once instead of after the TTL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping

from prescient import service
from prescient.discovery.settings import DESCRIPTION, DiscoveryAgentSettings, agent_parser


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `discovery-agent` (every `DiscoveryAgentSettings` flag plus `--print-config`)."""
    service.add_service_parser(
        sub, "discovery-agent",
        help="register this pod's healthy engines for service discovery (Redis or etcd)",
        description=DESCRIPTION,
        usage="prescient discovery-agent --pod-name P --engine-endpoints HOST:PORT,... "
              "[options]", add_flags=agent_parser)


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Resolve the settings; print them (`--print-config`) or heartbeat until SIGTERM.

    Raises:
        ConfigError: a bad or missing flag, env var or config key (named).
    """
    settings = service.resolve_settings(DiscoveryAgentSettings, args, env)
    if settings is not None:
        service.run_until_signalled(lambda stop: _run(settings, stop))
    return 0


async def _run(settings: DiscoveryAgentSettings, stop: asyncio.Event) -> None:
    from prescient.discovery.agent import DiscoveryAgent, engine_targets
    from prescient.discovery.factory import make_registrar

    agent = DiscoveryAgent(make_registrar(settings, settings.pod_name), engine_targets(settings),
                           health_timeout_s=settings.health_timeout_s,
                           heartbeat_interval_s=settings.heartbeat_interval_s)
    logging.getLogger(__name__).info(
        "discovery agent for pod %s: %d engines, registering in %s", settings.pod_name,
        len(settings.engine_endpoints), settings.llm_backend_discovery)
    try:
        await agent.run(stop)
    finally:
        await agent.close()
