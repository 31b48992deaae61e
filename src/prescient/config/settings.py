"""Declarative settings: declare each field once, derive the flag, env var, file key and help.

A settings class is a frozen `msgspec.Struct` whose fields are annotated
``Annotated[T, Setting(group, help, ...)]`` with a default. Everything else is derived:

- the flag, ``--`` + the field name with ``_`` → ``-`` (``dispatch_top_k`` → ``--dispatch-top-k``),
  unless `Setting.flag` spells it differently;
- the environment variable, ``PRESCIENT_`` + the flag upper-cased with ``-`` → ``_``
  (``PRESCIENT_DISPATCH_TOP_K``);
- the config-file key, the field name (the flag spelling without ``--`` is accepted too);
- ``--help``, one argparse group per `Setting.group`, in order of first appearance.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Literal["a", "b"]`` (a choice) and
``tuple[str | Literal[...], ...]`` (a comma-separated list).

Layers, later ones winning::

    defaults < --config FILE (YAML or TOML) < environment < command line < --extra-args

Every value, from whichever layer, is checked; a bad one raises `ConfigError` naming where it
came from (the flag, the env var, the file and key, or the ``--extra-args`` key) and what was
expected. Booleans take ``--x``, ``--x=true``, ``--x true`` and ``--x=false``
(also ``1/0``, ``yes/no``, ``on/off``). ``--extra-args`` is upstream Llumnix's override string,
``"k=v,k2=[a,b],k3='x,y'"``, whose keys are flag names.

Nothing here reads the environment or the clock: the caller passes ``env`` in; only the
``--config`` file is read from disk.
"""

from __future__ import annotations

import argparse
import functools
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import msgspec
import yaml

from prescient.errors import ConfigError

ENV_PREFIX = "PRESCIENT_"
REDACTED = "<redacted>"  # what `redacted_builtins` prints for a set secret; rejected as input

S = TypeVar("S", bound=msgspec.Struct)

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_DEPRECATED_USED = "_prescient_deprecated_flags"  # namespace attribute: alias flags seen
_SOURCE_DESTS = frozenset({"config", "extra_args"})


class DeprecatedSettingWarning(FutureWarning):
    """A deprecated flag spelling was used; the message names the replacement."""


class Setting(msgspec.Struct, frozen=True):
    """How one settings field appears to users. Type and default come from the field itself."""

    group: str  # --help section
    help: str  # one sentence, units included
    flag: str | None = None  # None: "--" + field name with "_" -> "-"
    ge: float | None = None  # inclusive lower bound (numbers)
    gt: float | None = None  # exclusive lower bound
    le: float | None = None  # inclusive upper bound
    aliases: tuple[str, ...] = ()  # deprecated flag spellings, accepted with a warning
    secret: bool = False  # never echoed back by `redacted_builtins`
    metavar: str | None = None


class Option(msgspec.Struct, frozen=True):
    """A settings field resolved: its `Setting` plus name, type, default, flag and env var."""

    name: str
    kind: Literal["bool", "int", "float", "str", "choice", "list"]
    default: Any
    setting: Setting
    flag: str
    env: str
    choices: tuple[str, ...] = ()  # for "choice", and for "list" of a Literal


class DefaultChoice(msgspec.Struct, frozen=True):
    """A default where the seed documents and upstream code disagree, and which one we took."""

    flag: str
    seed: Any  # the seed documents' value (ours)
    upstream: Any  # upstream Llumnix code's value
    why: str


def env_var(flag: str, prefix: str = ENV_PREFIX) -> str:
    """`--cms-pull-status-interval-ms` → `PRESCIENT_CMS_PULL_STATUS_INTERVAL_MS`."""
    return prefix + flag.removeprefix("--").upper().replace("-", "_")


def env_prefix(cls: type[msgspec.Struct]) -> str:
    """The class's `env_prefix` ClassVar, or `PRESCIENT_`.

    Services that run side by side on one host (gateway, scheduler, engines) declare their own
    (`PRESCIENT_GATEWAY_`), so `..._PORT` set for one never configures another.
    """
    return str(getattr(cls, "env_prefix", ENV_PREFIX))


