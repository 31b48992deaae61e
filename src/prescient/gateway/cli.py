"""`prescient gateway`: run the OpenAI-compatible gateway, or `--print-config` its settings.

Settings resolve as every service's do (defaults < `--config` < `PRESCIENT_*` env < flags <
`--extra-args`). The gateway runs on uvloop. On SIGTERM or SIGINT it stops accepting
connections, lets in-flight requests finish for up to `SHUTDOWN_GRACE_S`, then closes upstream
connections, the scheduler and discovery.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping

from prescient import service
from prescient.config.gateway import DESCRIPTION, GatewaySettings, gateway_parser
from prescient.errors import ConfigError

log = logging.getLogger("prescient.gateway")

SHUTDOWN_GRACE_S = 30.0  # streams still running after this are cut


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `gateway` (every `GatewaySettings` flag plus `--print-config`) to `sub`."""
    service.add_service_parser(
        sub, "gateway",
        help="the OpenAI-compatible gateway (/v1/completions, /v1/chat/completions)",
        description=DESCRIPTION, usage="prescient gateway [options]", add_flags=gateway_parser)


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Resolve the settings; print them (`--print-config`) or serve until SIGTERM.

    Raises:
        ConfigError: a bad flag, env var or config key (named), or an unusable port.
    """
    settings = service.resolve_settings(GatewaySettings, args, env)
    if settings is not None:
        service.run_until_signalled(lambda stop: serve_until_signalled(settings, stop))
    return 0


async def serve_until_signalled(settings: GatewaySettings, stop: asyncio.Event) -> None:
    """Build, start and serve the gateway until `stop` is set, then shut down cleanly."""
    from prescient.gateway.wiring import build_gateway

    gateway = build_gateway(settings)
    try:
        await gateway.start()
        try:
            server = await gateway.serve(settings.host, settings.port)
        except OSError as e:
            raise ConfigError(f"--port {settings.port}: cannot listen on "
                              f"{settings.host}:{settings.port}: {e.strerror or e}") from e
        log.info("gateway listening on %s:%d (%s)", settings.host, settings.port,
                 _describe(settings))
        await stop.wait()
        server.close()
        await gateway.drain(SHUTDOWN_GRACE_S)
    finally:
        await gateway.close()


def _describe(settings: GatewaySettings) -> str:
    if settings.scheduling_policy == "round-robin":
        scheduler = "local round-robin"
    elif settings.scheduler_endpoints:
        scheduler = "scheduler at " + ",".join(settings.scheduler_endpoints)
    else:
        scheduler = "embedded scheduler"
    mode = "full" if settings.enable_full_mode_scheduling else "lite"
    return (f"{scheduler}, {settings.scheduling_policy}, {mode} mode, discovery "
            f"{settings.discovery_kind}")
