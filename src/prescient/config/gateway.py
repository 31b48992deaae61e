"""`GatewaySettings`: every flag of `prescient gateway`, declared once.

Flag names and defaults follow upstream Llumnix's gateway (`cmd/gateway`, reference §8.5) and,
for discovery and the CMS, the scheduler's flags, declared once in `ClusterSettings`, so one
deployment file can feed both.

Deliberate differences from upstream, each explained at its field:

- `--retry-max-count` defaults to 2 (upstream 0);
- `--llm-backend-discovery` has an `auto` default: `endpoints` when `--llm-backend-endpoints`
  is given, else upstream's `redis`;
- `--served-model-name` (vLLM's flag) lets the gateway answer 404 for unknown models itself;
- `--max-body-bytes` bounds what a client may upload;
- `--scheduler-config` tunes the embedded scheduler's policy;
- `--admin-token` opens `POST /admin/migrate` (migration by token replay, for engines that
  cannot move KV).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Annotated, ClassVar, Literal

from prescient.config.cluster import CMS, DISCOVERY, PORT, ClusterSettings
from prescient.config.settings import Setting, add_arguments, new_parser, parse_settings
from prescient.errors import ConfigError

SERVICE = "Service"
SCHEDULING = "Scheduling"
RETRY = "Retries and waiting"
REQUESTS = "Requests"
GROUPS = (SERVICE, SCHEDULING, RETRY, DISCOVERY, CMS, REQUESTS)



DESCRIPTION = ("The OpenAI-compatible gateway: schedules each request (embedded scheduler, or "
               "--scheduler-endpoints) and forwards it to the chosen instance. Each flag can "
               "also come from a --config file (key: the flag with '_' for '-') or an "
               "environment variable PRESCIENT_GATEWAY_<FLAG>. Precedence: defaults < --config < "
               "environment < flags < --extra-args.")


class GatewaySettings(ClusterSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The gateway's settings; build with `load_gateway_settings`."""

    env_prefix: ClassVar[str] = "PRESCIENT_GATEWAY_"  # PRESCIENT_GATEWAY_PORT, ...

    # --- Service ---
    host: Annotated[str, Setting(SERVICE, "Address the gateway binds.")] = "0.0.0.0"
    port: Annotated[int, Setting(SERVICE, "HTTP port.", **PORT)] = 8001
    max_body_bytes: Annotated[int, Setting(
        SERVICE, "Largest request body accepted; larger ones get 413. 32 MiB holds a "
        "128k-token prompt many times over, plus inline images; the Rust routers allow "
        "256 MiB, but every byte is held in memory and parsed.", ge=1024)] = 32 * 1024 * 1024
    backlog: Annotated[int, Setting(SERVICE, "Listen backlog.", ge=1)] = 2048
    admin_token: Annotated[str, Setting(
        SERVICE, "Bearer token the admin routes (POST /admin/migrate) require; empty: they "
        "are disabled (403).", secret=True)] = ""

    # --- Scheduling ---
    enable_full_mode_scheduling: Annotated[bool, Setting(
        SCHEDULING, "Full mode (the scheduler reads the CMS; the gateway releases a request "
        "to a remote scheduler only when forwarding failed, to its embedded one also when it "
        "finished) if true; lite mode (the gateway releases every request at completion and may "
        "/report token counts) if false. Must match the scheduler.")] = (
        True)
    scheduling_policy: Annotated[Literal["load-balance", "slo", "flood", "round-robin"], Setting(
        SCHEDULING, "Must match the scheduler's. round-robin: the gateway picks instances "
        "itself, round robin over discovery, and calls no scheduler.")] = "load-balance"
    scheduler_endpoints: Annotated[tuple[str, ...], Setting(
        SCHEDULING, "Scheduler services (host:port or http://host:port), tried in order. "
        "Empty: an embedded scheduler runs inside the gateway.", metavar="HOST:PORT,...")] = ()
    service_token: Annotated[str, Setting(
        SCHEDULING, "Sent as the Authorization header to the scheduler service.",
        secret=True)] = ""
    scheduler_config: Annotated[str, Setting(
        SCHEDULING, "A `prescient scheduler` settings file (YAML or TOML) for the embedded "
        "scheduler's policy (dispatch metrics, thresholds, ...); this gateway's scheduling, "
        "discovery and CMS flags override its values.", metavar="PATH")] = ""

    pd_disagg_protocol: Annotated[Literal["", "vllm-kvt", "vllm-mooncake"], Setting(
        SCHEDULING, "Prefill/decode disaggregation: each request is prefilled on a prefill "
        "instance (max_tokens=1, kv_transfer_params.do_remote_decode) and decoded on a decode "
        "instance given the prefill's kv_transfer_params. Empty: no disaggregation. vllm-kvt "
        "also names the prefill instance's KV-transfer address; it needs "
        "--separate-pd-scheduling.")] = ""
    separate_pd_scheduling: Annotated[bool, Setting(
        SCHEDULING, "With --pd-disagg-protocol: schedule the decode instance only after the "
        "prefill finished (pd_staged), so it lands on the then least-loaded one; false: both "
        "in one scheduling call (pd_batch).")] = False

    # --- Retries and waiting ---
    wait_scheduling_timeout: Annotated[float, Setting(
        RETRY, "How long a request waits for an instance while the scheduler answers 'none "
        "available' (429), seconds; then 503.", ge=0)] = 5.0
    wait_scheduling_retry_interval: Annotated[float, Setting(
        RETRY, "Pause between scheduling attempts while none is available, seconds.",
        gt=0)] = 1.0
    # Upstream's default is 0 (no retry). We retry twice because a request that failed before
    # its first byte (instance refused the connection, answered 5xx) costs the client nothing
    # to redo elsewhere, while an error costs it the request; two covers one dead instance plus
    # one stale choice while the scheduler has not yet seen the instance leave.
    retry_max_count: Annotated[int, Setting(
        RETRY, "Extra attempts (each re-scheduled, the failed instance avoided) when an "
        "instance fails before the response's first byte (connection refused or reset, or a "
        "5xx answer), and stream replays when it fails after (the text so far is resumed "
        "elsewhere). Upstream's default is 0.", ge=0)] = 2
    connect_timeout: Annotated[float, Setting(
        RETRY, "Connecting to an instance gives up after this long, seconds (upstream: 3).",
        gt=0)] = 3.0
    upstream_read_timeout: Annotated[float, Setting(
        RETRY, "An instance that sends no byte for this long (no response head yet, or a stream "
        "gone silent) fails the request: retried elsewhere before the first byte, ended with an "
        "SSE error after it, seconds. Upstream allows 900 s for the head and 300 s between SSE "
        "reads.", gt=0)] = 300.0

    # --- Service discovery (local round-robin and the fallback) ---
    # `auto` is ours: `prescient gateway --llm-backend-endpoints a:8000,b:8000` should just work,
    # while the documented upstream default (redis) stays the default when no endpoints are given.
    llm_backend_discovery: Annotated[Literal["auto", "redis", "etcd", "endpoints"], Setting(
        DISCOVERY, "How the gateway finds instances for its round-robin fallback (and for "
        "--scheduling-policy round-robin). auto: endpoints if --llm-backend-endpoints is given, "
        "else redis (upstream's default).")] = "auto"

    # --- Requests ---
    tokenizer_path: Annotated[str, Setting(
        REQUESTS, "Directory with the model's tokenizer.json (and chat template). Empty: an "
        "approximate built-in tokenizer (about one token per 4-5 characters).",
        metavar="PATH")] = ""
    chat_template: Annotated[str, Setting(
        REQUESTS, "A Jinja chat template file overriding the tokenizer's.", metavar="PATH")] = ""
    max_model_len: Annotated[int, Setting(
        REQUESTS, "Refuse prompts of this many tokens or more with 400 (0: no check; the "
        "engine decides).", ge=0)] = 0
    forward_tokens: Annotated[bool, Setting(
        REQUESTS, "Send the prompt's token ids to the scheduler (needed by cache-aware "
        "scheduling).")] = True
    served_model_name: Annotated[tuple[str, ...], Setting(
        REQUESTS, "Models the gateway serves: a request for another gets 404 here. Empty: "
        "any model is forwarded and the engine decides.", metavar="NAME,...")] = ()
    requests_report_duration: Annotated[float, Setting(
        REQUESTS, "Lite mode: report each streaming request's token count to the scheduler "
        "at most this often, seconds (0: never; requests are still released at the end).",
        ge=0)] = 0.0

    def __post_init__(self) -> None:
        if self.llm_backend_endpoints and self.llm_backend_discovery in ("redis", "etcd"):
            raise ConfigError(f"--llm-backend-endpoints is only read with "
                              f"--llm-backend-discovery endpoints (or auto), not "
                              f"{self.llm_backend_discovery}")
        if self.llm_backend_discovery == "endpoints" and not self.llm_backend_endpoints:
            raise ConfigError("--llm-backend-discovery endpoints needs --llm-backend-endpoints "
                              "HOST:PORT,...")
        if self.scheduling_policy == "round-robin" and self.scheduler_endpoints:
            raise ConfigError("--scheduling-policy round-robin schedules in the gateway; "
                              "--scheduler-endpoints would be ignored")
        self._check_pd()

    def _check_pd(self) -> None:
        if self.separate_pd_scheduling and not self.pd_disagg_protocol:
            raise ConfigError("--separate-pd-scheduling needs --pd-disagg-protocol "
                              "(vllm-kvt or vllm-mooncake)")
        if not self.pd_disagg_protocol:
            return
        if self.pd_disagg_protocol == "vllm-kvt" and not self.separate_pd_scheduling:
            # upstream's batch vllm-kvt sends only the decode request and lets the KV
            # connector drive the prefill remotely; no engine here plays that part
            raise ConfigError("--pd-disagg-protocol vllm-kvt needs --separate-pd-scheduling "
                              "(its single-stage batch mode is not supported)")
        if self.scheduling_policy == "round-robin":
            raise ConfigError("--pd-disagg-protocol needs a scheduler: --scheduling-policy "
                              "round-robin does not pick prefill and decode instances")

    @property
    def discovery_kind(self) -> Literal["redis", "etcd", "endpoints"]:
        """`--llm-backend-discovery` with `auto` resolved."""
        if self.llm_backend_discovery == "auto":
            return "endpoints" if self.llm_backend_endpoints else "redis"
        return self.llm_backend_discovery


def gateway_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The gateway's flags, grouped for `--help`; added to `parser` if given."""
    if parser is None:
        parser = new_parser(prog="prescient gateway", usage="prescient gateway [options]",
                            description=DESCRIPTION)
    add_arguments(GatewaySettings, parser)
    return parser


def load_gateway_settings(argv: Sequence[str], env: Mapping[str, str]) -> GatewaySettings:
    """Settings from `argv` (flags only, no subcommand) and `env`; reads only `--config`.

    Raises:
        ConfigError: naming the flag, env var, or file and key at fault.
    """
    return parse_settings(GatewaySettings, gateway_parser(), argv, env)
