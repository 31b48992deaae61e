"""The discrete-event cluster simulator: workloads, the cluster driver, metrics and reports."""

from prescient.sim.cluster import InstanceSpec, SimResult, SimSettings, simulate
from prescient.sim.records import LoadSample, RequestRecord
from prescient.sim.scenario import Scenario, load_scenario

__all__ = [
    "InstanceSpec",
    "LoadSample",
    "RequestRecord",
    "Scenario",
    "SimResult",
    "SimSettings",
    "load_scenario",
    "simulate",
]