@functools.cache
def describe(cls: type[msgspec.Struct]) -> tuple[Option, ...]:
    """Every field of `cls` as an `Option`, in declaration order (computed once per class).

    Raises:
        TypeError: a field lacks a `Setting`, a default, or has an unsupported type.
    """
    prefix = env_prefix(cls)
    return tuple(_option(f, prefix) for f in msgspec.structs.fields(cls))


def _option(field: msgspec.structs.FieldInfo, prefix: str) -> Option:
    annotation = field.type
    setting = next((m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, Setting)),
                   None)
    default = field.default
    if default is msgspec.NODEFAULT and field.default_factory is not msgspec.NODEFAULT:
        default = field.default_factory()
    if setting is None or default is msgspec.NODEFAULT:
        raise TypeError(f"settings field {field.name!r} needs Annotated[T, Setting(...)] = default")
    if field.name in _SOURCE_DESTS:
        raise TypeError(f"settings field {field.name!r}: name taken by --config/--extra-args")
    base = get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation
    kind, choices = _kind(base, field.name)
    flag = setting.flag or "--" + field.name.replace("_", "-")
    return Option(field.name, kind, default, setting, flag, env_var(flag, prefix), choices)


def _kind(base: Any, name: str) -> tuple[Any, tuple[str, ...]]:
    simple = {bool: "bool", int: "int", float: "float", str: "str"}
    if base in simple:
        return simple[base], ()
    if get_origin(base) is Literal:
        return "choice", tuple(get_args(base))
    args = get_args(base)
    if get_origin(base) is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = args[0]
        if item is str:
            return "list", ()
        if get_origin(item) is Literal:
            return "list", tuple(get_args(item))
    raise TypeError(f"settings field {name!r}: unsupported type {base!r}")


# --- the command line -------------------------------------------------------------------------


class _RaisingParser(argparse.ArgumentParser):
    """A parser whose mistakes raise `ConfigError` instead of exiting (for the pure loader)."""

    def error(self, message: str) -> Any:
        raise ConfigError(message)


class _RawValue(argparse.Action):
    """Keep the text as given: typing and checking happen later, naming the flag."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        if option_string is not None and option_string != self.option_strings[0]:
            used = getattr(namespace, _DEPRECATED_USED, ())
            setattr(namespace, _DEPRECATED_USED, (*used, option_string))


def new_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """A bare parser that raises `ConfigError` on bad usage; abbreviated flags are refused."""
    return _RaisingParser(allow_abbrev=False, **kwargs)


def add_arguments(cls: type[msgspec.Struct], parser: argparse.ArgumentParser) -> None:
    """Add `--config`, `--extra-args` and one flag per field of `cls`, grouped as declared."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML (.yaml, .yml) or TOML (.toml) file of settings, keyed by "
                             "field name; the environment and flags override it")
    parser.add_argument("--extra-args", metavar="K=V,...", default=argparse.SUPPRESS,
                        help="upstream-style overrides applied last, e.g. "
                             "\"dispatch-top-k=2,rescheduling-policies=[decode_load]\"")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in describe(cls):
        group = groups.get(opt.setting.group)
        if group is None:
            group = groups[opt.setting.group] = parser.add_argument_group(opt.setting.group)
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if opt.kind == "bool" else {}
        group.add_argument(opt.flag, *opt.setting.aliases, dest=opt.name, action=_RawValue,
                           default=argparse.SUPPRESS, metavar=_metavar(opt),
                           help=_help(opt).replace("%", "%%"), **extra)


def _metavar(opt: Option) -> str:
    if opt.setting.metavar:
        return opt.setting.metavar
    if opt.kind == "choice":
        return "{" + ",".join(opt.choices) + "}"
    return {"bool": "true|false", "int": "N", "float": "X", "str": "TEXT", "list": "A,B,..."}[
        opt.kind]


