"""`prescient sim-engine`: run one simulated vLLM instance until SIGTERM or SIGINT.

The server runs on uvloop where available. On a signal the app shuts down cleanly: open
streams end, and with `--enable-llumlet` the llumlet deletes the instance's CMS keys, so the
scheduler stops routing here at its next metadata poll instead of after the keys' TTL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping

from aiohttp import web

from prescient import service
from prescient.config.sim_engine import DESCRIPTION, SimEngineSettings, sim_engine_parser
from prescient.simengine.server import build_app, start_server

logger = logging.getLogger("prescient.simengine")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `sim-engine` subcommand and its flags."""
    service.add_service_parser(
        sub, "sim-engine", help="a simulated vLLM instance in real time behind vLLM's OpenAI API",
        description=DESCRIPTION, usage="prescient sim-engine [options]",
        add_flags=sim_engine_parser)


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Serve until SIGTERM/SIGINT (or print the settings); returns the exit status.

    Raises:
        ConfigError: a flag, env var or config-file value is wrong (the caller prints it).
    """
    settings = service.resolve_settings(SimEngineSettings, args, env)
    if settings is None:
        return 0
    app = build_app(settings)  # bad preset, tokenizer or limits fail here, before binding
    service.run_until_signalled(lambda stop: _serve(settings, app, stop))
    return 0


async def _serve(settings: SimEngineSettings, app: web.Application, stop: asyncio.Event) -> None:
    runner = await start_server(settings, app=app)
    logger.info("sim-engine %s (%s, model %s) listening on %s:%d, time scale %g",
                settings.resolved_instance_id, settings.preset, settings.model, settings.host,
                settings.port, settings.time_scale)
    try:
        await stop.wait()
    finally:
        logger.info("sim-engine %s shutting down", settings.resolved_instance_id)
        await runner.cleanup()
