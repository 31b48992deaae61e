"""`prescient scheduler`: run the scheduler service, or `--print-config` its settings.

Settings resolve as every service's do (defaults < `--config` < `PRESCIENT_SCHEDULER_*` env <
flags < `--extra-args`). On SIGTERM or SIGINT the service shuts down cleanly: in-flight
requests finish, the CMS reader and discovery stop, connections close.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping

from prescient import service
from prescient.config.scheduler import DESCRIPTION, SchedulerSettings, scheduler_parser


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `scheduler` (every `SchedulerSettings` flag plus `--print-config`) to `sub`."""
    service.add_service_parser(
        sub, "scheduler", help="the scheduler service (/schedule, /release, /report)",
        description=DESCRIPTION, usage="prescient scheduler [options]",
        add_flags=scheduler_parser)


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Resolve the settings; print them (`--print-config`) or serve until SIGTERM.

    Raises:
        ConfigError: a bad flag, env var or config key (named), or an unusable port.
    """
    settings = service.resolve_settings(SchedulerSettings, args, env)
    if settings is not None:
        service.run_until_signalled(lambda stop: _serve(settings, stop))
    return 0


async def _serve(settings: SchedulerSettings, stop: asyncio.Event) -> None:
    from prescient.scheduler.service import serve  # aiohttp only when serving

    await serve(settings, stop)
