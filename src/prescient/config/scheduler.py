"""`SchedulerSettings`: every flag of the Llumnix scheduler, declared once.

Flag names and defaults are the seed scheduler configuration guide's. Where only upstream code
gives a default (`cmd/config/config.go`), that one is used. Where the guide and the code disagree,
the guide wins and `DEFAULT_CHOICES` records both values and why; the docs render that table.

The flag, env var (``PRESCIENT_SCHEDULER_<FLAG>``), config-file key (the field name) and
``--help`` text of each field are derived by `prescient.config.settings`. Units are in the flag
names (``_ms``, ``_s``, ``_seconds``) or the help text. The groups follow the guide's order.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Annotated, ClassVar, Literal

from prescient.cache.hashing import DEFAULT_NONE_HASH_SEED, VllmHashAlgo
from prescient.config.cluster import CMS, DISCOVERY, PORT, ClusterSettings
from prescient.config.settings import (
    DefaultChoice,
    Setting,
    add_arguments,
    new_parser,
    parse_settings,
)
from prescient.errors import ConfigError

POLICY = "Policy framework"
CACHE = "Cache-aware scheduling"
PREDICTOR = "Predictor-enhanced scheduling"
SLO = "SLO-aware scheduling"
ADAPTIVE_PD = "Adaptive PD scheduling"
RESCHEDULER = "Rescheduler"
GRPC = "gRPC"
SERVICE = "Service"
GROUPS = (DISCOVERY, CMS, POLICY, CACHE, PREDICTOR, SLO, ADAPTIVE_PD, RESCHEDULER, GRPC, SERVICE)

LoadMetric = Literal[
    "all_prefills_tokens_num", "kv_cache_usage_ratio_projected", "decode_batch_size",
    "num_waiting_requests", "all_decodes_tokens_num", "cache_aware_all_prefills_tokens_num",
    "kv_cache_hit_len", "num_requests", "num_tokens", "predicted_ttft", "predicted_tpot",
    "predicted_decode_tokens",
]
ReschedulingPolicy = Literal[
    "decode_load", "neutral_load", "prefill_failover", "decode_failover", "neutral_failover",
    "binpacking_mitigation", "binpacking_consolidation",
]




class SchedulerSettings(ClusterSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The scheduler service's settings; build with `load_scheduler_settings`."""

    env_prefix: ClassVar[str] = "PRESCIENT_SCHEDULER_"

    # --- Service discovery and full-mode CMS: declared in ClusterSettings ---

    # --- Policy framework ---
    enable_full_mode_scheduling: Annotated[bool, Setting(
        POLICY, "Full mode (CMS, white-box engines) if true; lite mode if false. Advanced "
        "features need full mode.")] = True
    scheduling_policy: Annotated[Literal["load-balance", "slo", "flood", "round-robin"], Setting(
        POLICY, "Dispatch policy; lite mode allows only load-balance.")] = "load-balance"
    dispatch_top_k: Annotated[int, Setting(
        POLICY, "Pick at random among the k best instances.", ge=1)] = 1
    dispatch_prefill_load_metric: Annotated[LoadMetric, Setting(
        POLICY, "Load metric for prefill instances.")] = "all_prefills_tokens_num"
    dispatch_prefill_load_threshold: Annotated[float, Setting(
        POLICY, "Soft limit on the prefill load metric.", ge=0)] = 2048.0
    dispatch_decode_load_metric: Annotated[LoadMetric, Setting(
        POLICY, "Load metric for decode instances.")] = "kv_cache_usage_ratio_projected"
    dispatch_decode_load_threshold: Annotated[float, Setting(
        POLICY, "Soft limit on the decode load metric.", ge=0)] = 1.0
    dispatch_neutral_load_metric: Annotated[LoadMetric, Setting(
        POLICY, "Load metric for neutral (non-PD) instances.")] = "all_prefills_tokens_num"
    dispatch_neutral_load_threshold: Annotated[float, Setting(
        POLICY, "Soft limit on the neutral load metric.", ge=0)] = 8192.0
    enable_instance_status_local_account: Annotated[bool, Setting(
        POLICY, "Add the scheduler's own in-flight dispatches to polled statuses.")] = True
    request_local_account_staleness_seconds: Annotated[int, Setting(
        POLICY, "Drop an in-flight dispatch from the account after this long, seconds.",
        gt=0)] = 10
    allow_concurrent_scheduling: Annotated[bool, Setting(
        POLICY, "Schedule requests concurrently instead of one at a time.")] = False
    separate_pd_scheduling: Annotated[bool, Setting(
        POLICY, "Schedule prefill and decode instances in separate steps (staged PD).")] = False
    multi_model_support: Annotated[bool, Setting(
        POLICY, "Serve several models: candidates are the request's model's instances.")] = False
    failover_domain: Annotated[Literal["instance", "node", "instance-unit", "node-unit"], Setting(
        POLICY, "Failure domain excluded after a failure.")] = "instance"
    instance_staleness_seconds: Annotated[int, Setting(
        POLICY, "An instance whose status is older than this is stale, seconds.", gt=0)] = 60

    # --- Cache-aware scheduling ---
    enable_cache_aware_scheduling: Annotated[bool, Setting(
        CACHE, "Prefer instances holding the prompt's prefix (full mode only).")] = False
    cache_aware_scheduling_min_tokens: Annotated[int, Setting(
        CACHE, "Shortest prompt, in tokens, that triggers cache-aware logic.", ge=0)] = 1024
    dispatch_prefill_cache_locality_metric: Annotated[
        Literal["cache_aware_all_prefills_tokens_num", "kv_cache_hit_len"], Setting(
            CACHE, "Primary metric for prefill and neutral instances when cache-aware.")] = (
        "cache_aware_all_prefills_tokens_num")
    cache_index: Annotated[Literal["approximate", "kv-events", "mooncake"], Setting(
        CACHE, "Where prefix hits come from: approximate (the router's own history), "
        "kv-events (the engines' KV events over ZMQ, found at each instance's "
        "GET /kv_event_sources), or mooncake (the KV store's metadata service, --kvs-*).")] = (
        "approximate")
    cache_index_ttl_s: Annotated[float, Setting(
        CACHE, "approximate: a routed prefix counts as cached on its instance this long, "
        "seconds (Dynamo's 120; inf: until evicted by --cache-index-max-blocks).", gt=0)] = 120.0
    cache_index_max_blocks: Annotated[int, Setting(
        CACHE, "approximate and kv-events: blocks indexed at most; the least recently stored "
        "are forgotten first.", ge=1)] = 1_000_000
    cache_aware_miss_weight: Annotated[float, Setting(
        CACHE, "What a prompt token missing from an instance's cache counts against a queued "
        "one in cache_aware_all_prefills_tokens_num (upstream: 1), on an idle cluster.",
        gt=0)] = 2.0
    cache_aware_backlog_tokens: Annotated[float, Setting(
        CACHE, "The miss weight grows by --cache-aware-miss-weight for each this many prefill "
        "tokens queued per instance on average (recomputing a prefix delays the whole "
        "backlog); inf: a fixed weight.", gt=0)] = 4096.0
    cache_aware_load_requests: Annotated[float, Setting(
        CACHE, "On each instance the miss weight is multiplied by 1 + its in-flight requests "
        "/ this many (a missed prefix's prefill stalls every request there; SGLang's lmetric "
        "multiplies by in-flight + 1); inf: the same weight on every instance.",
        gt=0)] = 64.0
    cache_aware_balance_abs_threshold: Annotated[float, Setting(
        CACHE, "Balance guard: drop instances with this many more in-flight requests than the "
        "least loaded (and --cache-aware-balance-rel-threshold times as many); inf: off.",
        ge=0)] = 64.0
    cache_aware_balance_rel_threshold: Annotated[float, Setting(
        CACHE, "Balance guard: the ratio to the least loaded instance's in-flight requests.",
        ge=1)] = 1.5
    prefix_caching_hash_algo: Annotated[VllmHashAlgo, Setting(
        CACHE, "kv-events: the engines' --prefix-caching-hash-algo (vLLM's default sha256).")] = (
        "sha256")
    prefix_caching_hash_seed: Annotated[str, Setting(
        CACHE, "kv-events: the engines' PYTHONHASHSEED, the root of vLLM's block-hash chain. "
        "With it unset, vLLM (0.32) roots sha256 / sha256_cbor at 'vllm-none-hash' (this "
        "default) and xxhash at a random value no router can match: set PYTHONHASHSEED on "
        "every engine to this value then.")] = DEFAULT_NONE_HASH_SEED
    prefix_caching_block_size: Annotated[int, Setting(
        CACHE, "kv-events: the engines' --block-size; 0: learned from their BlockStored "
        "events, else the CMS metadata's block_size, else vLLM's 16.", ge=0)] = 0
    kv_events_endpoints: Annotated[str, Setting(
        CACHE, "kv-events: publishers by instance instead of asking GET /kv_event_sources: "
        "'<instance>=<endpoint>[|<replay endpoint>],...'; others are still asked.",
        metavar="ID=ENDPOINT[|REPLAY],...")] = ""
    kvs_backend: Annotated[Literal["mooncake", "v6d"], Setting(
        CACHE, "KV store metadata service backend.")] = "mooncake"
    kvs_hash_algo: Annotated[Literal["sha256_cbor", "sha256_hex", "xxhash"], Setting(
        CACHE, "Hash of prompt chunks; must match the KV store's. sha256_cbor's root seed is "
        "--kvs-hash-seed.")] = "sha256_cbor"
    kvs_hash_seed: Annotated[str, Setting(
        CACHE, "Root seed of the sha256_cbor chunk keys (upstream's env GO_HASH_SEED, default "
        "0); it must match what the KV store's writers use.")] = "0"
    kvs_chunk_size: Annotated[int, Setting(CACHE, "Tokens per hashed chunk.", ge=1)] = 256
    kvs_enable_save_unfull_chunk: Annotated[bool, Setting(
        CACHE, "Also hash the last incomplete chunk.")] = False
    kvs_iris_meta_prefix: Annotated[str, Setting(CACHE, "v6d key prefix.")] = "iris."
    kvs_vllm_block_prefix: Annotated[str, Setting(
        CACHE, "v6d block key prefix.")] = "block.hash.key."
    kvs_retry_times: Annotated[int, Setting(
        CACHE, "Metadata service attempts before it is marked down.", ge=1)] = 5
    kvs_retry_interval_ms: Annotated[int, Setting(
        CACHE, "Pause between metadata service attempts, ms.", ge=0)] = 100
    kvs_metadata_service_down_duration_s: Annotated[int, Setting(
        CACHE, "How long a failing metadata service is skipped, seconds.", ge=0)] = 30
    kvs_metadata_service_http_server_host: Annotated[str, Setting(
        CACHE, "Metadata service HTTP host.")] = "0.0.0.0"
    kvs_metadata_service_http_server_port: Annotated[int, Setting(
        CACHE, "Metadata service HTTP port.", **PORT)] = 9003

    # --- Predictor-enhanced scheduling ---
    enable_predictor_enhanced_scheduling: Annotated[bool, Setting(
        PREDICTOR, "Subtract predicted prefill progress since the last status (full mode).")] = (
        False)
    max_num_batched_tokens: Annotated[int, Setting(
        PREDICTOR, "Tokens per engine step; must equal the engine's max_num_batched_tokens.",
        ge=1)] = 65536
    num_predictor_warmup_samples: Annotated[int, Setting(
        PREDICTOR, "Profiling samples before the step-time model is fitted.", ge=1)] = 20
    step_predictor: Annotated[Literal["quadratic", "structural"], Setting(
        PREDICTOR, "Step-time model of the prefill replay: upstream's quadratic in prefill "
        "tokens, or NexusSched's structural model (fed B = 1 per profiling sample).")] = (
        "quadratic")
    per_instance_predictors: Annotated[bool, Setting(
        PREDICTOR, "One step-time model per instance (heterogeneous clusters) instead of "
        "upstream's single shared one.")] = False

    # --- SLO-aware scheduling ---
    ttft_profiling_data_path: Annotated[str, Setting(
        SLO, "TTFT profiling JSON; required by --scheduling-policy slo.", metavar="PATH")] = ""
    tpot_profiling_data_path: Annotated[str, Setting(
        SLO, "TPOT profiling JSON; required by --scheduling-policy slo.", metavar="PATH")] = ""
    ttft_slo: Annotated[float, Setting(SLO, "TTFT target, ms.", gt=0)] = 6000.0
    tpot_slo: Annotated[float, Setting(SLO, "TPOT target, ms.", gt=0)] = 50.0
    ttft_slo_dispatch_threshold: Annotated[float, Setting(
        SLO, "Filter out instances whose predicted TTFT exceeds ttft-slo times this.", gt=0)] = 1.0
    tpot_slo_dispatch_threshold: Annotated[float, Setting(
        SLO, "Filter out instances whose predicted TPOT exceeds tpot-slo times this "
        "(the guide suggests 0.85 with adaptive PD).", gt=0)] = 1.0

    # --- Adaptive PD scheduling ---
    enable_adaptive_pd: Annotated[bool, Setting(
        ADAPTIVE_PD, "Any instance prefills or decodes; roles follow the decode work, with one "
        "reserved prefill and one reserved decode instance (needs --scheduling-policy slo and "
        "full mode; with --enable-rescheduling adds the bin-packing policies).")] = False
    tpot_migrate_out_ceil_threshold: Annotated[float, Setting(
        ADAPTIVE_PD, "Fraction of tpot-slo above which an instance is relieved.", gt=0)] = 0.95
    tpot_migrate_out_floor_threshold: Annotated[float, Setting(
        ADAPTIVE_PD, "Fraction of tpot-slo below which an instance is consolidated.", ge=0)] = 0.60

    # --- Rescheduler ---
    enable_rescheduling: Annotated[bool, Setting(
        RESCHEDULER, "Enable migration between instances (full mode): `prescient scheduler` "
        "runs rescheduling rounds and sends gRPC Migrate calls to the llumlets.")] = False
    rescheduling_policies: Annotated[tuple[ReschedulingPolicy, ...], Setting(
        RESCHEDULER, "Rescheduling policies, run in this order.",
        aliases=("--reschedule-policies",), metavar="POLICY,...")] = (
        "decode_load", "prefill_failover", "decode_failover", "neutral_failover")
    rescheduling_interval_ms: Annotated[int, Setting(
        RESCHEDULER, "Time between rescheduling rounds, ms (100 suits adaptive PD).", gt=0,
        aliases=("--reschedule-interval-ms",))] = 500
    colocated_rescheduling_mode: Annotated[bool, Setting(
        RESCHEDULER, "Run the rescheduler inside the scheduler process, beside /schedule "
        "(what --enable-rescheduling does unless --standalone-rescheduling-mode).",
        aliases=("--colocated-reschedule-mode",))] = False
    standalone_rescheduling_mode: Annotated[bool, Setting(
        RESCHEDULER, "Run this process as a rescheduler only: no /schedule, /release, "
        "/report; needs --enable-rescheduling.")] = False
    rescheduling_decode_load_metric: Annotated[LoadMetric, Setting(
        RESCHEDULER, "Load metric for decode instances.")] = "kv_cache_usage_ratio_projected"
    rescheduling_prefill_load_metric: Annotated[LoadMetric, Setting(
        RESCHEDULER, "Load metric for prefill instances.")] = "kv_cache_usage_ratio_projected"
    rescheduling_neutral_load_metric: Annotated[LoadMetric, Setting(
        RESCHEDULER, "Load metric for neutral instances.")] = "kv_cache_usage_ratio_projected"
    rescheduling_decode_load_threshold: Annotated[float, Setting(
        RESCHEDULER, "Decode instances at or above this are sources, below it destinations.",
        ge=0)] = 1.0
    rescheduling_neutral_load_threshold: Annotated[float, Setting(
        RESCHEDULER, "Neutral instances at or above this are sources, below it destinations.",
        ge=0)] = 1.0
    rescheduling_load_balance_threshold: Annotated[float, Setting(
        RESCHEDULER, "Smallest source-destination load gap worth a migration (0: any).",
        ge=0)] = 0.0
    rescheduling_load_balance_scope: Annotated[Literal["cluster", "unit"], Setting(
        RESCHEDULER, "Balance across the cluster or within each unit.")] = "cluster"
    rescheduling_req_select_rule: Annotated[Literal["NUM_REQ", "TOKEN", "RATIO"], Setting(
        RESCHEDULER, "What --rescheduling-req-select-value counts.")] = "TOKEN"
    rescheduling_req_select_order: Annotated[
        Literal["LCR", "FCR", "LR", "SR", "FCW", "FCWSR"], Setting(
            RESCHEDULER, "Order in which requests are picked for migration.")] = "SR"
    rescheduling_req_select_value: Annotated[float, Setting(
        RESCHEDULER, "Requests, tokens or KV-cache ratio to migrate per pair.", gt=0)] = 1024.0

    # --- gRPC ---
    llumlet_grpc_connection_pool_size: Annotated[int, Setting(
        GRPC, "gRPC connections per llumlet.", ge=1)] = 10
    llumlet_grpc_timeout_seconds: Annotated[float, Setting(
        GRPC, "Timeout of a gRPC migration call, seconds.", gt=0)] = 5.0

    # --- Service ---
    host: Annotated[str, Setting(SERVICE, "Address the HTTP service binds.")] = "0.0.0.0"
    port: Annotated[int, Setting(SERVICE, "HTTP port.", **PORT)] = 8002
    service_token: Annotated[str, Setting(
        SERVICE, "If set, requests must carry it in the Authorization header.",
        secret=True)] = ""

    def __post_init__(self) -> None:
        if self.tpot_migrate_out_floor_threshold > self.tpot_migrate_out_ceil_threshold:
            raise ConfigError(
                f"--tpot-migrate-out-floor-threshold ({self.tpot_migrate_out_floor_threshold:g})"
                f" must be <= --tpot-migrate-out-ceil-threshold "
                f"({self.tpot_migrate_out_ceil_threshold:g})")
        if self.cache_index != "approximate" and not self.enable_cache_aware_scheduling:
            raise ConfigError(f"--cache-index {self.cache_index} needs "
                              "--enable-cache-aware-scheduling")
        if self.kv_events_endpoints:
            parse_kv_events_endpoints(self.kv_events_endpoints)
        if self.colocated_rescheduling_mode and self.standalone_rescheduling_mode:
            raise ConfigError("--colocated-rescheduling-mode and --standalone-rescheduling-mode "
                              "are exclusive: the rescheduler runs in one place")


