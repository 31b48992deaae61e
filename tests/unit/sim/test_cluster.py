from __future__ import annotations

import random

import msgspec
import pytest

from prescient.config.scheduler import SchedulerSettings
from prescient.errors import ConfigError
from prescient.model import Decision, InferType, Request
from prescient.policy import Dispatcher, Pipeline
from prescient.policy import registry as policy_registry
from prescient.policy.selectors import RoundRobinSelector
from prescient.sim.cluster import ClusterSim, InstanceSpec, SimSettings, simulate
from prescient.sim.metrics import summarize, summary_to_json
from prescient.sim.workload import LengthSpec, synthetic_workload


def workload(n: int = 400, rate: float = 40.0, seed: int = 5) -> list[Request]:
    return synthetic_workload(rate=rate, num_requests=n, prompt=LengthSpec.uniform(50, 1500),
                              output=LengthSpec.uniform(5, 300), seed=seed)


def cluster(n: int = 4) -> list[InstanceSpec]:
    return [InstanceSpec(instance_id=f"i{k}") for k in range(n)]


class SpyDispatcher(Dispatcher):
    """Round-robin that records what the CMS view held at each dispatch."""

    def __init__(self, sim_ref: list[ClusterSim], rng: random.Random) -> None:
        super().__init__("spy", {InferType.NEUTRAL: Pipeline([], RoundRobinSelector())}, rng,
                         full_mode=False)
        self.sim_ref = sim_ref
        self.seen: list[tuple[float, str, int | None, int]] = []

    def schedule(self, request: Request, now: float, *args: object, **kw: object) -> Decision:
        for iid in self.state.ids:
            st = self.cms.status(iid)
            truth = self.sim_ref[0].engines[iid].snapshot(now, 0)
            known = 0 if st is None else st.num_running_requests + st.num_waiting_requests
            self.seen.append((now, iid, None if st is None else st.timestamp_ms,
                              truth.num_running_requests + truth.num_waiting_requests - known))
        return super().schedule(request, now)


def test_the_router_sees_the_last_polled_push_not_the_truth(monkeypatch) -> None:
    sim_ref: list[ClusterSim] = []
    spy = SpyDispatcher(sim_ref, random.Random(0))
    monkeypatch.setitem(policy_registry.POLICIES, "spy", lambda settings, rng: spy)
    settings = SimSettings(seed=1, status_push_interval_s=0.04)  # polls every 500 ms
    sim = ClusterSim(workload(), cluster(), "spy", settings)
    sim_ref.append(sim)
    sim.run()
    push, poll = 0.04, 0.5
    stale = 0
    for now, iid, ts, diff in spy.seen:
        last_poll = (now // poll) * poll
        if last_poll == 0.0:
            assert ts == 0  # the idle status every llumlet pushes when it registers
            continue
        phase = sim._push_phase[iid]
        last_push = phase + ((last_poll - phase) // push) * push
        assert ts == round(last_push * 1000)
        stale += diff != 0
    assert stale > 0  # the truth moved on between polls


def test_same_seed_gives_byte_identical_summaries_and_different_seeds_differ() -> None:
    def run(seed: int) -> bytes:
        res = simulate(workload(), cluster(), "random", SimSettings(seed=seed))
        return summary_to_json([summarize("random", res.records)])

    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize("policy", ["round-robin", "random", "least-requests", "power-of-two",
                                    "oracle"])
def test_every_policy_finishes_every_request(policy: str) -> None:
    requests = workload(n=200)
    res = simulate(requests, cluster(), policy, SimSettings(seed=2))
    assert [r.request_id for r in res.records] == [r.request_id for r in requests]
    assert all(r.finish_time is not None and not r.rejected for r in res.records)
    assert {r.instance_id for r in res.records} == {"i0", "i1", "i2", "i3"}


def test_round_robin_cycles_and_least_requests_counts_drain() -> None:
    requests = workload(n=8, rate=1000.0)
    res = simulate(requests, cluster(), "round-robin", SimSettings())
    assert [r.instance_id for r in res.records] == ["i0", "i1", "i2", "i3"] * 2
    sim = ClusterSim(requests, cluster(), "least-requests", SimSettings())
    sim.run()
    assert sim.policy.state.lite.sum() == 0  # every count released


def test_oracle_beats_random_on_a_loaded_cluster() -> None:
    requests = workload(n=1500, rate=60.0, seed=9)
    ttft = {p: summarize(p, simulate(requests, cluster(), p, SimSettings(seed=1)).records).ttft
            for p in ("random", "oracle")}
    assert ttft["oracle"].mean < ttft["random"].mean  # type: ignore[operator]


def test_impossible_requests_are_rejected_and_counted_not_hung() -> None:
    big = Request(request_id="huge", prompt_len=6_000, output_len=10, arrival_time=0.1)
    small = [InstanceSpec(instance_id=f"i{k}", num_gpu_blocks=300) for k in range(2)]
    res = simulate([*workload(n=20), big], small, "round-robin", SimSettings())
    rejected = [r for r in res.records if r.rejected]
    assert [r.request_id for r in rejected] == ["huge"]
    assert "KV cache capacity" in rejected[0].rejected
    assert summarize("rr", res.records).num_rejected == 1


def test_bad_cluster_configurations_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        simulate(workload(n=2), [InstanceSpec(instance_id="a")] * 2, "random")
    with pytest.raises(ConfigError, match="unknown preset"):
        simulate(workload(n=2), [InstanceSpec(instance_id="a", preset="x")], "random")
    with pytest.raises(ConfigError, match="unknown policy"):
        simulate(workload(n=2), cluster(1), "nope")
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        simulate(workload(n=2), [InstanceSpec(instance_id="a", max_num_batched_tokens=8)],
                 "random")
    with pytest.raises(ConfigError):
        SimSettings(status_push_interval_s=0)


def test_load_balance_accounts_drain_in_full_and_lite_mode() -> None:
    requests = workload(n=300, rate=60.0)
    lite_settings = msgspec.structs.replace(
        SchedulerSettings(), enable_full_mode_scheduling=False,
        dispatch_neutral_load_metric="num_tokens")
    for scheduler in (SchedulerSettings(), lite_settings):
        sim = ClusterSim(requests, cluster(), "load-balance", SimSettings(scheduler=scheduler))
        result = sim.run()
        assert all(r.finish_time is not None for r in result.records)
        assert sim.policy.state.lite.sum() == 0
        assert sim.policy.state.account.sum() == 0
        assert len({r.instance_id for r in result.records}) == 4
