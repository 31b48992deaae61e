"""P/D disaggregation in the simulator: static splits and adaptive PD, batch and staged."""

from __future__ import annotations

import msgspec
import pytest

from prescient.config.presets import get_preset
from prescient.config.scheduler import SchedulerSettings
from prescient.model import InferType, Request
from prescient.predict.slo import SloLatencyModel, TpotProfile, TtftProfile
from prescient.profiling import profile_engine
from prescient.rescheduler import MigrationSettings, copy_time_s
from prescient.sim.cluster import ClusterSim, Failure, InstanceSpec, SimSettings, simulate
from prescient.sim.experiment import base_requests, run_policy
from prescient.sim.scenario import scenario_from_dict
from prescient.sim.workload import LengthSpec, synthetic_workload

PRESET = "llama3-8b-h100"
P, D, N = InferType.PREFILL, InferType.DECODE, InferType.NEUTRAL


def workload(n: int = 300, rate: float = 30.0) -> list[Request]:
    return synthetic_workload(rate=rate, num_requests=n, prompt=LengthSpec.uniform(50, 3000),
                              output=LengthSpec.uniform(1, 300), seed=3)


def specs(*types: InferType) -> list[InstanceSpec]:
    return [InstanceSpec(instance_id=f"i{k}", preset=PRESET, instance_type=t, max_num_seqs=64,
                         enable_profiling=True, profiling_steps=2**62)
            for k, t in enumerate(types)]


def sim_settings(**flags: object) -> SimSettings:
    scheduler = msgspec.structs.replace(SchedulerSettings(), **flags)
    return SimSettings(seed=1, scheduler=scheduler)


@pytest.fixture(scope="module")
def slo_model() -> SloLatencyModel:
    ttft, tpot = profile_engine(PRESET, tokens_grid=(16, 256, 1024, 4096, 8192),
                                batch_grid=(1, 8, 32, 64), tpr_grid=(8, 256, 2048),
                                max_num_batched_tokens=8192, repeats=3)
    return SloLatencyModel.from_profiles(msgspec.convert(ttft, TtftProfile),
                                         msgspec.convert(tpot, TpotProfile))


def finished_all(result) -> bool:
    return all(r.finish_time is not None and not r.rejected for r in result.records)


@pytest.mark.parametrize("staged", [False, True])
def test_a_static_split_prefills_on_p_and_decodes_on_d(staged: bool) -> None:
    requests = workload()
    sim = ClusterSim(requests, specs(P, P, D, D), "load-balance",
                     sim_settings(separate_pd_scheduling=staged))
    result = sim.run()
    assert finished_all(result)
    multi = [r for r in result.records if r.output_len > 1]
    assert {r.instance_id for r in multi} == {"i2", "i3"}  # the decode leg's instance
    # the prefill instances ran every prompt but decoded nothing beyond their one token
    assert all(r.first_token_time > r.first_scheduled_time for r in result.records)
    prefill_steps = sim.engines["i0"].num_steps + sim.engines["i1"].num_steps
    decode_steps = sim.engines["i2"].num_steps + sim.engines["i3"].num_steps
    assert decode_steps > prefill_steps > 0


def test_the_first_token_comes_from_the_decode_instance_after_the_kv_transfer() -> None:
    req = Request(request_id="r", prompt_len=4000, output_len=20)
    link = MigrationSettings(bandwidth_gb_s=1.0)  # slow enough to see
    settings = msgspec.structs.replace(sim_settings(), migration=link)
    split = simulate([req], specs(P, D), "load-balance", settings).records[0]
    alone = simulate([req], specs(N), "load-balance", settings).records[0]
    preset = get_preset(PRESET)
    transfer = copy_time_s(-(-4000 // preset.block_size), preset.block_size,
                           preset.kv_bytes_per_token, link)
    assert split.instance_id == "i1"
    # prefill (as alone) + transfer + the decode instance's one-token step
    assert split.ttft == pytest.approx(alone.ttft + transfer, abs=0.05)
    assert split.ttft > alone.ttft + transfer
    assert split.tpot == pytest.approx(alone.tpot, rel=0.05)


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("rescheduling", [False, True])
def test_adaptive_pd_completes_every_request(slo_model: SloLatencyModel, staged: bool,
                                             rescheduling: bool) -> None:
    flags = dict(enable_adaptive_pd=True, separate_pd_scheduling=staged, tpot_slo=30.0,
                 tpot_slo_dispatch_threshold=0.85, enable_rescheduling=rescheduling,
                 rescheduling_policies=(), rescheduling_interval_ms=100)
    result = simulate(workload(n=400, rate=40.0), specs(N, N, N, N), "slo",
                      sim_settings(**flags), slo_model=slo_model)
    assert finished_all(result)
    decoders = {r.instance_id for r in result.records if r.output_len > 1}
    assert len(decoders) >= 2  # roles follow the load: more than the reserved decode instance
    if rescheduling:
        moved = [m for m in result.migrations if m.outcome == "migrated"]
        assert moved and {m.trigger for m in moved} <= {
            "binpacking_mitigation", "binpacking_consolidation"}
    else:
        assert not result.migrations


@pytest.mark.parametrize("failed", ["i0", "i2"])
def test_a_crashed_prefill_or_decode_instance_loses_no_request(failed: str) -> None:
    settings = msgspec.structs.replace(
        sim_settings(), failures=(Failure(instance_id=failed, at_s=3.0),))
    result = simulate(workload(rate=80.0), specs(P, P, D, D), "load-balance", settings)
    assert finished_all(result)
    assert result.num_replayed > 0  # it had requests when it died


def test_a_scenario_splits_its_cluster_by_group_instance_type() -> None:
    scenario = scenario_from_dict({
        "cluster": {"groups": [{"count": 2, "instance_type": "prefill"},
                               {"count": 1, "instance_type": "decode"}]},
        "workload": {"kind": "synthetic", "synthetic": {"rate": 20.0, "num_requests": 100}},
        "scheduler": {"separate_pd_scheduling": True}})
    result = run_policy(scenario, base_requests(scenario), "load-balance")
    assert finished_all(result)
    assert {r.instance_id for r in result.records if r.output_len > 1} == {"inst-02"}
