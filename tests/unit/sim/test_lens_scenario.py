"""LENS's scenario keys reach every simulated engine."""

from __future__ import annotations

from prescient.sim import experiment
from prescient.sim.cluster import build_engines
from prescient.sim.scenario import scenario_from_dict


def test_lens_keys_configure_the_engines() -> None:
    scenario = scenario_from_dict({"cluster": {
        "instances": 2, "batching": "lens", "lens_min_step_ms": 10.0,
        "lens_target_step_ms": 40.0, "lens_queue_threshold": 8, "lens_max_chunk": 256}})
    engines = build_engines(experiment.instance_specs(scenario))
    for engine in engines.values():
        c = engine.config
        assert (c.batching, c.lens_min_step_ms, c.lens_target_step_ms) == ("lens", 10.0, 40.0)
        assert (c.lens_queue_threshold, c.lens_max_chunk) == (8, 256)


def test_engines_batch_as_vllm_by_default() -> None:
    engines = build_engines(experiment.instance_specs(scenario_from_dict({})))
    assert {e.config.batching for e in engines.values()} == {"vllm"}
