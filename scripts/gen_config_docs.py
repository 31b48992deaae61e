"""Generate the flag reference of every live service in docs/configuration.md.

Each service's reference (every flag with its type, bounds or choices, default, environment
variable and help, grouped as `--help` groups them) is rendered from
`prescient.config.settings.describe(<its settings class>)` and written between its own marker
comments, e.g. for `prescient gateway`:

    <!-- BEGIN gateway flags -->
    <!-- END gateway flags -->

The scheduler's block also carries the defaults where the seed documents and upstream code
disagree (`prescient.config.scheduler.DEFAULT_CHOICES`). The services are listed once, in
`SERVICES`; a service whose settings module does not exist (yet) is skipped, and its markers
must then be absent from the file.

Usage (from the repository root):

    .venv/bin/python scripts/gen_config_docs.py           # rewrite the blocks in place
    .venv/bin/python scripts/gen_config_docs.py --check   # exit 1 if a block is stale

`tests/integration/test_docs.py` runs the check, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from prescient.config.settings import (
    REDACTED,
    DefaultChoice,
    Option,
    describe,
    env_prefix,
    format_value,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


class Service(NamedTuple):
    """One `prescient <command>` and the settings class its flags come from."""

    command: str  # "prescient gateway"
    module: str  # where the settings class is declared
    cls: str
    choices: str = ""  # the module's DefaultChoice tuple, if it has one

    @property
    def key(self) -> str:
        """The marker name: the subcommand (`gateway` -> `<!-- BEGIN gateway flags -->`)."""
        return self.command.removeprefix("prescient ")


# One block per service, in the order the doc presents them.
SERVICES = (
    Service("prescient scheduler", "prescient.config.scheduler", "SchedulerSettings",
            choices="DEFAULT_CHOICES"),
    Service("prescient gateway", "prescient.config.gateway", "GatewaySettings"),
    Service("prescient sim-engine", "prescient.config.sim_engine", "SimEngineSettings"),
    Service("prescient llumlet", "prescient.config.llumlet", "LlumletSettings"),
    Service("prescient discovery-agent", "prescient.discovery.settings",
            "DiscoveryAgentSettings"),
    Service("prescient serve", "prescient.config.serve", "ServeSettings"),
)


def begin_marker(service: Service) -> str:
    return f"<!-- BEGIN {service.key} flags -->"


def end_marker(service: Service) -> str:
    return f"<!-- END {service.key} flags -->"


def available(service: Service) -> bool:
    """The settings module exists (a broken one still fails loudly when imported)."""
    return importlib.util.find_spec(service.module) is not None


def settings_class(service: Service) -> Any:
    return getattr(importlib.import_module(service.module), service.cls)


def default_choices(service: Service) -> tuple[DefaultChoice, ...]:
    if not service.choices:
        return ()
    return tuple(getattr(importlib.import_module(service.module), service.choices))


# --- cells ------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if text else '`""`'


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def type_of(opt: Option) -> str:
    """The value a flag takes, with its bounds or choices."""
    if opt.kind == "choice":
        return "one of " + ", ".join(f"`{c}`" for c in opt.choices)
    if opt.kind == "list":
        if opt.choices:
            return "list of " + ", ".join(f"`{c}`" for c in opt.choices)
        return "list of str"
    s = opt.setting
    bounds = [f"≥ {_num(s.ge)}" if s.ge is not None else "",
              f"> {_num(s.gt)}" if s.gt is not None else "",
              f"≤ {_num(s.le)}" if s.le is not None else ""]
    shown = ", ".join(b for b in bounds if b)
    return f"{opt.kind}, {shown}" if shown else opt.kind


def default_of(opt: Option) -> str:
    if opt.setting.secret and opt.default:
        return f"`{REDACTED}`"
    return _code(format_value(opt.default))


def help_of(opt: Option) -> str:
    text = opt.setting.help
    if opt.setting.secret:
        text += " Secret: `--print-config` shows it as `<redacted>`."
    if opt.setting.aliases:
        spelled = ", ".join(f"`{a}`" for a in opt.setting.aliases)
        text += f" Deprecated spelling: {spelled} (accepted with a warning)."
    return _cell(text)


# --- tables -----------------------------------------------------------------------------------


def flag_table(options: Sequence[Option]) -> list[str]:
    lines = ["| Flag | Type | Default | Environment variable | Help |", "|---|---|---|---|---|"]
    lines += [f"| `{o.flag}` | {type_of(o)} | {default_of(o)} | `{o.env}` | {help_of(o)} |"
              for o in options]
    return lines


def choices_table(choices: Sequence[DefaultChoice]) -> list[str]:
    lines = ["| Flag | Our default (seed documents) | Upstream code | Why |", "|---|---|---|---|"]
    lines += [f"| `{c.flag}` | `{format_value(c.seed)}` | `{format_value(c.upstream)}` | "
              f"{_cell(c.why)} |" for c in choices]
    return lines


def groups_of(options: Sequence[Option]) -> list[str]:
    """Groups in order of first appearance: the order `--help` prints them."""
    return list(dict.fromkeys(o.setting.group for o in options))


def render(service: Service) -> str:
    """The service's block between its markers, markers included."""
    cls = settings_class(service)
    options = describe(cls)
    groups = groups_of(options)
    note = (f"<!-- Generated by scripts/gen_config_docs.py from {service.cls}"
            + (f" and {service.choices}" if service.choices else "")
            + "; edit the code, then rerun the script. -->")
    out = [begin_marker(service), note, ""]
    out += [f"`{service.command}`: {len(options)} flags in {len(groups)} groups, in `--help` "
            f"order; environment variables `{env_prefix(cls)}<FLAG>`. Booleans take `--flag`, "
            "`--flag=true` or `--flag=false`; lists are comma-separated.", ""]
    for group in groups:
        out += [f"#### {group}", ""]
        out += flag_table([o for o in options if o.setting.group == group])
        out.append("")
    choices = default_choices(service)
    if choices:
        out += ["#### Defaults where the seed documents and upstream code disagree", "",
                "Flag defaults follow the seed scheduler configuration guide. Where upstream "
                "Llumnix code ships a different default, this table gives both and why we "
                "chose; pass the upstream value to reproduce upstream behaviour.", ""]
        out += choices_table(choices)
        out.append("")
    out.append(end_marker(service))
    return "\n".join(out)


