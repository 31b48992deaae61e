"""`prescient scheduler`: run the scheduler service, or `--print-config` its settings.

Settings resolve as every service's do (defaults < `--config` < `PRESCIENT_*` env < flags <
`--extra-args`). The service runs on uvloop and shuts down cleanly on SIGTERM or SIGINT
(in-flight requests finish, the CMS reader and discovery stop, connections close).
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

from prescient.config.scheduler import DESCRIPTION, SchedulerSettings, scheduler_parser
from prescient.config.settings import redacted_builtins, settings_from_namespace
from prescient.errors import PrescientError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `scheduler` (every `SchedulerSettings` flag plus `--print-config`) to `sub`."""
    p = sub.add_parser("scheduler", help="the scheduler service (/schedule, /release, /report)",
                       description=DESCRIPTION, usage="prescient scheduler [options]",
                       allow_abbrev=False)
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings as YAML (sorted keys) and exit")
    scheduler_parser(p)


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Resolve the settings; print them (`--print-config`) or serve until SIGTERM.

    Raises:
        ConfigError: a bad flag, env var or config key (named), or an unusable port.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = settings_from_namespace(SchedulerSettings, args, env)
    for warning in caught:
        print(f"prescient: warning: {warning.message}", file=sys.stderr)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(redacted_builtins(settings), sort_keys=True))
        return 0
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _run_loop(_serve_until_signalled(settings))
    return 0


async def _serve_until_signalled(settings: SchedulerSettings) -> None:
    from prescient.scheduler.service import serve  # aiohttp only when serving

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # not on Windows
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """`python -m prescient.scheduler [flags]`: the subcommand on its own."""
    import os

    parser = argparse.ArgumentParser(prog="prescient")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["scheduler", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args, os.environ if env is None else env)
    except PrescientError as e:
        print(f"prescient: error: {e}", file=sys.stderr)
        return 2
