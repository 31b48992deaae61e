from __future__ import annotations

import pytest

from prescient.errors import ConfigError
from prescient.sim import experiment
from prescient.sim.scenario import Scenario, scenario_from_dict


def small_scenario(**workload: object) -> Scenario:
    return scenario_from_dict({
        "policies": ["round-robin"],
        "cluster": {"instances": 2, "max_num_seqs": 64, "max_num_batched_tokens": 2048},
        "workload": {"kind": "synthetic", "rate_scale": 1.0, "warmup_s": 0, "cooldown_s": 0,
                     "synthetic": {"rate": 10.0, "num_requests": 300,
                                   "prompt": "uniform:200:1200", "output": "uniform:20:200"},
                     **workload},
        "slo": {"ttft_ms": 300, "tpot_ms": 40},
    })


def attainment(scenario: Scenario, scale: float) -> float:
    base = experiment.base_requests(scenario)
    requests = experiment.shape_requests(base, scenario, scale)
    result = experiment.run_policy(scenario, requests, "round-robin")
    value = experiment.summarize_result(result, scenario).slo_attainment
    assert value is not None
    return value


def test_goodput_is_the_edge_of_90_percent_attainment() -> None:
    scenario = small_scenario()
    base = experiment.base_requests(scenario)
    g = experiment.goodput(scenario, base, "round-robin")
    assert g > 1.0
    assert attainment(scenario, g) >= 0.9
    assert attainment(scenario, g * 1.25) < 0.9


def test_heterogeneous_groups_become_instances_in_order() -> None:
    scenario = scenario_from_dict({"cluster": {"groups": [
        {"count": 2, "preset": "llama3-8b-h100"}, {"count": 1, "preset": "qwen3-32b-h20"}]}})
    specs = experiment.instance_specs(scenario)
    assert [(s.instance_id, s.preset) for s in specs] == [
        ("inst-00", "llama3-8b-h100"), ("inst-01", "llama3-8b-h100"),
        ("inst-02", "qwen3-32b-h20")]


def test_shaping_scales_time_and_truncates() -> None:
    scenario = small_scenario(duration_s=5.0)
    base = experiment.base_requests(scenario)
    shaped = experiment.shape_requests(base, scenario, 2.0)
    assert shaped[0].arrival_time == 0.0
    assert max(r.arrival_time for r in shaped) < 5.0
    assert len(shaped) == pytest.approx(100, rel=0.3)  # 10 req/s x2 for 5 s
    with pytest.raises(ConfigError, match="empty"):
        experiment.shape_requests(base, small_scenario(num_requests=0), 1.0)


def test_unknown_policies_fail_before_any_run() -> None:
    with pytest.raises(ConfigError, match="oracle"):
        experiment.check_policies(["round-robin", "least-kv"])
