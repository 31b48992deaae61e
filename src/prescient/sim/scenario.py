"""Scenario files: one repeatable experiment in YAML or TOML.

Every key is optional; what is left out takes the default below, which is also what
`prescient simulate` runs with no arguments. Unknown keys are errors (a typo must not silently
fall back to a default).

```yaml
seed: 0
policies: [round-robin, random, least-requests, power-of-two, llm-d, load-balance, oracle]
cluster:
  instances: 8                 # or groups: [{count: 4, preset: llama3-8b-a100}, ...]
                               # (a group's instance_type: prefill | decode: a static P/D split)
  preset: llama3-8b-h100
  max_num_seqs: 256
  max_num_batched_tokens: 8192
workload:
  kind: trace                  # trace | synthetic | sessions
  trace: azure-conv            # bundled name or a .csv (Azure) / .jsonl (Mooncake) path
  rate_scale: 20.0             # time compression: 20 = twenty times the trace's rate; a
                               # workload section that leaves it out replays at its own rate (1)
  duration_s: null             # keep arrivals in the first N seconds (after scaling)
  num_requests: null
  warmup_s: 10.0               # excluded from the statistics
  cooldown_s: 10.0
  failures: []                 # e.g. [{instance: 3, at_s: 60, kind: crash}] (or drain)
  gateway_replay: true         # the gateway replays streams a crash cut; false: they are lost
slo: {ttft_ms: 6000, tpot_ms: 50}
observation: {status_push_interval_ms: 40}
migration:                     # the KV link and protocol limits (rescheduling)
  bandwidth_gb_s: 25.0
  rpc_latency_ms: 1.0
  last_stage_max_blocks: 4
  max_stages: 3
  max_req_mig_out: 1           # LLUMNIX_MAX_REQ_MIG_OUT
  max_req_mig_in: 1            # LLUMNIX_MAX_REQ_MIG_IN
scheduler:                     # any `prescient scheduler` flag, snake or kebab case
  cms_pull_status_interval_ms: 500
  dispatch_neutral_load_metric: all_prefills_tokens_num
  enable_rescheduling: false   # with rescheduling_policies, rescheduling_interval_ms, ...
```
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from prescient.config.scheduler import SchedulerSettings
from prescient.config.settings import settings_from_mapping
from prescient.errors import ConfigError
from prescient.model import InferType
from prescient.rescheduler import MigrationSettings

DEFAULT_POLICIES = ("round-robin", "random", "least-requests", "power-of-two", "llm-d",
                    "load-balance", "oracle")


class InstanceGroup(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`count` instances of one preset (heterogeneous clusters list several groups).

    `instance_type` prefill or decode makes a static P/D split: requests are then prefilled on
    one instance and decoded on another (`pd_batch`, or `pd_staged` with the scheduler's
    `separate_pd_scheduling`).
    """

    count: int
    preset: str = "llama3-8b-h100"
    instance_type: InferType = InferType.NEUTRAL


class FailureConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Instance number `instance` (inst-03 is 3) fails `at_s` seconds into the run."""

    instance: int
    at_s: float
    kind: Literal["crash", "drain"] = "crash"  # crash: engine and llumlet die; drain: it
    # reports itself unschedulable and keeps serving (pre-stop; failover policies move it out)


class ClusterConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    instances: int = 8
    preset: str = "llama3-8b-h100"
    groups: tuple[InstanceGroup, ...] = ()  # overrides instances/preset when given
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_gpu_blocks: int | None = None  # None: each preset's capacity
    enable_prefix_caching: bool = True
    # LLUMNIX_ENABLE_PROFILING; None: on when the scheduler needs step samples
    # (--enable-predictor-enhanced-scheduling or the slo policy)
    enable_profiling: bool | None = None
    # LLUMNIX_PROFILING_STEPS: samples each engine exports at most; None: no limit (upstream's
    # engines stop after 50, which starves a predictor polled every second or slower)
    profiling_steps: int | None = None
    batching: Literal["vllm", "lens"] = "vllm"  # engines' token budget: fixed, or LENS
    lens_min_step_ms: float = 15.0  # LENS: step target with nothing waiting, ms...
    lens_target_step_ms: float = 50.0  # ...rising to this (the TPOT SLO) at...
    lens_queue_threshold: int = 5  # ...this many waiting
    lens_max_chunk: int = 512  # LENS: prefill tokens per request per step at most
    queue_policy: Literal["fcfs", "spf"] = "fcfs"  # engines' waiting order (spf: shortest
    aging_tokens_per_s: float = 100.0              # predicted output first, with aging)
    failures: tuple[FailureConfig, ...] = ()
    gateway_replay: bool = True  # replay streams a crashed instance cut (else: lost)


class SyntheticConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    rate: float = 10.0  # requests per second
    arrival: Literal["poisson", "gamma"] = "poisson"
    cv: float = 1.0
    prompt: str = "lognormal:mean=1155,median=1020"  # length spec, see `parse_length_spec`
    output: str = "lognormal:mean=211,median=129"
    num_requests: int | None = 2000
    duration_s: float | None = None


class SessionsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    num_sessions: int = 200
    session_rate: float = 2.0  # new sessions per second
    turns: str = "uniform:2:8"
    think_time_s: float = 5.0
    first_prompt: str = "lognormal:mean=1500,median=1200"
    turn_prompt: str = "lognormal:mean=150,median=100"
    output: str = "lognormal:mean=211,median=129"


class WorkloadConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Literal["trace", "synthetic", "sessions"] = "trace"
    trace: str = "azure-conv"
    synthetic: SyntheticConfig = SyntheticConfig()
    sessions: SessionsConfig = SessionsConfig()
    rate_scale: float = 1.0  # 1 = the workload's own rate
    duration_s: float | None = None
    num_requests: int | None = None
    warmup_s: float = 10.0
    cooldown_s: float = 10.0


class SloConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ttft_ms: float | None = 6000.0  # --ttft-slo
    tpot_ms: float | None = 50.0  # --tpot-slo


class ObservationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    status_push_interval_ms: float = 40.0  # LLUMNIX_STATUS_PUSH_INTERVAL
    load_sample_interval_ms: float = 1000.0


class Scenario(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A whole experiment: cluster, workload, policies to compare, SLOs, observation lag."""

    seed: int = 0
    policies: tuple[str, ...] = DEFAULT_POLICIES
    cluster: ClusterConfig = ClusterConfig()
    workload: WorkloadConfig = WorkloadConfig(rate_scale=20.0)  # the built-in default run
    slo: SloConfig = SloConfig()
    observation: ObservationConfig = ObservationConfig()
    migration: MigrationSettings = MigrationSettings()
    scheduler: SchedulerSettings = SchedulerSettings()  # the policies' flags, snake_case keys
    # the router's output-length predictor: none | oracle | lognormal:sigma=S | histogram
    output_length_predictor: str = "none"


def load_scenario(path: Path) -> Scenario:
    """Read a `.yaml`/`.yml`/`.toml` scenario; errors name the file and the offending key."""
    if not path.is_file():
        raise ConfigError(f"{path}: scenario file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"{path}: a scenario file must end in .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {e}") from e
    return scenario_from_dict(data or {}, str(path))


def scenario_from_dict(data: object, origin: str = "scenario") -> Scenario:
    """Validate plain data (e.g. parsed YAML) into a `Scenario`.

    The `scheduler` section goes through the scheduler's own settings checks, so a key there
    means exactly what the flag of the same name means to `prescient scheduler`.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level")
    section = data.get("scheduler", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{origin}: scheduler: expected a mapping of scheduler flags")
    scheduler = settings_from_mapping(SchedulerSettings, section, f"{origin}: scheduler")
    try:
        scenario = msgspec.convert({**data, "scheduler": {}}, Scenario)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{origin}: {e}") from e
    return msgspec.structs.replace(scenario, scheduler=scheduler)
