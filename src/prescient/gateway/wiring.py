"""Gateway settings to live parts: tokenizer, discovery resolver and scheduler.

The scheduler is remote when `--scheduler-endpoints` is given (`RemoteScheduler`), else
embedded (`SchedulerCore` in this process: no network hop per request). The embedded one's
settings are `prescient scheduler`'s defaults, or `--scheduler-config`'s file, with the gateway's
own scheduling, discovery and CMS flags on top (the flags both commands share mean the same).
With `--scheduling-policy round-robin` there is no scheduler at all.
"""

from __future__ import annotations

import socket
from pathlib import Path

import msgspec

from prescient.config.gateway import GatewaySettings
from prescient.config.scheduler import SchedulerSettings, load_scheduler_settings
from prescient.discovery.base import Resolver
from prescient.errors import ConfigError
from prescient.gateway.app import Gateway
from prescient.scheduler.core import SchedulerCore
from prescient.scheduler.wire import Scheduler
from prescient.tokenizer import Tokenizer, load_tokenizer

# Flags both commands have but that mean this process's own service, not the scheduler's.
_NOT_SHARED = frozenset({"host", "port", "service_token"})


def build_gateway(settings: GatewaySettings) -> Gateway:
    """Every part from settings (nothing started yet: `await gateway.start()`).

    Raises:
        ConfigError: a tokenizer, template, scheduler config or endpoint is unusable.
    """
    resolver = make_gateway_resolver(settings)
    scheduler = None if settings.scheduling_policy == "round-robin" else make_scheduler(
        settings, resolver)
    gateway_id = f"{socket.gethostname()}:{settings.port}"
    return Gateway(settings, scheduler=scheduler, resolver=resolver,
                   tokenizer=make_tokenizer(settings), gateway_id=gateway_id)


def make_tokenizer(settings: GatewaySettings) -> Tokenizer:
    tokenizer = load_tokenizer(settings.tokenizer_path or None)
    if settings.chat_template:
        if not hasattr(tokenizer, "chat_template"):
            raise ConfigError("--chat-template needs --tokenizer-path: the built-in approximate "
                              "tokenizer has a fixed template")
        try:
            tokenizer.chat_template = Path(settings.chat_template).read_text()
        except OSError as e:
            raise ConfigError(f"--chat-template {settings.chat_template}: cannot read: "
                              f"{e.strerror or e}") from e
    return tokenizer


def make_gateway_resolver(settings: GatewaySettings) -> Resolver:
    from prescient.discovery.factory import make_resolver

    return make_resolver(msgspec.structs.replace(
        settings, llm_backend_discovery=settings.discovery_kind))


def make_scheduler(settings: GatewaySettings, resolver: Resolver) -> Scheduler:
    """`RemoteScheduler` for `--scheduler-endpoints`, else an embedded `SchedulerCore` (which
    shares the gateway's resolver in lite mode and reads the CMS in full mode)."""
    if settings.scheduler_endpoints:
        from prescient.scheduler.client import RemoteScheduler

        return RemoteScheduler(settings.scheduler_endpoints,
                               service_token=settings.service_token)
    # full mode: the core builds its CMS store from the shared --cms-redis-* flags
    return SchedulerCore(embedded_scheduler_settings(settings), resolver=resolver)


def embedded_scheduler_settings(settings: GatewaySettings) -> SchedulerSettings:
    """`--scheduler-config` (or the defaults) overridden by the flags both commands share."""
    base = (load_scheduler_settings(["--config", settings.scheduler_config], {})
            if settings.scheduler_config else SchedulerSettings())
    shared = ({f.name for f in msgspec.structs.fields(GatewaySettings)}
              & {f.name for f in msgspec.structs.fields(SchedulerSettings)}) - _NOT_SHARED
    values = {name: getattr(settings, name) for name in shared}
    values["llm_backend_discovery"] = settings.discovery_kind
    return msgspec.structs.replace(base, **values)
