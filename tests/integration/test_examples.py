"""The files under examples/: every scenario validates, and the least-kv plugin runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from prescient.policy import registry
from prescient.sim import InstanceSpec, simulate
from prescient.sim.scenario import Scenario, load_scenario
from prescient.sim.workload import parse_length_spec, synthetic_workload

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCENARIOS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".yml", ".toml"))


def test_there_are_example_scenarios() -> None:
    assert {p.name for p in SCENARIOS} >= {"default.yaml", "heterogeneous.yaml",
                                           "bursty-code.toml", "sessions.yaml"}


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_example_scenario_validates(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.policies


def test_default_example_is_the_builtin_default() -> None:
    assert load_scenario(EXAMPLES / "default.yaml") == Scenario()


def load_plugin() -> ModuleType:
    path = EXAMPLES / "plugins" / "least_kv.py"
    spec = importlib.util.spec_from_file_location("least_kv_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_least_kv_plugin_finishes_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = load_plugin()
    monkeypatch.setitem(registry.POLICIES, "least-kv", plugin.least_kv)
    requests = synthetic_workload(
        rate=20.0, num_requests=100, seed=1,
        prompt=parse_length_spec("uniform:100:1500"), output=parse_length_spec("uniform:5:200"),
    )
    instances = [InstanceSpec(instance_id=f"inst-{i}") for i in range(2)]
    result = simulate(requests, instances, "least-kv")
    assert result.policy == "least-kv"
    assert len(result.records) == 100
    assert all(r.finish_time is not None and not r.rejected for r in result.records)
    assert {r.instance_id for r in result.records} == {"inst-0", "inst-1"}


def test_policies_doc_shows_the_example_file_verbatim() -> None:
    code = (EXAMPLES / "plugins" / "least_kv.py").read_text()
    doc = (EXAMPLES.parent / "docs" / "policies.md").read_text()
    assert f"```python\n{code}```" in doc
