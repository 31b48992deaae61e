"""A llumlet status from what a stock vLLM tells its stat loggers at every step.

The status is a msgpack map whose keys are the llumlet's `InstanceStatus` field names
(`prescient.model.InstanceStatus`, upstream `cms.proto` InstanceStatus); the llumlet stamps the
instance id, `update_id` and `timestamp_ms`. What each field comes from:

- `num_running_requests`, `num_waiting_requests`: the engine scheduler's own counts
  (`SchedulerStats.num_running_reqs`, `num_waiting_reqs + num_skipped_waiting_reqs`);
- `num_total_gpu_tokens`: KV blocks x block size; `num_used_gpu_tokens`: `kv_cache_usage` of it;
- per-request fields from the API server's request table (the `OutputProcessor`, which lives
  in the same process as the stat loggers): a request that has produced no token yet is still
  being prefilled (waiting or running): its id goes to `waiting_requests` and
  `recent_waiting_requests` (the scheduler's local account then stops counting its dispatch, as
  this status counts it), and its prompt to `num_uncomputed_tokens_scheduler_waiting_prefills`;
  a request with tokens is decoding: `scheduler_running_to_decode_requests_num` and
  `scheduler_running_to_decode_tokens_num` (prompt + generated);
- the profiling sample (`profiling_id`, `step_duration` in ms, `num_scheduled_prefill_tokens`)
  from `SchedulerStats.iteration_details`, which vLLM fills only with
  `--enable-logging-iteration-details`; the duration is the step's period where the plugin
  knows it (`prescient_vllm.trace.StepClock`: from the previous step's outputs to this one's,
  scheduling and output handling included, as a queued prefill waits it), else the model
  time vLLM measured.

What vLLM's stats cannot give, and the approximation used instead:

- uncomputed prompt tokens: the API server does not see `num_computed_tokens` until the first
  token, nor prefix-cache hits per request, so a prefilling request counts its whole prompt (an
  overestimate for a chunked or cached prefill; vLLM's own `get_num_queued_tokens` does the same);
- waiting vs running prefills: both count as waiting prefills (their sum, the metric the
  scheduler reads, is the same);
- the engine's step id: steps seen by this logger are counted instead;
- migration fields: a stock vLLM cannot migrate KV; they stay 0 (migration is by token replay).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol


class RequestView(Protocol):
    """The part of vLLM's `RequestState` (v1 `output_processor.py`) read here (its `stats`,
    present when vLLM logs stats, gives the tokens generated so far)."""

    external_req_id: str | None
    request_id: str
    prompt_len: int
    is_prefilling: bool


def capacity_tokens(num_gpu_blocks: int | None, block_size: int | None) -> int:
    """KV capacity in tokens; 0 while vLLM has not sized its cache."""
    return (num_gpu_blocks or 0) * (block_size or 0)


def generated_tokens(request: RequestView) -> int:
    """Tokens a request has generated so far (0 without per-request stats)."""
    stats = getattr(request, "stats", None)
    return int(getattr(stats, "num_generation_tokens", 0) or 0)


def request_fields(requests: Iterable[RequestView]) -> dict[str, Any]:
    """The per-request status fields from the API server's request table."""
    prefilling: list[str] = []
    prefill_tokens = decodes = decode_tokens = 0
    for request in requests:
        if request.is_prefilling:
            prefilling.append(request.external_req_id or request.request_id)
            prefill_tokens += request.prompt_len
        else:
            decodes += 1
            decode_tokens += request.prompt_len + generated_tokens(request)
    return {
        "recent_waiting_requests": prefilling,
        "waiting_requests": prefilling,
        "num_uncomputed_tokens_scheduler_waiting_prefills": prefill_tokens,
        "num_uncomputed_tokens_all_waiting_prefills": prefill_tokens,
        "scheduler_running_to_decode_requests_num": decodes,
        "scheduler_running_to_decode_tokens_num": decode_tokens,
    }


def engine_status(scheduler_stats: Any, *, capacity: int, step_id: int,
                  requests: Iterable[RequestView] | None = None,
                  period_ms: float | None = None) -> dict[str, Any]:
    """The status one step's `SchedulerStats` describes (plus the request table, if known;
    `period_ms`: the step's period, if known)."""
    s = scheduler_stats
    usage = min(max(float(s.kv_cache_usage), 0.0), 1.0)
    status: dict[str, Any] = {
        "instance_id": "",
        "schedulable": True,
        "step_id": step_id,
        "num_running_requests": int(s.num_running_reqs),
        "num_waiting_requests": int(s.num_waiting_reqs)
        + int(getattr(s, "num_skipped_waiting_reqs", 0)),
        "num_total_gpu_tokens": capacity,
        "num_used_gpu_tokens": round(usage * capacity),
    }
    if requests is not None:
        status.update(request_fields(requests))
    details = getattr(s, "iteration_details", None)
    if details is not None and not details.is_dummy and details.elapsed_ms > 0:
        status.update(profiling_id=int(details.iteration_index),
                      step_duration=float(details.elapsed_ms if period_ms is None
                                          else period_ms),
                      num_scheduled_prefill_tokens=int(details.num_ctx_tokens))
    return status
