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
import signal
import sys
import warnings
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import yaml

from prescient.config.settings import redacted_builtins, settings_from_namespace
from prescient.discovery.settings import DESCRIPTION, DiscoveryAgentSettings, agent_parser
from prescient.errors import PrescientError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `discovery-agent` (every `DiscoveryAgentSettings` flag plus `--print-config`)."""
    p = sub.add_parser("discovery-agent", help="register this pod's healthy engines for "
                       "service discovery (Redis or etcd)", description=DESCRIPTION,
                       usage="prescient discovery-agent --pod-name P --engine-endpoints "
                             "HOST:PORT,... [options]", allow_abbrev=False)
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings as YAML (sorted keys) and exit")
    agent_parser(p)


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Resolve the settings; print them (`--print-config`) or heartbeat until SIGTERM.

    Raises:
        ConfigError: a bad or missing flag, env var or config key (named).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = settings_from_namespace(DiscoveryAgentSettings, args, env)
    for warning in caught:
        print(f"prescient: warning: {warning.message}", file=sys.stderr)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(redacted_builtins(settings), sort_keys=True))
        return 0
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _run_loop(_run_until_signalled(settings))
    return 0


async def _run_until_signalled(settings: DiscoveryAgentSettings) -> None:
    from prescient.discovery.agent import DiscoveryAgent, engine_targets
    from prescient.discovery.factory import make_registrar

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # not on Windows
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """`python -m prescient.discovery [flags]`: the subcommand on its own."""
    import os

    parser = argparse.ArgumentParser(prog="prescient")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["discovery-agent", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args, os.environ if env is None else env)
    except PrescientError as e:
        print(f"prescient: error: {e}", file=sys.stderr)
        return 2
