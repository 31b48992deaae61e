"""`LlumletSettings`: every flag of `prescient llumlet`, declared once.

The standalone llumlet sits beside a stock vLLM or SGLang server and registers it in the CMS.
Its CMS and heartbeat flags are `prescient sim-engine`'s (`--cms-redis-*`, `--cms-ttl-s`,
`--llumlet-metadata-push-interval-s`, `--instance-id`, `--instance-type`, `--advertise-host`),
so the two kinds of instance are deployed alike. The rest describe the engine it watches.

Deliberate choices:

- `--scrape-interval-ms` defaults to 200: below the scheduler's default 500 ms status poll, so
  every poll finds a newer status, while the engine's API server renders `/metrics` only five
  times a second. A stock engine pushes nothing, so this is also the status period.
- `--scrape-timeout-ms` defaults to 2000, ten intervals: a busy API server answers late but
  should not be marked unschedulable for it; a hung one is within two seconds.
- `--advertise-host` and `--api-server-port` default to the host and port of `--engine-url`,
  which suits a llumlet on the engine's host only when that URL uses an address the gateway
  can reach (not 127.0.0.1); a wildcard host (0.0.0.0) must be replaced explicitly.
- `--backend-type` vLLM registers upstream's `"vLLM v1"`; SGLang registers `"SGLang"`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Annotated, ClassVar, Literal
from urllib.parse import SplitResult, urlsplit

import msgspec

from prescient.config.settings import Setting, add_arguments, new_parser, parse_settings
from prescient.errors import ConfigError

ENGINE = "Engine"
INSTANCE = "Instance (CMS metadata)"
CMS = "CMS"
GROUPS = (ENGINE, INSTANCE, CMS)

_PORT = {"ge": 1, "le": 65535}
# what each backend calls itself in the CMS (upstream's strings) and its default KV block size
BACKEND_NAMES = {"vLLM": "vLLM v1", "SGLang": "SGLang"}
DEFAULT_BLOCK_SIZES = {"vLLM": 16, "SGLang": 1}  # vLLM --block-size, SGLang --page-size
_WILDCARDS = frozenset({"0.0.0.0", "::"})

DESCRIPTION = ("A llumlet for a stock vLLM or SGLang server: registers the instance in the CMS "
               "and writes a status scraped from the server's /metrics (running and waiting "
               "requests, KV usage) every --scrape-interval-ms, or the per-step status pushed "
               "by Prescient's vLLM plugin (--status-endpoint); marks it unschedulable while "
               "the engine is silent and scrapes fail, and deletes its keys on SIGTERM. Each "
               "flag can also come from a --config file or an environment variable "
               "PRESCIENT_LLUMLET_<FLAG>.")


class LlumletSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The standalone llumlet's settings; build with `load_llumlet_settings`."""

    env_prefix: ClassVar[str] = "PRESCIENT_LLUMLET_"

    # --- Engine ---
    engine_url: Annotated[str, Setting(
        ENGINE, "The engine's HTTP base URL; its /metrics is scraped.",
        metavar="http://HOST:PORT")] = "http://127.0.0.1:8000"
    backend_type: Annotated[Literal["vLLM", "SGLang"], Setting(
        ENGINE, "The engine's kind (SGLang needs --enable-metrics).")] = "vLLM"
    scrape_interval_ms: Annotated[int, Setting(
        ENGINE, "Scrape /metrics and write the status this often, ms.", gt=0)] = 200
    scrape_timeout_ms: Annotated[int, Setting(
        ENGINE, "A scrape slower than this fails (the instance turns unschedulable), ms.",
        gt=0)] = 2000
    status_endpoint: Annotated[str, Setting(
        ENGINE, "ZMQ endpoint where Prescient's vLLM plugin pushes the engine's status at "
        "every step (the engine's PRESCIENT_STATUS_ENDPOINT, which the plugin binds), e.g. "
        "ipc:///tmp/prescient-8000.ipc; empty: /metrics scrapes only. While the engine "
        "pushes, nothing is scraped.",
        metavar="ENDPOINT")] = ""
    num_gpu_tokens: Annotated[int, Setting(
        ENGINE, "KV capacity in tokens; 0: from /metrics (vllm:cache_config_info, "
        "sglang:max_total_num_tokens). Needed for KV token counts when /metrics lacks it.",
        ge=0)] = 0

    # --- Instance (CMS metadata) ---
    instance_id: Annotated[str, Setting(
        INSTANCE, "Instance id in the CMS; empty: ADVERTISE_HOST:API_SERVER_PORT.")] = ""
    instance_type: Annotated[Literal["neutral", "prefill", "decode"], Setting(
        INSTANCE, "What the instance does, as registered in the CMS.")] = "neutral"
    advertise_host: Annotated[str, Setting(
        INSTANCE, "Address the gateway reaches the engine at (the metadata's ip); empty: "
        "--engine-url's host.")] = ""
    api_server_port: Annotated[int, Setting(
        INSTANCE, "Port the gateway reaches the engine at; 0: --engine-url's port.",
        ge=0, le=65535)] = 0
    block_size: Annotated[int, Setting(
        INSTANCE, "Tokens per KV block (vLLM --block-size, SGLang --page-size); 0: the "
        "backend's default (vLLM 16, SGLang 1).", ge=0)] = 0
    max_num_seqs: Annotated[int, Setting(
        INSTANCE, "The engine's running-request limit (vLLM --max-num-seqs, SGLang "
        "--max-running-requests), registered in the metadata so that predictor-enhanced "
        "scheduling starts queued prompts only as slots free; 0: unknown.", ge=0)] = 0

    # --- CMS ---
    cms_redis_host: Annotated[str, Setting(CMS, "CMS Redis host.")] = "127.0.0.1"
    cms_redis_port: Annotated[int, Setting(CMS, "CMS Redis port.", **_PORT)] = 6379
    cms_redis_db: Annotated[int, Setting(CMS, "CMS Redis database.", ge=0)] = 0
    cms_redis_username: Annotated[str, Setting(CMS, "CMS Redis username.")] = ""
    cms_redis_password: Annotated[str, Setting(CMS, "CMS Redis password.", secret=True)] = ""
    llumlet_metadata_push_interval_s: Annotated[float, Setting(
        CMS, "Metadata re-written (heartbeat) this often, seconds "
        "(LLUMNIX_METADATA_PUSH_INTERVAL).", gt=0)] = 20.0
    cms_ttl_s: Annotated[float, Setting(
        CMS, "Expiry of the CMS keys, seconds; 0: none (LLUMNIX_CMS_EXPIRED_TIME).",
        ge=0)] = 100.0

    def __post_init__(self) -> None:
        parts = _engine_url_parts(self.engine_url)
        if not self.advertise_host and parts.hostname in _WILDCARDS:
            raise ConfigError(f"--advertise-host is needed: --engine-url's host "
                              f"{parts.hostname} is not an address the gateway can reach")
        ttl = self.cms_ttl_s
        if ttl and ttl <= max(self.scrape_interval_ms / 1000,
                              self.llumlet_metadata_push_interval_s):
            raise ConfigError(f"--cms-ttl-s ({ttl:g}) must exceed --scrape-interval-ms and "
                              "--llumlet-metadata-push-interval-s, or the CMS keys expire "
                              "between writes")

    @property
    def metrics_url(self) -> str:
        return self.engine_url.rstrip("/") + "/metrics"

    @property
    def resolved_advertise_host(self) -> str:
        return self.advertise_host or (urlsplit(self.engine_url).hostname or "")

    @property
    def resolved_api_server_port(self) -> int:
        if self.api_server_port:
            return self.api_server_port
        parts = urlsplit(self.engine_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def resolved_instance_id(self) -> str:
        return self.instance_id or (f"{self.resolved_advertise_host}:"
                                    f"{self.resolved_api_server_port}")

    @property
    def resolved_block_size(self) -> int:
        return self.block_size or DEFAULT_BLOCK_SIZES[self.backend_type]


def _engine_url_parts(url: str) -> SplitResult:
    """`url` split, if it is a server's base URL (scheme, host, optional port, no path)."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (a port that is not a number raises ValueError)
    except ValueError:
        parts = parts._replace(scheme="")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in (
            "", "/") or parts.query:
        raise ConfigError(f"--engine-url: {url!r} is not a base URL like http://HOST:PORT")
    return parts


def llumlet_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The llumlet's flags, grouped for `--help`; added to `parser` if given."""
    if parser is None:
        parser = new_parser(prog="prescient llumlet", usage="prescient llumlet [options]",
                            description=DESCRIPTION)
    add_arguments(LlumletSettings, parser)
    return parser


def load_llumlet_settings(argv: Sequence[str], env: Mapping[str, str]) -> LlumletSettings:
    """Settings from `argv` (flags only, no subcommand) and `env`; reads only `--config`.

    Raises:
        ConfigError: naming the flag, env var, or file and key at fault.
    """
    return parse_settings(LlumletSettings, llumlet_parser(), argv, env)