def _help(opt: Option) -> str:
    parts = [opt.setting.help]
    if opt.kind == "list" and opt.choices:
        parts.append(f"Choices: {', '.join(opt.choices)}.")
    default = format_value(opt.default) or '""'
    if opt.setting.secret and opt.default:
        default = REDACTED
    parts.append(f"[default: {default}; env {opt.env}]")
    if opt.setting.aliases:
        parts.append(f"Deprecated spelling: {', '.join(opt.setting.aliases)}.")
    return " ".join(parts)


def format_value(value: Any) -> str:
    """A value as a user would type it on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


# --- loading ----------------------------------------------------------------------------------


def parse_settings(cls: type[S], parser: argparse.ArgumentParser, argv: Sequence[str],
                   env: Mapping[str, str]) -> S:
    """Parse `argv` with `parser` (built by `add_arguments`) and resolve every layer."""
    return settings_from_namespace(cls, parser.parse_args(list(argv)), env)


def settings_from_namespace(cls: type[S], namespace: argparse.Namespace,
                            env: Mapping[str, str]) -> S:
    """Resolve defaults < config file < `env` < flags in `namespace` < `--extra-args`.

    Raises:
        ConfigError: a value, key or file is wrong; the message says which and where.
    """
    options = {opt.name: opt for opt in describe(cls)}
    values: dict[str, Any] = {name: opt.default for name, opt in options.items()}
    config = getattr(namespace, "config", None)
    if config is not None:
        values.update(_file_layer(options, Path(config)))
    values.update(_env_layer(options, env))
    for flag in getattr(namespace, _DEPRECATED_USED, ()):
        _warn_deprecated(options, flag)
    values.update({name: _coerce(opt, getattr(namespace, name), opt.flag)
                   for name, opt in options.items() if hasattr(namespace, name)})
    extra = getattr(namespace, "extra_args", None)
    if extra is not None:
        values.update(_extra_layer(options, extra))
    return cls(**values)


def _env_layer(options: Mapping[str, Option], env: Mapping[str, str]) -> dict[str, Any]:
    return {name: _coerce(opt, env[opt.env], f"environment variable {opt.env}")
            for name, opt in options.items() if opt.env in env}


def _file_layer(options: Mapping[str, Option], path: Path) -> dict[str, Any]:
    return _mapping_layer(options, read_settings_file(path), str(path))


def _mapping_layer(options: Mapping[str, Option], data: Mapping[Any, Any],
                   source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in data.items():
        opt = _lookup(options, str(key), f"{source}: unknown key {key!r}")
        out[opt.name] = _coerce(opt, raw, f"{source}: key {key!r}")
    return out


def settings_from_mapping(cls: type[S], data: Mapping[Any, Any], source: str) -> S:
    """Defaults updated by `data` (e.g. a section of a scenario file), checked like a file.

    Raises:
        ConfigError: an unknown key or bad value, named with `source`.
    """
    options = {opt.name: opt for opt in describe(cls)}
    values = {name: opt.default for name, opt in options.items()}
    values.update(_mapping_layer(options, data, source))
    return cls(**values)


def read_settings_file(path: Path) -> dict[Any, Any]:
    """The top-level mapping of a YAML or TOML file (by suffix); `ConfigError` if unreadable."""
    if path.suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"--config {path}: expected a .yaml, .yml or .toml file")
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read: {e.strerror or e}") from e
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: not valid {path.suffix[1:].upper()}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings at the top level")
    return data


def _extra_layer(options: Mapping[str, Option], text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in split_extra_args(text):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--extra-args: expected KEY=VALUE, got {item!r}")
        opt = _lookup(options, key, f"--extra-args: unknown key {key!r}")
        out[opt.name] = _coerce(opt, _unquote(raw.strip()), f"--extra-args key {key!r}")
    return out


def split_extra_args(text: str) -> list[str]:
    """Split on commas outside quotes and ``[...]``: ``"a=1,b=[x,y],c='p,q'"`` → 3 items."""
    items: list[str] = []
    current: list[str] = []
    quote, depth = "", 0
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    items.append("".join(current).strip())
    return [item for item in items if item]


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw


def _lookup(options: Mapping[str, Option], key: str, unknown: str) -> Option:
    """The option a file or `--extra-args` key names: field name, or flag without dashes."""
    name = key.removeprefix("--").replace("-", "_")
    if name in options:
        return options[name]
    for opt in options.values():
        if any(alias.removeprefix("--").replace("-", "_") == name
               for alias in opt.setting.aliases):
            _warn_deprecated(options, "--" + key.removeprefix("--"))
            return opt
    raise ConfigError(unknown)


def _warn_deprecated(options: Mapping[str, Option], used: str) -> None:
    norm = used.replace("_", "-")
    for opt in options.values():
        if norm in opt.setting.aliases:
            warnings.warn(f"{norm} is deprecated; use {opt.flag}", DeprecatedSettingWarning,
                          stacklevel=4)
            return


# --- values -----------------------------------------------------------------------------------


def _coerce(opt: Option, raw: Any, where: str) -> Any:
    """`raw` (text from a flag, env var or extra-args, or a typed file value) as `opt`'s type."""
    if raw is None:
        raise ConfigError(f"{where}: expected {_expected(opt)}, got nothing")
    value = _list_value(opt, raw, where) if opt.kind == "list" else _scalar(opt, raw, where)
    if opt.setting.secret and value == REDACTED:
        raise ConfigError(f"{where}: holds the {REDACTED} placeholder that --print-config "
                          f"writes; give the real value (or set {opt.env})")
    return value


