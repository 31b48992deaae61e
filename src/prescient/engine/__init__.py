"""The simulated engine: a vLLM-like step function with paged KV and a prefix cache."""

from prescient.engine.config import EngineConfig
from prescient.engine.core import SimEngine, StepOutcome
from prescient.engine.kv_cache import BlockPool
from prescient.engine.request import EngineRequest
from prescient.engine.step_time import AnalyticStepTime, StepTimeModel, TableStepTime

__all__ = [
    "AnalyticStepTime",
    "BlockPool",
    "EngineConfig",
    "EngineRequest",
    "SimEngine",
    "StepOutcome",
    "StepTimeModel",
    "TableStepTime",
]
