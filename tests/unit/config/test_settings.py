"""Scheduler settings: every seed flag, every layer, every error naming its source."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest

from prescient.config import (
    DEFAULT_CHOICES,
    DeprecatedSettingWarning,
    SchedulerSettings,
    Setting,
    describe,
    env_var,
    load_scheduler_settings,
    scheduler_parser,
)
from prescient.config.scheduler import GROUPS
from prescient.config.settings import (
    REDACTED,
    redacted_builtins,
    settings_from_mapping,
    split_extra_args,
)
from prescient.errors import ConfigError

RESCHEDULING_DEFAULT = ("decode_load", "prefill_failover", "decode_failover", "neutral_failover")

# The seed scheduler configuration guide's tables, transcribed independently of the code:
# (flag, the guide's default, a different valid value as typed, that value parsed).
SEED_FLAGS: list[tuple[str, Any, str, Any]] = [
    # Full-mode CMS
    ("--cms-redis-host", "redis", "cms.local", "cms.local"),
    ("--cms-redis-port", 6379, "7000", 7000),
    ("--cms-redis-db", 0, "3", 3),
    ("--cms-redis-username", "", "alice", "alice"),
    ("--cms-redis-password", "", "s3cret", "s3cret"),
    ("--cms-redis-timeout", 1.0, "2.5", 2.5),
    ("--cms-redis-retry-times", 1, "3", 3),
    ("--cms-pull-status-interval-ms", 500, "50", 50),
    ("--cms-pull-metadata-interval-ms", 10000, "2000", 2000),
    # Policy framework
    ("--enable-full-mode-scheduling", True, "false", False),
    # Cache-aware scheduling
    ("--enable-cache-aware-scheduling", False, "true", True),
    ("--cache-aware-scheduling-min-tokens", 1024, "512", 512),
    ("--kvs-backend", "mooncake", "v6d", "v6d"),
    ("--kvs-hash-algo", "sha256_cbor", "xxhash", "xxhash"),
    ("--kvs-hash-seed", "0", "7", "7"),
    ("--kvs-chunk-size", 256, "16", 16),
    ("--kvs-enable-save-unfull-chunk", False, "true", True),
    ("--kvs-retry-times", 5, "2", 2),
    ("--kvs-retry-interval-ms", 100, "10", 10),
    ("--kvs-metadata-service-down-duration-s", 30, "5", 5),
    # Predictor-enhanced scheduling
    ("--enable-predictor-enhanced-scheduling", False, "true", True),
    ("--max-num-batched-tokens", 65536, "8192", 8192),
    ("--num-predictor-warmup-samples", 20, "50", 50),
    # SLO-aware scheduling
    ("--scheduling-policy", "load-balance", "slo", "slo"),
    ("--ttft-profiling-data-path", "", "/data/ttft.json", "/data/ttft.json"),
    ("--tpot-profiling-data-path", "", "/data/tpot.json", "/data/tpot.json"),
    ("--ttft-slo", 6000.0, "3000", 3000.0),
    ("--tpot-slo", 50.0, "25.5", 25.5),
    ("--ttft-slo-dispatch-threshold", 1.0, "0.9", 0.9),
    ("--tpot-slo-dispatch-threshold", 1.0, "0.85", 0.85),
    # Adaptive PD scheduling
    ("--enable-adaptive-pd", False, "true", True),
    ("--tpot-migrate-out-ceil-threshold", 0.95, "0.9", 0.9),
    ("--tpot-migrate-out-floor-threshold", 0.60, "0.5", 0.5),
    ("--enable-instance-status-local-account", True, "false", False),
    # Rescheduler
    ("--enable-rescheduling", False, "true", True),
    ("--rescheduling-policies", RESCHEDULING_DEFAULT,
     "binpacking_mitigation,binpacking_consolidation",
     ("binpacking_mitigation", "binpacking_consolidation")),
    ("--rescheduling-interval-ms", 500, "100", 100),
    ("--colocated-rescheduling-mode", False, "true", True),
    ("--standalone-rescheduling-mode", False, "true", True),
    ("--rescheduling-decode-load-metric", "kv_cache_usage_ratio_projected", "decode_batch_size",
     "decode_batch_size"),
    ("--rescheduling-decode-load-threshold", 1.0, "0.8", 0.8),
    ("--rescheduling-neutral-load-metric", "kv_cache_usage_ratio_projected",
     "all_prefills_tokens_num", "all_prefills_tokens_num"),
    ("--rescheduling-neutral-load-threshold", 1.0, "0.7", 0.7),
    ("--rescheduling-load-balance-threshold", 0.0, "0.7", 0.7),
    ("--rescheduling-load-balance-scope", "cluster", "unit", "unit"),
    ("--failover-domain", "instance", "node-unit", "node-unit"),
    ("--instance-staleness-seconds", 60, "30", 30),
    ("--rescheduling-req-select-rule", "TOKEN", "NUM_REQ", "NUM_REQ"),
    ("--rescheduling-req-select-order", "SR", "FCWSR", "FCWSR"),
    ("--rescheduling-req-select-value", 1024, "0.5", 0.5),
    ("--llumlet-grpc-connection-pool-size", 10, "4", 4),
    ("--llumlet-grpc-timeout-seconds", 5, "2", 2.0),
]

# Flags the guide names without a default (or only in the reference): upstream code defaults.
CODE_FLAGS: list[tuple[str, Any, str, Any]] = [
    ("--llm-backend-discovery", "redis", "endpoints", "endpoints"),
    ("--llm-backend-endpoints", (), "10.0.0.1:8000,10.0.0.2:8000",
     ("10.0.0.1:8000", "10.0.0.2:8000")),
    ("--discovery-redis-host", "redis", "disc", "disc"),
    ("--discovery-redis-port", 6379, "6380", 6380),
    ("--discovery-redis-db", 0, "3", 3),
    ("--discovery-redis-username", "", "bob", "bob"),
    ("--discovery-redis-password", "", "pw", "pw"),
    ("--discovery-redis-socket-timeout", 1.0, "0.5", 0.5),
    ("--discovery-redis-retry-times", 1, "0", 0),
    ("--discovery-redis-refresh-interval-ms", 1000, "250", 250),
    ("--discovery-redis-status-ttl-ms", 60000, "30000", 30000),
    ("--discovery-etcd-endpoints", ("etcd:2379",), "e1:2379,e2:2379", ("e1:2379", "e2:2379")),
    ("--discovery-etcd-username", "", "carol", "carol"),
    ("--discovery-etcd-password", "", "pw2", "pw2"),
    ("--discovery-etcd-dial-timeout", 5.0, "1", 1.0),
    ("--discovery-etcd-lease-ttl", 60, "30", 30),
    ("--discovery-etcd-refresh-interval-sec", 3600, "600", 600),
    ("--dispatch-top-k", 1, "3", 3),
    ("--dispatch-prefill-load-metric", "all_prefills_tokens_num", "num_waiting_requests",
     "num_waiting_requests"),
    ("--dispatch-prefill-load-threshold", 2048.0, "4096", 4096.0),
    ("--dispatch-decode-load-metric", "kv_cache_usage_ratio_projected", "decode_batch_size",
     "decode_batch_size"),
    ("--dispatch-decode-load-threshold", 1.0, "0.9", 0.9),
    ("--dispatch-neutral-load-metric", "all_prefills_tokens_num", "num_tokens", "num_tokens"),
    ("--dispatch-neutral-load-threshold", 8192.0, "100", 100.0),
    ("--dispatch-prefill-cache-locality-metric", "cache_aware_all_prefills_tokens_num",
     "kv_cache_hit_len", "kv_cache_hit_len"),
    ("--request-local-account-staleness-seconds", 10, "5", 5),
    ("--allow-concurrent-scheduling", False, "true", True),
    ("--separate-pd-scheduling", False, "true", True),
    ("--multi-model-support", False, "true", True),
    ("--kvs-iris-meta-prefix", "iris.", "x.", "x."),
    ("--kvs-vllm-block-prefix", "block.hash.key.", "b.", "b."),
    ("--kvs-metadata-service-http-server-host", "0.0.0.0", "mooncake-master", "mooncake-master"),
    ("--kvs-metadata-service-http-server-port", 9003, "8080", 8080),
    ("--rescheduling-prefill-load-metric", "kv_cache_usage_ratio_projected", "num_requests",
     "num_requests"),
    ("--host", "0.0.0.0", "127.0.0.1", "127.0.0.1"),
    ("--port", 8002, "8088", 8088),
    ("--service-token", "", "tok", "tok"),
]
# Prescient's own flags, beyond upstream's
OWN_FLAGS: list[tuple[str, Any, str, Any]] = [
    ("--step-predictor", "quadratic", "structural", "structural"),
    ("--per-instance-predictors", False, "true", True),
    ("--cache-index", "approximate", "approximate", "approximate"),  # others: test_cache_flags
    ("--cache-index-ttl-s", 120.0, "inf", float("inf")),
    ("--cache-index-max-blocks", 1_000_000, "5000", 5000),
    ("--cache-aware-miss-weight", 2.0, "1", 1.0),
    ("--cache-aware-backlog-tokens", 4096.0, "inf", float("inf")),
    ("--cache-aware-load-requests", 64.0, "inf", float("inf")),
    ("--cache-aware-balance-abs-threshold", 64.0, "inf", float("inf")),
    ("--cache-aware-balance-rel-threshold", 1.5, "2", 2.0),
    ("--prefix-caching-hash-algo", "sha256", "sha256_cbor", "sha256_cbor"),
    ("--prefix-caching-hash-seed", "vllm-none-hash", "42", "42"),
    ("--prefix-caching-block-size", 0, "32", 32),
    ("--kv-events-endpoints", "", "a=tcp://h:5557|tcp://h:5558",
     "a=tcp://h:5557|tcp://h:5558"),
]

ALL_FLAGS = SEED_FLAGS + CODE_FLAGS + OWN_FLAGS
OPTIONS = {opt.flag: opt for opt in describe(SchedulerSettings)}


def load(*argv: str, env: dict[str, str] | None = None) -> SchedulerSettings:
    return load_scheduler_settings(list(argv), env or {})


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- every flag ---------------------------------------------------------------------------------


def test_the_tables_cover_every_setting_once() -> None:
    flags = [flag for flag, *_ in ALL_FLAGS]
    assert len(flags) == len(set(flags))
    assert set(flags) == set(OPTIONS)


@pytest.mark.parametrize(("flag", "default", "text", "value"), ALL_FLAGS,
                         ids=[f for f, *_ in ALL_FLAGS])
def test_flag_default_and_a_parsed_value(flag: str, default: Any, text: str, value: Any) -> None:
    name = OPTIONS[flag].name
    assert getattr(SchedulerSettings(), name) == default
    assert getattr(load(flag, text), name) == value
    assert getattr(load(f"{flag}={text}"), name) == value
    assert getattr(load(env={OPTIONS[flag].env: text}), name) == value


def help_words() -> str:
    return " ".join(scheduler_parser().format_help().split())


def test_every_seed_group_is_a_help_section_in_the_guides_order() -> None:
    help_text = help_words()
    positions = [help_text.index(f" {title}: --") for title in GROUPS]
    assert positions == sorted(positions)
    assert [opt.setting.group for opt in OPTIONS.values()] == sorted(
        (opt.setting.group for opt in OPTIONS.values()), key=GROUPS.index)
    for flag in OPTIONS:
        assert flag in help_text
    assert "[default: 500; env PRESCIENT_SCHEDULER_CMS_PULL_STATUS_INTERVAL_MS]" in help_text


def test_env_var_names() -> None:
    assert env_var("--cms-pull-status-interval-ms") == "PRESCIENT_CMS_PULL_STATUS_INTERVAL_MS"
    assert OPTIONS["--cms-pull-status-interval-ms"].env == (
        "PRESCIENT_SCHEDULER_CMS_PULL_STATUS_INTERVAL_MS")
    assert OPTIONS["--port"].env == "PRESCIENT_SCHEDULER_PORT"


# --- booleans and lists ---------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "expected"), [
    (["--enable-rescheduling"], True),
    (["--enable-rescheduling=true"], True),
    (["--enable-rescheduling", "true"], True),
    (["--enable-rescheduling=false"], False),
    (["--enable-rescheduling", "false"], False),
    (["--enable-rescheduling=TRUE"], True),
    (["--enable-rescheduling=1"], True),
    (["--enable-rescheduling=no"], False),
    (["--enable-rescheduling", "--port", "9000"], True),
])
def test_boolean_syntaxes(argv: list[str], expected: bool) -> None:
    assert load(*argv).enable_rescheduling is expected


def test_bare_boolean_flag_does_not_swallow_the_next_flag() -> None:
    s = load("--enable-full-mode-scheduling=false", "--enable-adaptive-pd", "--dispatch-top-k", "2")
    assert (s.enable_full_mode_scheduling, s.enable_adaptive_pd, s.dispatch_top_k) == (
        False, True, 2)


@pytest.mark.parametrize("text", ["decode_load,neutral_load", "decode_load, neutral_load",
                                  "[decode_load,neutral_load]", "decode_load,,neutral_load,"])
def test_list_syntaxes(text: str) -> None:
    assert load("--rescheduling-policies", text).rescheduling_policies == (
        "decode_load", "neutral_load")


def test_an_empty_list() -> None:
    assert load("--rescheduling-policies=").rescheduling_policies == ()


# --- layers -------------------------------------------------------------------------------------


YAML = """
dispatch_top_k: 2
rescheduling-policies: [decode_load]
enable_rescheduling: true
cms_redis_timeout: 3
failover_domain: node
"""
TOML = """
dispatch_top_k = 2
rescheduling-policies = ["decode_load"]
enable_rescheduling = true
cms_redis_timeout = 3
failover_domain = "node"
"""


@pytest.mark.parametrize(("name", "text"), [("s.yaml", YAML), ("s.yml", YAML), ("s.toml", TOML)])
def test_config_file_yaml_and_toml(tmp_path: Path, name: str, text: str) -> None:
    s = load("--config", str(write(tmp_path, name, text)))
    assert s.dispatch_top_k == 2
    assert s.rescheduling_policies == ("decode_load",)
    assert s.enable_rescheduling is True
    assert s.cms_redis_timeout == 3.0 and isinstance(s.cms_redis_timeout, float)
    assert s.failover_domain == "node"


def test_config_file_accepts_text_values_and_empty_files(tmp_path: Path) -> None:
    s = load("--config", str(write(tmp_path, "s.yaml", 'port: "9000"\nllm_backend_endpoints: '
                                   '"a:1,b:2"\nenable_adaptive_pd: "true"\n')))
    assert (s.port, s.llm_backend_endpoints, s.enable_adaptive_pd) == (9000, ("a:1", "b:2"), True)
    assert load("--config", str(write(tmp_path, "e.yaml", ""))) == SchedulerSettings()


def test_precedence_defaults_file_env_flags_extra_args(tmp_path: Path) -> None:
    path = str(write(tmp_path, "s.yaml", "dispatch_top_k: 2\nport: 9002\n"))
    env = {"PRESCIENT_SCHEDULER_DISPATCH_TOP_K": "3", "PRESCIENT_SCHEDULER_HOST": "10.0.0.9"}
    assert load().dispatch_top_k == 1
    assert load("--config", path).dispatch_top_k == 2
    s = load("--config", path, env=env)
    assert (s.dispatch_top_k, s.port, s.host) == (3, 9002, "10.0.0.9")
    assert load("--config", path, "--dispatch-top-k", "4", env=env).dispatch_top_k == 4
    s = load("--config", path, "--dispatch-top-k", "4", "--extra-args", "dispatch-top-k=5",
             env=env)
    assert (s.dispatch_top_k, s.port, s.host) == (5, 9002, "10.0.0.9")


def test_environment_ignores_other_variables() -> None:
    assert load(env={"PATH": "/bin", "PRESCIENT_UNRELATED": "x"}) == SchedulerSettings()


def test_extra_args_upstream_syntax() -> None:
    s = load("--extra-args", "dispatch-top-k=5, rescheduling-policies=[decode_load,neutral_load],"
             "llm-backend-endpoints='a:1,b:2',--enable-adaptive-pd=true,tpot_slo=\"40\"")
    assert s.dispatch_top_k == 5
    assert s.rescheduling_policies == ("decode_load", "neutral_load")
    assert s.llm_backend_endpoints == ("a:1", "b:2")
    assert s.enable_adaptive_pd is True
    assert s.tpot_slo == 40.0


def test_split_extra_args() -> None:
    assert split_extra_args("a=1,b=[x,y],c='p,q',d=\"r,s\",,") == [
        "a=1", "b=[x,y]", "c='p,q'", 'd="r,s"']
    assert split_extra_args("") == []


def test_settings_from_mapping_checks_like_a_file() -> None:
    s = settings_from_mapping(SchedulerSettings, {"dispatch-top-k": 2}, "scenario.yaml: scheduler")
    assert s.dispatch_top_k == 2
    with pytest.raises(ConfigError, match=r"scenario.yaml: scheduler: unknown key 'dispatch_topk'"):
        settings_from_mapping(SchedulerSettings, {"dispatch_topk": 2}, "scenario.yaml: scheduler")


# --- deprecated aliases -------------------------------------------------------------------------


@pytest.mark.parametrize(("alias", "text", "name", "value"), [
    ("--colocated-reschedule-mode", "true", "colocated_rescheduling_mode", True),
    ("--reschedule-interval-ms", "100", "rescheduling_interval_ms", 100),
    ("--reschedule-policies", "binpacking_mitigation,binpacking_consolidation",
     "rescheduling_policies", ("binpacking_mitigation", "binpacking_consolidation")),
])
def test_deprecated_aliases_work_and_warn(tmp_path: Path, alias: str, text: str, name: str,
                                          value: Any) -> None:
    canonical = OPTIONS["--" + name.replace("_", "-")].flag
    with pytest.warns(DeprecatedSettingWarning, match=f"{alias} is deprecated; use {canonical}"):
        assert getattr(load(alias, text), name) == value
    with pytest.warns(DeprecatedSettingWarning, match=alias):
        assert getattr(load("--extra-args", f"{alias[2:]}='{text}'"), name) == value
    key = alias[2:].replace("-", "_")
    path = write(tmp_path, "s.yaml", f"{key}: '{text}'\n")
    with pytest.warns(DeprecatedSettingWarning, match=alias):
        assert getattr(load("--config", str(path)), name) == value


def test_deprecated_alias_appears_in_help() -> None:
    text = help_words()
    assert "--colocated-rescheduling-mode [true|false], --colocated-reschedule-mode" in text
    assert "Deprecated spelling: --reschedule-interval-ms." in text


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["--dispatch-top-k", "two"], "--dispatch-top-k: expected an integer >= 1, got 'two'"),
    (["--dispatch-top-k", "0"], "--dispatch-top-k: expected an integer >= 1, got '0'"),
    (["--port", "70000"], "--port: expected an integer >= 1 and <= 65535, got '70000'"),
    (["--cms-pull-status-interval-ms", "0"],
     "--cms-pull-status-interval-ms: expected an integer > 0, got '0'"),
    (["--ttft-slo", "nan"], "--ttft-slo: expected a number > 0, got 'nan'"),
    (["--rescheduling-load-balance-threshold=-1"],
     "--rescheduling-load-balance-threshold: expected a number >= 0, got '-1'"),
    (["--enable-rescheduling=maybe"], "--enable-rescheduling: expected true or false, got 'maybe'"),
    (["--scheduling-policy", "fastest"],
     "--scheduling-policy: expected one of load-balance, slo, flood, round-robin, got 'fastest'"),
    (["--rescheduling-policies", "decode_load,teleport"],
     "--rescheduling-policies: unknown item 'teleport'; expected a comma-separated list of "
     "decode_load, neutral_load"),
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--enable-resched"], "unrecognized arguments: --enable-resched"),  # no abbreviations
    (["--extra-args", "dispatch-top-k"], "--extra-args: expected KEY=VALUE, got 'dispatch-top-k'"),
    (["--extra-args", "dispatch-topk=2"], "--extra-args: unknown key 'dispatch-topk'"),
    (["--extra-args", "dispatch-top-k=[1,2]"],
     "--extra-args key 'dispatch-top-k': expected an integer >= 1, got '[1,2]'"),
    (["--tpot-migrate-out-floor-threshold", "0.99"],
     "--tpot-migrate-out-floor-threshold (0.99) must be <= --tpot-migrate-out-ceil-threshold"),
    (["--colocated-rescheduling-mode", "--standalone-rescheduling-mode"], "are exclusive"),
    (["--service-token", REDACTED], "--service-token: holds the <redacted> placeholder"),
])
def test_command_line_errors_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(*argv)
    assert message in str(info.value)


@pytest.mark.parametrize(("env", "message"), [
    ({"PRESCIENT_SCHEDULER_DISPATCH_TOP_K": "x"},
     "environment variable PRESCIENT_SCHEDULER_DISPATCH_TOP_K: expected an integer >= 1, got 'x'"),
    ({"PRESCIENT_SCHEDULER_FAILOVER_DOMAIN": "rack"},
     "environment variable PRESCIENT_SCHEDULER_FAILOVER_DOMAIN: expected one of instance, node, "
     "instance-unit, node-unit, got 'rack'"),
    ({"PRESCIENT_SCHEDULER_ENABLE_ADAPTIVE_PD": ""},
     "environment variable PRESCIENT_SCHEDULER_ENABLE_ADAPTIVE_PD: expected true or false, got ''"),
])
def test_environment_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env=env)
    assert message in str(info.value)


def test_a_bad_lower_layer_is_an_error_even_when_overridden() -> None:
    with pytest.raises(ConfigError, match="PRESCIENT_SCHEDULER_DISPATCH_TOP_K"):
        load("--dispatch-top-k", "2", env={"PRESCIENT_SCHEDULER_DISPATCH_TOP_K": "x"})


@pytest.mark.parametrize(("name", "text", "message"), [
    ("s.yaml", "dispatch_topk: 2\n", "s.yaml: unknown key 'dispatch_topk'"),
    ("s.yaml", "dispatch_top_k: 0\n", "s.yaml: key 'dispatch_top_k': expected an integer >= 1"),
    ("s.yaml", "dispatch_top_k: true\n", "key 'dispatch_top_k': expected an integer >= 1"),
    ("s.yaml", "dispatch_top_k: 1.5\n", "key 'dispatch_top_k': expected an integer >= 1"),
    ("s.yaml", "ttft_slo: [1]\n", "key 'ttft_slo': expected a number > 0"),
    ("s.yaml", "host: 5\n", "key 'host': expected text, got '5'"),
    ("s.yaml", "enable_rescheduling: 2\n", "key 'enable_rescheduling': expected true or false"),
    ("s.yaml", "rescheduling_policies: [1]\n",
     "key 'rescheduling_policies': expected a comma-separated list of decode_load"),
    ("s.yaml", "port:\n", "key 'port': expected an integer >= 1 and <= 65535, got nothing"),
    ("s.yaml", "- a\n- b\n", "s.yaml: expected a mapping of settings at the top level"),
    ("s.yaml", "a: [\n", "s.yaml: not valid YAML"),
    ("s.toml", "a = \n", "s.toml: not valid TOML"),
    ("s.json", "{}", "s.json: expected a .yaml, .yml or .toml file"),
    ("s.toml", "[cms]\nredis_host = 'x'\n", "s.toml: unknown key 'cms'"),
])
def test_config_file_errors_name_the_file_and_key(tmp_path: Path, name: str, text: str,
                                                  message: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        load("--config", str(path))
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config .*nope.yaml: cannot read"):
        load("--config", str(tmp_path / "nope.yaml"))


# --- the declaration itself ---------------------------------------------------------------------


def test_default_choices_record_the_seed_value_we_use() -> None:
    assert len(DEFAULT_CHOICES) >= 9
    for choice in DEFAULT_CHOICES:
        assert getattr(SchedulerSettings(), OPTIONS[choice.flag].name) == choice.seed
        assert choice.upstream != choice.seed and choice.why


def test_secrets_are_redacted_and_never_defaults_in_help() -> None:
    data = redacted_builtins(load("--cms-redis-password", "pw", "--service-token", "t"))
    assert data["cms_redis_password"] == REDACTED and data["service_token"] == REDACTED
    assert data["discovery_redis_password"] == ""
    secrets = {opt.flag for opt in OPTIONS.values() if opt.setting.secret}
    assert secrets == {"--cms-redis-password", "--discovery-redis-password",
                       "--discovery-etcd-password", "--service-token"}


def test_a_field_without_a_setting_is_a_declaration_error() -> None:
    class Bad(msgspec.Struct, frozen=True):
        x: int = 1

    class Unsupported(msgspec.Struct, frozen=True):
        x: Annotated[dict[str, int], Setting("G", "h")] = msgspec.field(default_factory=dict)

    class Factory(msgspec.Struct, frozen=True):
        x: Annotated[tuple[str, ...], Setting("G", "h")] = msgspec.field(
            default_factory=lambda: ("a",))

    assert describe(Factory)[0].default == ("a",)

    with pytest.raises(TypeError, match="needs Annotated"):
        describe(Bad)
    with pytest.raises(TypeError, match="unsupported type"):
        describe(Unsupported)


def test_the_cli_parser_can_be_extended() -> None:
    parser = scheduler_parser(argparse.ArgumentParser(prog="x"))
    ns = parser.parse_args(["--dispatch-top-k", "2"])
    assert ns.dispatch_top_k == "2"  # raw text; typing happens with the flag named


# --- cache-aware flags ---------------------------------------------------------------------------


def test_a_cache_index_other_than_the_router_history_needs_cache_awareness() -> None:
    with pytest.raises(ConfigError, match="--cache-index kv-events needs "
                                          "--enable-cache-aware-scheduling"):
        load("--cache-index", "kv-events")
    on = load("--enable-cache-aware-scheduling", "--cache-index", "mooncake")
    assert on.cache_index == "mooncake"


@pytest.mark.parametrize("bad", ["--cache-index-ttl-s=0", "--cache-aware-miss-weight=0",
                                 "--cache-aware-backlog-tokens=0",
                                 "--cache-aware-balance-rel-threshold=0.5",
                                 "--cache-index-max-blocks=0", "--prefix-caching-block-size=-1",
                                 "--prefix-caching-hash-algo=md5"])
def test_cache_flags_reject_bad_values_naming_the_flag(bad: str) -> None:
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load(bad)


def test_kv_events_endpoints_parse_and_bad_ones_name_the_flag() -> None:
    from prescient.config.scheduler import parse_kv_events_endpoints

    assert parse_kv_events_endpoints("a=ipc:///tmp/a.ipc, b=tcp://h:1|tcp://h:2") == {
        "a": ("ipc:///tmp/a.ipc", None), "b": ("tcp://h:1", "tcp://h:2")}
    for bad in ("a", "=tcp://h:1", "a=h:1", "a=tcp://h:1|h:2"):
        with pytest.raises(ConfigError, match="--kv-events-endpoints"):
            load("--kv-events-endpoints", bad)
