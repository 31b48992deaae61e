"""From a scenario to results: build the workload and cluster, run each policy, summarise.

Every policy sees the identical request list. Goodput is the highest rate scaling at which a
policy still meets both SLOs for at least 90% of requests, found by doubling then bisection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from prescient.cache.sim import use_cache_index
from prescient.errors import ConfigError
from prescient.model import Request
from prescient.policy import POLICIES
from prescient.predict.slo import SloLatencyModel
from prescient.profiling import read_slo_model
from prescient.sim.cluster import (
    ClusterSim,
    Failure,
    InstanceSpec,
    SimResult,
    SimSettings,
)
from prescient.sim.metrics import SloSpec, Summary, summarize
from prescient.sim.scenario import InstanceGroup, Scenario
from prescient.sim.traces import load_trace
from prescient.sim.workload import (
    parse_length_spec,
    rebase,
    scale_rate,
    session_workload,
    synthetic_workload,
    truncate,
)

GOODPUT_ATTAINMENT = 0.9
SIM_ONLY_POLICIES = ("oracle",)
PROFILED_POLICIES = ("slo",)
SAMPLE_FED_POLICIES = ("slo", "prism")  # learn from the engines' profiling samples


def check_policies(names: Sequence[str]) -> None:
    """Fail before any run if a policy name is unknown."""
    known = sorted([*POLICIES, *SIM_ONLY_POLICIES, *PROFILED_POLICIES])
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown policy {name!r}; known policies: {', '.join(known)}")
    if not names:
        raise ConfigError("no policy to simulate")


def base_requests(scenario: Scenario) -> list[Request]:
    """The workload before rate scaling and truncation."""
    w, seed = scenario.workload, scenario.seed
    if w.kind == "trace":
        return load_trace(w.trace).requests
    if w.kind == "synthetic":
        s = w.synthetic
        return synthetic_workload(
            rate=s.rate, num_requests=s.num_requests, duration=s.duration_s, arrival=s.arrival,
            cv=s.cv, prompt=parse_length_spec(s.prompt), output=parse_length_spec(s.output),
            seed=seed,
        )
    s2 = w.sessions
    return session_workload(
        num_sessions=s2.num_sessions, turns=parse_length_spec(s2.turns),
        session_rate=s2.session_rate, think_time=s2.think_time_s,
        first_prompt=parse_length_spec(s2.first_prompt),
        turn_prompt=parse_length_spec(s2.turn_prompt), output=parse_length_spec(s2.output),
        seed=seed,
    )


def shape_requests(requests: Sequence[Request], scenario: Scenario, scale: float) -> list[Request]:
    """Rebase to t=0, compress time by `scale`, then truncate by duration / count."""
    w = scenario.workload
    shaped = scale_rate(rebase(requests), scale)
    if w.duration_s is not None or w.num_requests is not None:
        shaped = truncate(shaped, duration=w.duration_s, num_requests=w.num_requests)
    if not shaped:
        raise ConfigError("the workload is empty after truncation")
    return shaped


def profiling_enabled(scenario: Scenario) -> bool:
    """Engines export step samples when asked to, or when a policy needs them."""
    if scenario.cluster.enable_profiling is not None:
        return scenario.cluster.enable_profiling
    return (scenario.scheduler.enable_predictor_enhanced_scheduling
            or any(p in SAMPLE_FED_POLICIES for p in scenario.policies))


def instance_specs(scenario: Scenario) -> list[InstanceSpec]:
    c = scenario.cluster
    profiling = profiling_enabled(scenario)
    groups = c.groups or (InstanceGroup(count=c.instances, preset=c.preset),)
    specs: list[InstanceSpec] = []
    for group in groups:
        count, preset = group.count, group.preset
        if count < 1:
            raise ConfigError(f"cluster: instance count must be >= 1, got {count}")
        for _ in range(count):
            specs.append(InstanceSpec(
                instance_id=f"inst-{len(specs):02d}", preset=preset,
                instance_type=group.instance_type,
                max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
                num_gpu_blocks=c.num_gpu_blocks, enable_prefix_caching=c.enable_prefix_caching,
                enable_profiling=profiling, profiling_steps=c.profiling_steps or 2**62,
                queue_policy=c.queue_policy, aging_tokens_per_s=c.aging_tokens_per_s,
                batching=c.batching, lens_min_step_ms=c.lens_min_step_ms,
                lens_target_step_ms=c.lens_target_step_ms,
                lens_queue_threshold=c.lens_queue_threshold, lens_max_chunk=c.lens_max_chunk,
            ))
    return specs


def sim_settings(scenario: Scenario) -> SimSettings:
    o = scenario.observation
    return SimSettings(
        seed=scenario.seed,
        status_push_interval_s=o.status_push_interval_ms / 1000,
        load_sample_interval_s=o.load_sample_interval_ms / 1000,
        scheduler=scenario.scheduler,
        output_length_predictor=scenario.output_length_predictor,
        migration=scenario.migration,
        failures=failures(scenario),
        gateway_replay=scenario.cluster.gateway_replay,
    )


def failures(scenario: Scenario) -> tuple[Failure, ...]:
    """The scenario's instance failures, by the instance ids `instance_specs` gives."""
    specs = instance_specs(scenario)
    out = []
    for f in scenario.cluster.failures:
        if not 0 <= f.instance < len(specs):
            raise ConfigError(f"cluster.failures: instance {f.instance} does not exist "
                              f"(the cluster has {len(specs)}, numbered from 0)")
        if f.at_s < 0:
            raise ConfigError(f"cluster.failures: at_s must be >= 0, got {f.at_s}")
        out.append(Failure(instance_id=specs[f.instance].instance_id, at_s=f.at_s, kind=f.kind))
    return tuple(out)