def _scalar(opt: Option, raw: Any, where: str) -> Any:
    value = _parse_scalar(opt.kind, raw)
    if value is None or (opt.kind == "choice" and value not in opt.choices):
        raise ConfigError(f"{where}: expected {_expected(opt)}, got {format_value(raw)!r}")
    s = opt.setting
    if ((s.ge is not None and value < s.ge) or (s.gt is not None and value <= s.gt)
            or (s.le is not None and value > s.le)):
        raise ConfigError(f"{where}: expected {_expected(opt)}, got {format_value(raw)!r}")
    return value


def _parse_scalar(kind: str, raw: Any) -> Any:
    """The typed value, or None when `raw` is not one."""
    if kind in ("str", "choice"):
        return raw if isinstance(raw, str) else None
    return _PARSERS[kind](raw)


def _parse_bool(raw: Any) -> bool | None:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower() if isinstance(raw, str | int) else ""
    return True if text in _TRUE else False if text in _FALSE else None


def _parse_int(raw: Any) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    try:
        return int(raw.strip()) if isinstance(raw, str) else None
    except ValueError:
        return None


def _parse_float(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return None
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # refuse NaN


_PARSERS = {"bool": _parse_bool, "int": _parse_int, "float": _parse_float}


def _list_value(opt: Option, raw: Any, where: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        items = [_unquote(part.strip()) for part in text.split(",")]
        raw = [item for item in items if item]
    if not isinstance(raw, list | tuple) or not all(isinstance(x, str) for x in raw):
        raise ConfigError(f"{where}: expected {_expected(opt)}, got {raw!r}")
    bad = [x for x in raw if opt.choices and x not in opt.choices]
    if bad:
        raise ConfigError(f"{where}: unknown item {bad[0]!r}; expected {_expected(opt)}")
    return tuple(raw)


def _expected(opt: Option) -> str:
    if opt.kind == "choice":
        return "one of " + ", ".join(opt.choices)
    if opt.kind == "list":
        tail = f" of {', '.join(opt.choices)}" if opt.choices else ""
        return "a comma-separated list" + tail
    noun = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "text"}[
        opt.kind]
    s = opt.setting
    bounds = [f">= {_num(s.ge)}" if s.ge is not None else "",
              f"> {_num(s.gt)}" if s.gt is not None else "",
              f"<= {_num(s.le)}" if s.le is not None else ""]
    return " ".join([noun, " and ".join(b for b in bounds if b)]).strip()


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def redacted_builtins(settings: msgspec.Struct) -> dict[str, Any]:
    """The settings as plain data (tuples as lists), with every set secret as `REDACTED`."""
    data: dict[str, Any] = msgspec.to_builtins(settings)
    for opt in describe(type(settings)):
        if opt.setting.secret and data[opt.name]:
            data[opt.name] = REDACTED
    return data
