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
import signal
import sys
import time
import warnings
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import yaml

from prescient.config.gateway import DESCRIPTION, GatewaySettings, gateway_parser
from prescient.config.settings import redacted_builtins, settings_from_namespace
from prescient.errors import ConfigError, PrescientError

log = logging.getLogger("prescient.gateway")

SHUTDOWN_GRACE_S = 30.0  # streams still running after this are cut


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `gateway` (every `GatewaySettings` flag plus `--print-config`) to `sub`."""
    p = sub.add_parser("gateway", help="the OpenAI-compatible gateway (/v1/completions, "
                       "/v1/chat/completions)", description=DESCRIPTION,
                       usage="prescient gateway [options]", allow_abbrev=False)
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings as YAML (sorted keys) and exit")
    gateway_parser(p)


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Resolve the settings; print them (`--print-config`) or serve until SIGTERM.

    Raises:
        ConfigError: a bad flag, env var or config key (named), or an unusable port.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = settings_from_namespace(GatewaySettings, args, env)
    for warning in caught:
        print(f"prescient: warning: {warning.message}", file=sys.stderr)
    if getattr(args, "print_config", False):
        sys.stdout.write(yaml.safe_dump(redacted_builtins(settings), sort_keys=True))
        return 0
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _run_loop(serve_until_signalled(settings))
    return 0


async def serve_until_signalled(settings: GatewaySettings) -> None:
    """Build, start and serve the gateway until SIGTERM/SIGINT, then shut down cleanly."""
    from prescient.gateway.wiring import build_gateway

    gateway = build_gateway(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
        await _drain(gateway.metrics, SHUTDOWN_GRACE_S)
    finally:
        await gateway.close()


async def _drain(metrics: Any, grace_s: float) -> None:
    """Wait until no request is in flight, or `grace_s` passed."""
    deadline = time.monotonic() + grace_s
    while metrics.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if metrics.in_flight:
        log.warning("shutting down with %d requests still in flight", metrics.in_flight)


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


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # not on Windows
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """`python -m prescient.gateway [flags]`: the subcommand on its own."""
    import os

    parser = argparse.ArgumentParser(prog="prescient")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["gateway", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args, os.environ if env is None else env)
    except PrescientError as e:
        print(f"prescient: error: {e}", file=sys.stderr)
        return 2
