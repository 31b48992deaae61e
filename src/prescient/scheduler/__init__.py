"""The scheduler as a live component: in process (`core`), over HTTP (`service`, `client`).

Only the wire types are re-exported here. `SchedulerCore` (`prescient.scheduler.core`),
`RemoteScheduler` (`.client`) and the service (`.service`, `.cli`) are imported from their
modules, so a gateway that only calls a remote scheduler does not load the scheduling core and
the core does not load aiohttp.
"""

from prescient.scheduler.wire import (
    Endpoint,
    LLMInstance,
    NoInstanceAvailableError,
    ReportItem,
    Scheduler,
    ScheduleRequest,
    SchedulerUnavailableError,
)

__all__ = [
    "Endpoint",
    "LLMInstance",
    "NoInstanceAvailableError",
    "ReportItem",
    "ScheduleRequest",
    "Scheduler",
    "SchedulerUnavailableError",
]
