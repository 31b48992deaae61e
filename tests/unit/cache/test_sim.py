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