def parse_kv_events_endpoints(text: str) -> dict[str, tuple[str, str | None]]:
    """`--kv-events-endpoints`: instance id -> (PUB endpoint, replay endpoint or None)."""
    out: dict[str, tuple[str, str | None]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        iid, eq, endpoints = item.partition("=")
        pub, _, replay = endpoints.partition("|")
        if not eq or not iid.strip() or "://" not in pub:
            raise ConfigError(f"--kv-events-endpoints: {item!r} is not "
                              "<instance>=<endpoint>[|<replay endpoint>] "
                              "(e.g. sim-8000=tcp://10.0.0.5:5557|tcp://10.0.0.5:5558)")
        if replay and "://" not in replay:
            raise ConfigError(f"--kv-events-endpoints: replay endpoint {replay!r} of "
                              f"{iid.strip()!r} has no scheme (tcp://, ipc://)")
        out[iid.strip()] = (pub.strip(), replay.strip() or None)
    return out


DEFAULT_CHOICES = (
    DefaultChoice("--cms-pull-status-interval-ms", 500, 50,
                  "The guide's CMS table; also the simulator's default poll. 50 ms is what "
                  "upstream code ships; pass it to reproduce."),
    DefaultChoice("--cms-redis-host", "redis", "redis.roles",
                  "The guide's CMS table; redis.roles is an upstream deployment name."),
    DefaultChoice("--cms-redis-port", 6379, 10000,
                  "The guide's CMS table; 6379 is Redis's own port."),
    DefaultChoice("--failover-domain", "instance", "instance-unit",
                  "The guide's failover table: exclude only the failed instance by default."),
    DefaultChoice("--ttft-slo-dispatch-threshold", 1.0, 0.85,
                  "The guide's SLO table: filter at the SLO itself; its best practices suggest "
                  "going slightly below 1.0 by hand."),
    DefaultChoice("--tpot-slo-dispatch-threshold", 1.0, 0.85,
                  "The guide's SLO table. Its adaptive-PD tables show 0.85, but as the value to "
                  "set for that mode, so the flag default stays 1.0; set 0.85 with "
                  "--enable-adaptive-pd."),
    DefaultChoice("--rescheduling-load-balance-threshold", 0.0, 0.7,
                  "The guide's load-balance table: any improving pair may migrate."),
    DefaultChoice("--llumlet-grpc-connection-pool-size", 10, -1,
                  "The guide's gRPC table; upstream -1 means its built-in pool size."),
    DefaultChoice("--llumlet-grpc-timeout-seconds", 5.0, -1,
                  "The guide's gRPC table; upstream -1 (<= 0) also means 5 s, so behaviour "
                  "is the same."),
)

DESCRIPTION = ("The scheduler service's settings (Llumnix scheduler flags). Each flag can also "
               "come from a --config file (key: the flag with '_' for '-') or an environment "
               "variable PRESCIENT_SCHEDULER_<FLAG>. Precedence: defaults < --config < "
               "environment < flags < --extra-args.")


def scheduler_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The scheduler's flags, grouped for `--help`; added to `parser` if given.

    A parser made here raises `ConfigError` on unknown flags instead of exiting.
    """
    if parser is None:
        parser = new_parser(prog="prescient scheduler", usage="prescient scheduler [options]",
                            description=DESCRIPTION)
    add_arguments(SchedulerSettings, parser)
    return parser


def load_scheduler_settings(argv: Sequence[str], env: Mapping[str, str]) -> SchedulerSettings:
    """Settings from `argv` (flags only, no subcommand) and `env`; reads only `--config`.

    Raises:
        ConfigError: naming the flag, env var, or file and key at fault.
    """
    return parse_settings(SchedulerSettings, scheduler_parser(), argv, env)