def slo_spec(scenario: Scenario) -> SloSpec:
    s = scenario.slo
    return SloSpec(
        ttft_s=None if s.ttft_ms is None else s.ttft_ms / 1000,
        tpot_s=None if s.tpot_ms is None else s.tpot_ms / 1000,
    )


def summarize_result(result: SimResult, scenario: Scenario) -> Summary:
    w = scenario.workload
    try:
        return summarize(result.policy, result.records, slo=slo_spec(scenario),
                         warmup_s=w.warmup_s, cooldown_s=w.cooldown_s)
    except ValueError as e:
        raise ConfigError(f"--warmup / --cooldown: {e}") from e


def slo_model(scenario: Scenario) -> SloLatencyModel | None:
    """The `slo` policy's latency model, read from the scheduler's profiling paths."""
    s = scenario.scheduler
    if not s.ttft_profiling_data_path or not s.tpot_profiling_data_path:
        return None
    return read_slo_model(Path(s.ttft_profiling_data_path), Path(s.tpot_profiling_data_path))


def run_policy(
    scenario: Scenario, requests: Sequence[Request], policy: str,
    progress: Callable[[float], None] | None = None,
) -> SimResult:
    s = scenario.scheduler
    binpacking = any(p.startswith("binpacking") for p in s.rescheduling_policies)
    needs_profiles = policy in PROFILED_POLICIES or (s.enable_rescheduling and binpacking)
    model = slo_model(scenario) if needs_profiles else None
    sim = ClusterSim(requests, instance_specs(scenario), policy, sim_settings(scenario), progress,
                     model)
    use_cache_index(sim)  # scheduler: cache_index: kv-events / mooncake
    return sim.run()


def goodput(scenario: Scenario, base: Sequence[Request], policy: str, *, steps: int = 6) -> float:
    """Highest rate scale with >= 90% SLO attainment (0.0 if even the smallest tried fails)."""

    def ok(scale: float) -> bool:
        result = run_policy(scenario, shape_requests(base, scenario, scale), policy)
        attained = summarize_result(result, scenario).slo_attainment
        return attained is not None and attained >= GOODPUT_ATTAINMENT

    lo, hi = 0.0, scenario.workload.rate_scale
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return lo
    for _ in range(steps):
        mid = (lo + hi) / 2 if lo else hi / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
