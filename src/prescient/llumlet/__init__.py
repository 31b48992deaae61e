"""The llumlet: the per-instance agent that keeps an engine's records in the CMS.

`Llumlet` registers the instance's metadata, writes the newest status its engine pushes
(coalesced to one write per push interval), heartbeats the metadata, and marks the instance
unschedulable when the engine goes silent. `StatusSource`s pull a status when the engine does
not push: from an in-process engine (`SnapshotSource`) or a stock vLLM/SGLang `/metrics`
endpoint (`MetricsScrapeSource`).
"""

from prescient.llumlet.agent import Llumlet
from prescient.llumlet.sources import MetricsScrapeSource, SnapshotSource, StatusSource

__all__ = ["Llumlet", "MetricsScrapeSource", "SnapshotSource", "StatusSource"]
