"""The scheduler's wire types: upstream Llumnix's `/schedule`, `/release` and `/report` JSON.

Field names follow `pkg/types/scheduling_request.go` and `llm_instance.go`, so an upstream
gateway can call our scheduler and ours can call theirs. One deliberate difference: an
`LLMInstance.id` here is the CMS instance id (upstream builds `"<ip>_instance<dp_rank>_<dp_size>"`),
so a release names the same instance the local account counted.

The gateway talks to any `Scheduler`: the embedded one (in process) or a remote service over
HTTP. Both raise the same two errors, which the gateway maps to its behaviour:

- `NoInstanceAvailableError` (HTTP 429 on the wire): wait and retry until
  `--wait-scheduling-timeout`;
- `SchedulerUnavailableError` (any other failure, including "CMS not available"): fall back to
  local round-robin over the instances the gateway discovered itself.
"""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec

from prescient.errors import PrescientError


class Endpoint(msgspec.Struct, frozen=True):
    host: str
    port: int


class LLMInstance(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=False):
    """One placement of a request: where a leg runs and how to reach it."""

    version: int = 0
    id: str
    model: str = ""
    infer_type: Literal["prefill", "decode", "neutral"] = "neutral"
    endpoint: Endpoint
    aux_ip: str = ""  # the KV-transfer address (PD forwarding)
    aux_port: int = 0
    dp_rank: int = 0
    dp_size: int = 1


class ScheduleRequest(msgspec.Struct, kw_only=True):
    """`POST /schedule` body; the response is the same object with `scheduling_result` filled.

    `POST /release` carries the same object with `scheduling_result` naming the instances to
    release.
    """

    id: str
    model: str = ""
    gateway_id: str = ""
    scheduling_mode: Literal["neutral", "pd_batch", "pd_staged"] = "neutral"
    scheduling_stage: Literal["", "prefill", "decode"] = ""
    prompt_num_tokens: int = 0
    prompt_token_ids: list[int] | None = None
    scheduling_result: list[LLMInstance] = msgspec.field(default_factory=list)


class ReportItem(msgspec.Struct, kw_only=True):
    """One entry of a `POST /report` body (lite mode): the request grew to `num_tokens`."""

    kind: Literal["state_update", "prefill_done"] = "state_update"
    id: str
    model: str = ""
    infer_type: Literal["prefill", "decode", "neutral"] = "neutral"
    instance_id: str
    gateway_id: str = ""
    num_tokens: int = 0


class NoInstanceAvailableError(PrescientError):
    """No instance can take the request now (HTTP 429); retry later."""


class SchedulerUnavailableError(PrescientError):
    """The scheduler cannot decide (unreachable, CMS down, bad answer); fall back locally."""


class Scheduler(Protocol):
    """What the gateway needs from a scheduler, embedded or remote."""

    async def schedule(self, request: ScheduleRequest) -> list[LLMInstance]:
        """Place the request; raises `NoInstanceAvailableError` or `SchedulerUnavailableError`."""
        ...

    async def release(self, request: ScheduleRequest) -> None:
        """Forget the request's in-flight load (a failed forward, or lite-mode completion)."""
        ...

    async def report(self, items: list[ReportItem]) -> None:
        """Lite mode: token counts seen by the gateway."""
        ...

    async def close(self) -> None:
        ...


class InProcessScheduler(Scheduler, Protocol):
    """A scheduler in the gateway's own process (`SchedulerCore`): while `waits` is False its
    decisions are plain calls, and the gateway calls them instead of awaiting `schedule` and
    `release` (a coroutine less each)."""

    waits: bool

    def schedule_now(self, request: ScheduleRequest) -> list[LLMInstance]: ...

    def release_now(self, request: ScheduleRequest) -> None: ...
