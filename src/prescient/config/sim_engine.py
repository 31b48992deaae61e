"""`SimEngineSettings`: every flag of `prescient sim-engine`, declared once.

The simulated engine stands in for a vLLM instance, so its engine flags take vLLM's names
(`--max-num-seqs`, `--max-num-batched-tokens`, `--max-model-len`, `--num-gpu-blocks-override`
is `--num-gpu-blocks` here); its built-in llumlet takes upstream Llumnix's environment
settings as flags (`LLUMNIX_STATUS_PUSH_INTERVAL` -> `--llumlet-status-push-interval-s`,
`LLUMNIX_CMS_EXPIRED_TIME` -> `--cms-ttl-s`, ...) and the scheduler's `--cms-redis-*` names.

Deliberate choices:

- `--max-model-len` defaults to 8192 (Llama 3's context) rather than the engine's 131072,
  because this engine never samples EOS: a request without `max_tokens` runs to its limit.
- `--default-max-tokens` bounds such requests further (256); 0 restores vLLM's rule, the
  whole remaining context.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Annotated, ClassVar, Literal

import msgspec

from prescient.cache.hashing import VllmHashAlgo
from prescient.config.presets import get_preset, preset_names
from prescient.config.settings import Setting, add_arguments, new_parser, parse_settings
from prescient.errors import ConfigError

SERVICE = "Service"
ENGINE = "Engine"
LLUMLET = "Llumlet (full-mode CMS)"
GROUPS = (SERVICE, ENGINE, LLUMLET)

_PORT = {"ge": 1, "le": 65535}

DESCRIPTION = ("A simulated vLLM instance in real time behind vLLM's OpenAI API: step times and "
               "KV capacity come from --preset; tokens are pseudo-text. With --enable-llumlet "
               "it also writes its metadata and status to the CMS like a Llumnix llumlet. Each "
               "flag can also come from a --config file or an environment variable "
               "PRESCIENT_SIM_ENGINE_<FLAG>.")


class SimEngineSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The sim-engine server's settings; build with `load_sim_engine_settings`."""

    env_prefix: ClassVar[str] = "PRESCIENT_SIM_ENGINE_"

    # --- Service ---
    host: Annotated[str, Setting(SERVICE, "Address the API server binds.")] = "0.0.0.0"
    port: Annotated[int, Setting(SERVICE, "HTTP port.", **_PORT)] = 8000
    model: Annotated[str, Setting(
        SERVICE, "Model name served; requests naming another model get 404.")] = "prescient-sim"
    tokenizer: Annotated[str, Setting(
        SERVICE, "Directory with tokenizer.json (and a chat template); empty: the built-in "
        "approximate tokenizer.", metavar="PATH")] = ""
    instance_id: Annotated[str, Setting(
        SERVICE, "Instance id in the CMS and in statuses; empty: sim-<port>.")] = ""
    instance_type: Annotated[Literal["neutral", "prefill", "decode"], Setting(
        SERVICE, "What the instance does, as registered in the CMS.")] = "neutral"
    advertise_host: Annotated[str, Setting(
        SERVICE, "Address the gateway reaches this server at (the CMS metadata's ip).")] = (
        "127.0.0.1")
    time_scale: Annotated[float, Setting(
        SERVICE, "Simulated seconds per wall second: 1 is real time, 10 runs ten times "
        "faster.", gt=0)] = 1.0
    default_max_tokens: Annotated[int, Setting(
        SERVICE, "Output tokens of a request without max_tokens (capped by the remaining "
        "context); 0: the whole remaining context, as vLLM.", ge=0)] = 256

    # --- Engine ---
    preset: Annotated[str, Setting(
        ENGINE, "Model-on-GPU preset: step-time model and KV capacity; one of "
        + ", ".join(preset_names()) + ".")] = "llama3-8b-h100"
    num_gpu_blocks: Annotated[int, Setting(
        ENGINE, "KV capacity in blocks; 0: the preset's.", ge=0)] = 0
    block_size: Annotated[int, Setting(
        ENGINE, "Tokens per KV block; 0: the preset's.", ge=0)] = 0
    max_num_seqs: Annotated[int, Setting(ENGINE, "Running requests at most.", ge=1)] = 256
    max_num_batched_tokens: Annotated[int, Setting(
        ENGINE, "Tokens scheduled per step at most (chunked prefill).", ge=1)] = 8192
    max_model_len: Annotated[int, Setting(
        ENGINE, "Prompt plus output tokens at most.", ge=2)] = 8192
    batching: Annotated[Literal["vllm", "lens"], Setting(
        ENGINE, "Token budget per step: vLLM's fixed --max-num-batched-tokens, or NexusSched's "
        "LENS (steps aimed at 15 ms with nothing waiting, rising to 50 ms at 5 waiting; "
        "chunks of at most 512 tokens).")] = "vllm"
    enable_prefix_caching: Annotated[bool, Setting(
        ENGINE, "Share KV blocks of identical prompt prefixes.")] = True
    enable_profiling: Annotated[bool, Setting(
        ENGINE, "Export prefill step-time samples in the status (LLUMNIX_ENABLE_PROFILING), "
        "for predictor-enhanced scheduling.")] = False
    profiling_steps: Annotated[int, Setting(
        ENGINE, "Profiling samples exported at most (LLUMNIX_PROFILING_STEPS).", ge=1)] = 50

    prefix_caching_hash_algo: Annotated[VllmHashAlgo, Setting(
        ENGINE, "With KV events: vLLM's hash of token-id prompts' blocks (the root is "
        "H(PYTHONHASHSEED); unset, 'vllm-none-hash' for sha256 and a random one for xxhash, as "
        "in vLLM 0.32).")] = "sha256"
    kv_events_config: Annotated[str, Setting(
        ENGINE, "Publish the prefix cache's changes as vLLM does: vLLM's KVEventsConfig JSON, "
        'e.g. \'{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": '
        '"tcp://*:5557", "replay_endpoint": "tcp://*:5558"}\'; served at GET '
        "/kv_event_sources. Empty: none.", metavar="JSON")] = ""

    kv_transfer_bandwidth_gb_s: Annotated[float, Setting(
        ENGINE, "P/D disaggregation: a decode instance given a request with "
        "kv_transfer_params.do_remote_prefill waits for the prompt's KV (the preset's bytes "
        "per token) to cross a link this fast, GB/s (25: 200 Gb/s RDMA), instead of "
        "prefilling it. Migrated requests' KV crosses the same link.", gt=0)] = 25.0

    # --- Llumlet ---
    enable_llumlet: Annotated[bool, Setting(
        LLUMLET, "Register in the CMS and push statuses there, as a Llumnix llumlet.")] = False
    cms_redis_host: Annotated[str, Setting(LLUMLET, "CMS Redis host.")] = "127.0.0.1"
    cms_redis_port: Annotated[int, Setting(LLUMLET, "CMS Redis port.", **_PORT)] = 6379
    cms_redis_db: Annotated[int, Setting(LLUMLET, "CMS Redis database.", ge=0)] = 0
    cms_redis_username: Annotated[str, Setting(LLUMLET, "CMS Redis username.")] = ""
    cms_redis_password: Annotated[str, Setting(
        LLUMLET, "CMS Redis password.", secret=True)] = ""
    llumlet_status_push_interval_s: Annotated[float, Setting(
        LLUMLET, "Newest engine status written to the CMS this often, seconds "
        "(LLUMNIX_STATUS_PUSH_INTERVAL).", gt=0)] = 0.04
    llumlet_metadata_push_interval_s: Annotated[float, Setting(
        LLUMLET, "Metadata re-written (heartbeat) this often, seconds "
        "(LLUMNIX_METADATA_PUSH_INTERVAL).", gt=0)] = 20.0
    cms_ttl_s: Annotated[float, Setting(
        LLUMLET, "Expiry of the CMS keys, seconds; 0: none (LLUMNIX_CMS_EXPIRED_TIME).",
        ge=0)] = 100.0
    llumlet_port: Annotated[int, Setting(
        LLUMLET, "Serve the llumlet's gRPC service (Migrate, MigrateIn, Abort...: live "
        "migration; upstream's llumlet_server.proto) on this port, registered as the "
        "metadata's llumlet_port and kvt_port; 0: no migration.", ge=0, le=65535)] = 0
    llumlet_engine_timeout_s: Annotated[float, Setting(
        LLUMLET, "Engine silence after which the llumlet pulls a status itself, seconds "
        "(LLUMNIX_ENGINE_GET_STATUS_TIMEOUT).", gt=0)] = 30.0

    def __post_init__(self) -> None:
        from prescient.simengine.kv_publisher import parse_kv_events_config

        parse_kv_events_config(self.kv_events_config)
        try:
            get_preset(self.preset)
        except ConfigError as e:
            raise ConfigError(f"--preset: {e}") from None
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be "
                              f">= --max-num-seqs ({self.max_num_seqs}): every decode runs")
        ttl = self.cms_ttl_s
        if ttl and ttl <= max(self.llumlet_status_push_interval_s,
                              self.llumlet_metadata_push_interval_s,
                              self.llumlet_engine_timeout_s):
            raise ConfigError(f"--cms-ttl-s ({ttl:g}) must exceed the llumlet's push intervals "
                              "and engine timeout, or the CMS keys expire between writes")

    @property
    def resolved_instance_id(self) -> str:
        return self.instance_id or f"sim-{self.port}"


def sim_engine_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The sim-engine's flags, grouped for `--help`; added to `parser` if given."""
    if parser is None:
        parser = new_parser(prog="prescient sim-engine", usage="prescient sim-engine [options]",
                            description=DESCRIPTION)
    add_arguments(SimEngineSettings, parser)
    return parser


def load_sim_engine_settings(argv: Sequence[str], env: Mapping[str, str]) -> SimEngineSettings:
    """Settings from `argv` (flags only, no subcommand) and `env`; reads only `--config`.

    Raises:
        ConfigError: naming the flag, env var, or file and key at fault.
    """
    return parse_settings(SimEngineSettings, sim_engine_parser(), argv, env)
