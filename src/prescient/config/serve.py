"""`ServeSettings`: every flag of `prescient serve`, declared once.

`prescient serve` is the whole stack in one process for trying Prescient out: the gateway with
its embedded full-mode scheduler, an in-memory CMS, and `--num-engines` simulated engines. Its
flags are the few a first run needs; they keep the names the multi-process commands give them
(`prescient gateway`'s `--scheduling-policy` and `--scheduler-config`, `prescient sim-engine`'s
`--preset`, `--time-scale`, `--model` and `--tokenizer`), so moving to the separate services
later changes no spelling. Anything else the scheduler takes goes in `--scheduler-config`.

Deliberate choices:

- `--host` defaults to 127.0.0.1 (the gateway and engines of `prescient gateway` and
  `prescient sim-engine` bind 0.0.0.0): a demo should not be reachable from the network unless
  asked.
- `--port` defaults to 8000, vLLM's port, so a client written against vLLM just works.
- `--cms-pull-status-interval-ms` defaults to 50 (the scheduler's is 500): reading an in-memory
  CMS is a dict lookup, not a Redis round trip, so polling at about the llumlets' 40 ms push
  rate costs nothing and the scheduler sees loads almost as they change.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Annotated, ClassVar, Literal

import msgspec

from prescient.config.presets import get_preset, preset_names
from prescient.config.settings import Setting, add_arguments, new_parser, parse_settings
from prescient.errors import ConfigError

SERVICE = "Service"
ENGINES = "Simulated engines"
SCHEDULING = "Scheduling"
GROUPS = (SERVICE, ENGINES, SCHEDULING)

MAX_ENGINES = 64  # each engine is a task and a socket in this one process

DESCRIPTION = ("Everything in one process: the OpenAI-compatible gateway (embedded full-mode "
               "scheduler), an in-memory CMS, and --num-engines simulated vLLM engines, each on "
               "its own loopback port. Each flag can also come from a --config file or an "
               "environment variable PRESCIENT_SERVE_<FLAG>.")


class ServeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`prescient serve`'s settings; build with `load_serve_settings`."""

    env_prefix: ClassVar[str] = "PRESCIENT_SERVE_"  # PRESCIENT_SERVE_PORT, ...

    # --- Service ---
    host: Annotated[str, Setting(
        SERVICE, "Address the gateway binds (the engines always bind 127.0.0.1).")] = (
        "127.0.0.1")
    port: Annotated[int, Setting(SERVICE, "The gateway's HTTP port.", ge=1, le=65535)] = 8000
    model: Annotated[str, Setting(
        SERVICE, "Model name served; requests naming another model get 404.")] = (
        "prescient-sim")
    tokenizer: Annotated[str, Setting(
        SERVICE, "Directory with tokenizer.json (and a chat template), used by the gateway and "
        "the engines; empty: the built-in approximate tokenizer.", metavar="PATH")] = ""

    # --- Simulated engines ---
    num_engines: Annotated[int, Setting(
        ENGINES, "Simulated engines to run.", ge=1, le=MAX_ENGINES)] = 2
    preset: Annotated[str, Setting(
        ENGINES, "Model-on-GPU preset of every engine: step-time model and KV capacity; one "
        "of " + ", ".join(preset_names()) + ".")] = "llama3-8b-h100"
    time_scale: Annotated[float, Setting(
        ENGINES, "Simulated seconds per wall second: 1 is real time, 10 runs ten times "
        "faster.", gt=0)] = 1.0

    # --- Scheduling ---
    scheduling_policy: Annotated[Literal["load-balance", "slo", "flood", "round-robin"], Setting(
        SCHEDULING, "The scheduler's dispatch policy. round-robin: the gateway cycles through "
        "the engines itself. slo needs profiling data files in --scheduler-config.")] = (
        "load-balance")
    scheduler_config: Annotated[str, Setting(
        SCHEDULING, "A `prescient scheduler` settings file (YAML or TOML) for the embedded "
        "scheduler (dispatch metrics, thresholds, ...); the flags here override its values.",
        metavar="PATH")] = ""
    cms_pull_status_interval_ms: Annotated[int, Setting(
        SCHEDULING, "How often the scheduler reads the engines' statuses from the in-memory "
        "CMS, ms. Lower than the scheduler's 500: an in-memory read is cheap.", gt=0)] = 50

    def __post_init__(self) -> None:
        try:
            get_preset(self.preset)
        except ConfigError as e:
            raise ConfigError(f"--preset: {e}") from None


def serve_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`prescient serve`'s flags, grouped for `--help`; added to `parser` if given."""
    if parser is None:
        parser = new_parser(prog="prescient serve", usage="prescient serve [options]",
                            description=DESCRIPTION)
    add_arguments(ServeSettings, parser)
    return parser


def load_serve_settings(argv: Sequence[str], env: Mapping[str, str]) -> ServeSettings:
    """Settings from `argv` (flags only, no subcommand) and `env`; reads only `--config`.

    Raises:
        ConfigError: naming the flag, env var, or file and key at fault.
    """
    return parse_settings(ServeSettings, serve_parser(), argv, env)
