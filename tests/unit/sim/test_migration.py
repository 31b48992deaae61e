"""The simulator with a rescheduler and failing instances."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from prescient.config.scheduler import SchedulerSettings
from prescient.errors import ConfigError
from prescient.model import Request
from prescient.rescheduler import MigrationSettings
from prescient.sim.cluster import LOST, ClusterSim, Failure, InstanceSpec, SimResult, SimSettings
from prescient.sim.experiment import (
    base_requests,
    run_policy,
    shape_requests,
    sim_settings,
    summarize_result,
)
from prescient.sim.metrics import summarize, summary_to_json
from prescient.sim.scenario import scenario_from_dict
from prescient.sim.workload import LengthSpec, synthetic_workload


def workload(n: int = 300, rate: float = 15.0, seed: int = 3) -> list[Request]:
    return synthetic_workload(rate=rate, num_requests=n, prompt=LengthSpec.uniform(100, 1500),
                              output=LengthSpec.uniform(50, 600), seed=seed)


def cluster(n: int = 4, blocks: int = 700) -> list[InstanceSpec]:
    return [InstanceSpec(instance_id=f"i{k}", num_gpu_blocks=blocks) for k in range(n)]


def rescheduling(**kw: object) -> SchedulerSettings:
    return msgspec.structs.replace(
        SchedulerSettings(), enable_rescheduling=True, rescheduling_interval_ms=200,
        rescheduling_policies=("neutral_load", "neutral_failover"),
        rescheduling_neutral_load_threshold=0.6, **kw)


def run(policy: str = "round-robin", *, skip: bool = True, requests: list[Request] | None = None,
        **settings: object) -> tuple[ClusterSim, SimResult]:
    sim = ClusterSim(requests or workload(), cluster(), policy, SimSettings(**settings))  # type: ignore[arg-type]
    for engine in sim.engines.values():
        engine.skip_decode_runs = skip
    return sim, sim.run()


def check_idle(sim: ClusterSim) -> None:
    for iid, engine in sim.engines.items():
        if sim.alive(iid):
            assert not engine.has_work and not engine.busy
            assert engine.pool.num_free == engine.pool.num_blocks, iid
            assert engine.num_migrating_in == engine.num_migrating_out == 0


def test_load_rescheduling_migrates_and_every_request_completes_whole() -> None:
    sim, result = run(scheduler=rescheduling())
    migrated = [m for m in result.migrations if m.outcome == "migrated"]
    assert len(migrated) >= 5
    assert all(m.trigger == "neutral_load" for m in result.migrations)
    for m in migrated:
        assert m.src != m.dst and m.stop is not None and m.end is not None
        assert m.start <= m.stop < m.end
        assert m.downtime is not None and 0 < m.downtime < 0.2
        assert 1 <= m.stages <= 3
    assert all(r.finish_time is not None and not r.rejected for r in result.records)
    check_idle(sim)
    assert run()[1].migrations == []


def test_rescheduling_undoes_a_flooded_instance() -> None:
    # flood sends everything to one instance while it stays schedulable: the rescheduler
    # spreads the decodes, so far fewer preemptions and a much shorter tail
    requests = workload(rate=5.0)
    _, off = run("flood", requests=requests)
    _, on = run("flood", requests=requests, scheduler=rescheduling())
    assert len({r.instance_id for r in off.records}) == 1 and off.migrations == []
    assert len({m.dst for m in on.migrations if m.outcome == "migrated"}) == 3
    off_s, on_s = summarize("off", off.records), summarize("on", on.records)
    assert on_s.num_preemptions * 3 < off_s.num_preemptions
    assert on_s.ttft.p99 is not None and off_s.ttft.p99 is not None
    assert on_s.ttft.p99 * 3 < off_s.ttft.p99


def test_slots_limit_migrations_in_flight_per_instance() -> None:
    _, result = run(scheduler=rescheduling())
    for iid in ("i0", "i1", "i2", "i3"):
        for side in ("src", "dst"):
            spans = sorted((m.start, m.end) for m in result.migrations
                           if getattr(m, side) == iid)
            for (_, end), (start, _) in itertools.pairwise(spans):
                assert end is not None and start >= end  # one at a time (the default slot)
    _, wide = run(scheduler=rescheduling(),
                  migration=MigrationSettings(max_req_mig_out=4, max_req_mig_in=4))
    assert len(wide.migrations) > len(result.migrations)


def test_closed_form_decode_runs_stay_exact_with_migrations() -> None:
    results = [run(scheduler=rescheduling(), skip=skip)[1] for skip in (True, False)]
    a, b = results
    assert [(m.request_id, m.src, m.dst, m.outcome, m.blocks) for m in a.migrations] == [
        (m.request_id, m.src, m.dst, m.outcome, m.blocks) for m in b.migrations]
    for ra, rb in zip(a.records, b.records, strict=True):
        assert ra.finish_time == pytest.approx(rb.finish_time, rel=1e-9, abs=1e-12)
        assert ra.first_token_time == pytest.approx(rb.first_token_time, rel=1e-9, abs=1e-12)
        assert ra.num_preemptions == rb.num_preemptions


def test_runs_with_rescheduling_are_deterministic() -> None:
    def once() -> bytes:
        _, result = run("load-balance", scheduler=rescheduling(), seed=7)
        return summary_to_json([summarize("x", result.records)])

    assert once() == once()


def test_a_crashed_instance_loses_nothing_when_the_gateway_replays() -> None:
    crash = (Failure(instance_id="i1", at_s=4.0),)
    sim, result = run("load-balance", failures=crash)
    assert result.num_replayed > 0
    assert all(r.finish_time is not None and not r.rejected for r in result.records)
    assert not any(r.instance_id == "i1" for r in result.records
                   if r.arrival_time > 4.0 + 0.5)  # avoided once it refused (the gateway)
    check_idle(sim)
    _, lost = run("load-balance", failures=crash, gateway_replay=False)
    assert sum(r.rejected == LOST for r in lost.records) == result.num_replayed > 0


def test_a_replayed_request_keeps_its_first_token_and_its_length() -> None:
    crash = (Failure(instance_id="i0", at_s=3.0),)
    _, base = run(requests=workload())
    _, result = run(requests=workload(), failures=crash)
    before = {r.request_id: r for r in base.records}
    cut = [r for r in result.records if r.instance_id != before[r.request_id].instance_id]
    assert cut
    for r in result.records:
        if r.first_token_time is not None and r.first_token_time < 3.0:
            assert r.first_token_time == before[r.request_id].first_token_time
        assert r.output_len == before[r.request_id].output_len


def test_a_draining_instance_is_emptied_by_the_failover_policies() -> None:
    drain = (Failure(instance_id="i2", at_s=3.0, kind="drain"),)
    sim, result = run("load-balance", scheduler=rescheduling(), failures=drain)
    failover = [m for m in result.migrations if m.trigger == "neutral_failover"]
    assert failover and all(m.src == "i2" for m in failover)
    assert sum(m.outcome == "migrated" for m in failover) >= 3
    late = [r for r in result.records if r.arrival_time > 4.0]
    assert late and not any(r.instance_id == "i2" for r in late)  # unschedulable: avoided
    assert all(r.finish_time is not None and not r.rejected for r in result.records)
    check_idle(sim)


def test_rescheduling_into_a_crashed_instance_is_abandoned_cleanly() -> None:
    failures = (Failure(instance_id="i3", at_s=2.0), Failure(instance_id="i0", at_s=5.0))
    sim, result = run(scheduler=rescheduling(), failures=failures)
    assert all(r.finish_time is not None and not r.rejected for r in result.records)
    assert all(m.outcome for m in result.migrations)
    check_idle(sim)


def test_scenarios_take_failures_and_migration_settings() -> None:
    scenario = scenario_from_dict({
        "cluster": {"instances": 4, "failures": [{"instance": 3, "at_s": 60}],
                    "gateway_replay": False},
        "migration": {"bandwidth_gb_s": 50, "max_req_mig_in": 2},
        "scheduler": {"enable_rescheduling": True},
    })
    settings = sim_settings(scenario)
    assert settings.failures == (Failure(instance_id="inst-03", at_s=60.0, kind="crash"),)
    assert settings.migration.bandwidth_gb_s == 50 and settings.migration.max_req_mig_in == 2
    assert settings.gateway_replay is False and settings.scheduler.enable_rescheduling
    bad = scenario_from_dict({"cluster": {"instances": 2, "failures": [{"instance": 2,
                                                                        "at_s": 1}]}})
    with pytest.raises(ConfigError, match="instance 2 does not exist"):
        sim_settings(bad)
    with pytest.raises(ConfigError, match="migration"):
        scenario_from_dict({"migration": {"bandwidth": 5}})


def test_a_scenario_runs_rescheduling_and_failures_end_to_end() -> None:
    scenario = scenario_from_dict({
        "policies": ["load-balance"],
        "cluster": {"instances": 4, "num_gpu_blocks": 700,
                    "failures": [{"instance": 1, "at_s": 5}, {"instance": 2, "at_s": 8,
                                                             "kind": "drain"}]},
        "workload": {"kind": "synthetic", "rate_scale": 1.0, "warmup_s": 0, "cooldown_s": 0,
                     "synthetic": {"rate": 15, "num_requests": 300, "prompt": "uniform:100:1500",
                                   "output": "uniform:50:600"}},
        "scheduler": {"enable_rescheduling": True, "rescheduling_interval_ms": 200,
                      "rescheduling_policies": ["neutral_load", "neutral_failover"],
                      "rescheduling_neutral_load_threshold": 0.6},
    })
    requests = shape_requests(base_requests(scenario), scenario, 1.0)
    result = run_policy(scenario, requests, "load-balance")
    triggers = {m.trigger for m in result.migrations if m.outcome == "migrated"}
    assert triggers == {"neutral_load", "neutral_failover"}
    assert result.num_replayed > 0
    summary = summarize_result(result, scenario)
    assert summary.num_completed == summary.num_requests == 300
