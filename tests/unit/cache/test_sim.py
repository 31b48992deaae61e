"""Cache-aware scheduling in the simulator: both backends find the sessions' prefixes."""

from __future__ import annotations

import msgspec
import pytest

from prescient.cache.kv_events import KvEventsIndex
from prescient.cache.sim import use_kv_events
from prescient.config.scheduler import SchedulerSettings
from prescient.errors import ConfigError
from prescient.model import Request
from prescient.sim.cluster import ClusterSim, InstanceSpec, SimSettings
from prescient.sim.workload import parse_length_spec, session_workload

CACHE = msgspec.structs.replace(SchedulerSettings(), enable_cache_aware_scheduling=True,
                                cache_aware_scheduling_min_tokens=0)


def workload() -> list[Request]:
    return session_workload(
        num_sessions=40, turns=parse_length_spec("uniform:3:5"), session_rate=4.0,
        think_time=2.0, first_prompt=parse_length_spec("uniform:1000:3000"),
        turn_prompt=parse_length_spec("uniform:50:300"), output=parse_length_spec("50"), seed=1)


def simulation(policy: str, scheduler: SchedulerSettings) -> ClusterSim:
    specs = [InstanceSpec(instance_id=f"i{k}", preset="llama3-8b-h100") for k in range(4)]
    return ClusterSim(workload(), specs, policy, SimSettings(seed=0, scheduler=scheduler))


def hit_rate(sim: ClusterSim) -> float:
    records = sim.run().records
    return sum(r.num_cached_tokens for r in records) / sum(r.prompt_len for r in records)


def test_both_backends_raise_the_prefix_hit_rate_over_cache_blind_dispatch() -> None:
    blind = hit_rate(simulation("round-robin", SchedulerSettings()))
    approximate = hit_rate(simulation("load-balance", CACHE))
    sim = simulation("load-balance", CACHE)
    use_kv_events(sim)
    events = hit_rate(sim)
    assert approximate > blind + 0.2 and events > blind + 0.2


def test_the_kv_events_index_mirrors_every_engine_cache() -> None:
    sim = simulation("load-balance", CACHE)
    index = use_kv_events(sim)
    sim.run()
    for iid, engine in sim.engines.items():
        cached = set(engine.pool._refs) | set(engine.pool._cached_free)
        assert cached, iid
        assert index.blocks.size(iid) == len(cached)
        assert all(index.blocks.holds(iid, h) for h in cached)


def test_only_a_cache_aware_policy_takes_an_index() -> None:
    with pytest.raises(ConfigError, match="not cache-aware"):
        use_kv_events(simulation("round-robin", SchedulerSettings()))
    assert isinstance(use_kv_events(simulation("dynamo-kv", SchedulerSettings())),
                      KvEventsIndex)


def test_the_simulated_mooncake_service_finds_prefixes_at_chunk_granularity() -> None:
    from prescient.cache.sim import use_mooncake

    blind = hit_rate(simulation("load-balance", msgspec.structs.replace(
        CACHE, enable_cache_aware_scheduling=False)))
    sim = simulation("load-balance", msgspec.structs.replace(CACHE, kvs_chunk_size=64))
    service = use_mooncake(sim)
    assert hit_rate(sim) > blind + 0.2
    assert service.num_queries > 0 and service.num_failed == service.num_skipped == 0


def test_a_mooncake_outage_fails_queries_then_skips_them_for_the_down_window() -> None:
    from prescient.cache.sim import use_mooncake

    settings = msgspec.structs.replace(CACHE, kvs_chunk_size=64,
                                       kvs_metadata_service_down_duration_s=5)
    healthy = simulation("load-balance", settings)
    use_mooncake(healthy)
    sim = simulation("load-balance", settings)
    service = use_mooncake(sim, outages=[(0.0, 1e9)])  # down for the whole run
    assert hit_rate(sim) < hit_rate(healthy) - 0.2
    assert service.num_failed >= 1 and service.num_skipped > service.num_failed
    # an outage that ends: queries resume after the down window and hits come back
    sim = simulation("load-balance", settings)
    service = use_mooncake(sim, outages=[(0.0, 2.0)])
    rate = hit_rate(sim)
    assert service.num_failed >= 1 and service.num_queries > service.num_failed
    assert rate > hit_rate(simulation("round-robin", SchedulerSettings())) + 0.1
    with pytest.raises(ConfigError, match="--kvs-chunk-size 40 must be a multiple"):
        use_mooncake(simulation("load-balance", msgspec.structs.replace(CACHE,
                                                                        kvs_chunk_size=40)))


def test_the_scenarios_cache_index_picks_the_simulated_backend() -> None:
    from prescient.cache.sim import SimMooncakeService, use_cache_index

    def backend(policy: str, **flags: object) -> object:
        return use_cache_index(simulation(policy, msgspec.structs.replace(CACHE, **flags)))

    assert backend("load-balance") is None  # approximate: the router's history
    assert isinstance(backend("load-balance", cache_index="kv-events"), KvEventsIndex)
    assert isinstance(backend("load-balance", cache_index="mooncake", kvs_chunk_size=64),
                      SimMooncakeService)
    assert backend("round-robin", cache_index="kv-events") is None  # cache-blind baseline