# --- the file ---------------------------------------------------------------------------------


def update(text: str, services: Sequence[Service] = SERVICES) -> str:
    """`text` with every service's block replaced by a freshly rendered one.

    Raises:
        SystemExit: a service's markers are missing, out of order or repeated, or present for
            a service whose settings module does not exist.
    """
    for service in services:
        begin, end = begin_marker(service), end_marker(service)
        start, stop = text.find(begin), text.find(end)
        if not available(service):
            if start >= 0 or stop >= 0:
                raise SystemExit(f"{service.command}: {service.module} does not exist, but "
                                 f"the doc has its {begin!r} block; remove it")
            continue
        if start < 0 or stop < start or text.count(begin) != 1 or text.count(end) != 1:
            raise SystemExit(f"{service.command}: markers {begin!r} ... {end!r} not found once "
                             "each (in that order); add them where its flag reference goes")
        text = text[:start] + render(service) + text[stop + len(end):]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1, changing nothing, if the file is not up to date")
    parser.add_argument("--doc", type=Path, default=DOC, help="the file (default: %(default)s)")
    args = parser.parse_args(argv)
    text = args.doc.read_text()
    fresh = update(text)
    if args.check:
        if fresh != text:
            print(f"{args.doc} is stale: run .venv/bin/python scripts/gen_config_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    if fresh != text:
        args.doc.write_text(fresh)
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
