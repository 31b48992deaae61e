"""`prescient sim-engine`: run one simulated vLLM instance until SIGTERM or SIGINT.

The server runs on uvloop where available. On a signal the app shuts down cleanly: open
streams end, and with `--enable-llumlet` the llumlet deletes the instance's CMS keys, so the
scheduler stops routing here at its next metadata poll instead of after the keys' TTL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable, Mapping

from aiohttp import web

from prescient.config.settings import settings_from_namespace
from prescient.config.sim_engine import DESCRIPTION, SimEngineSettings, sim_engine_parser
from prescient.simengine.server import build_app, start_server

logger = logging.getLogger("prescient.simengine")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `sim-engine` subcommand and its flags."""
    parser = sub.add_parser(
        "sim-engine", help="a simulated vLLM instance in real time behind vLLM's OpenAI API",
        description=DESCRIPTION, usage="prescient sim-engine [options]", allow_abbrev=False)
    sim_engine_parser(parser)


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status.

    Raises:
        ConfigError: a flag, env var or config-file value is wrong (the caller prints it).
    """
    settings = settings_from_namespace(SimEngineSettings, args, env)
    app = build_app(settings)  # bad preset, tokenizer or limits fail here, before binding
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(settings, app))
    return 0


async def _serve(settings: SimEngineSettings, app: web.Application) -> None:
    runner = await start_server(settings, app=app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("sim-engine %s (%s, model %s) listening on %s:%d, time scale %g",
                settings.resolved_instance_id, settings.preset, settings.model, settings.host,
                settings.port, settings.time_scale)
    try:
        await stop.wait()
    finally:
        logger.info("sim-engine %s shutting down", settings.resolved_instance_id)
        await runner.cleanup()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # not on Windows
        return None
    return uvloop.new_event_loop
