"""Step timing beyond vLLM's stats: `StepClock` (each step's period) and `StepTrace` (every
step's timing and shape, and each finished request's engine-side latencies, appended as JSON
lines to the file `PRESCIENT_STEP_TRACE` names; bench/vllm_fidelity.py fits a simulator
preset to it).

vLLM's iteration details give a step's model time; a step's *period* (model time plus the
engine loop's scheduling and output handling: what a stream's token gap shows, and what a
queued prefill waits per step) needs the engine core's own timestamp of each step's outputs
(`EngineCoreOutputs.timestamp`, CLOCK_MONOTONIC, so comparable with `time.monotonic()`
anywhere on the host). vLLM hands that timestamp to its output processor but not to stat
loggers, so `StepClock` wraps the processor's `process_outputs` to see it.

Lines, one JSON object each:

- a step: `{"t": the engine's timestamp of the step's outputs in s (null for a step that had
  none, a prefill chunk that finished no prompt), "model_ms", "prefills", "prefill_tokens",
  "decodes", "decode_context": context tokens (prompt + generated) of the decoding requests
  after the step, "running", "waiting"}`;
- a finished request: `{"request": its external id, "prompt", "cached", "generated",
  "queued_s", "prefill_s", "decode_s"}` (vLLM's `FinishedRequestStats`: queued from arrival
  at the engine core to first scheduled, prefill from then to the first token, decode from
  the first token to the last).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from prescient_vllm.status import RequestView, generated_tokens

TRACE_ENV = "PRESCIENT_STEP_TRACE"


class StepClock:
    """The engine's timestamp of each step's outputs, and the step's period when it ran
    straight after the step before (which left requests running or waiting)."""

    def __init__(self, output_processor: Any) -> None:
        self._stamp: float | None = None
        self._last: float | None = None
        self._busy = False
        process = output_processor.process_outputs

        def stamped(outputs: Any, engine_core_timestamp: float | None = None,
                    *args: Any, **kwargs: Any) -> Any:
            self._stamp = engine_core_timestamp
            return process(outputs, engine_core_timestamp, *args, **kwargs)

        output_processor.process_outputs = stamped

    def tick(self, scheduler_stats: Any) -> tuple[float | None, float | None]:
        """(timestamp s, period ms) of the step `scheduler_stats` describes; None where unknown
        (a step without outputs, such as a prefill chunk that finished no prompt, has no
        timestamp, and the step after it no period; nor has the first step after an idle
        spell)."""
        stamp, self._stamp = self._stamp, None
        period = None
        if stamp is not None and self._busy and self._last is not None:
            period = (stamp - self._last) * 1e3
        self._last = stamp  # after a step without outputs, the next gap would span two steps
        self._busy = scheduler_stats.num_running_reqs + scheduler_stats.num_waiting_reqs > 0
        return stamp, period


class StepTrace:
    """Appends one engine's steps and finished requests to `path`."""

    def __init__(self, path: str) -> None:
        # line-buffered: a reader sees each step as soon as it is written (one write per step
        # is microseconds against steps of milliseconds)
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._encoder = msgspec.json.Encoder()

    def record(self, scheduler_stats: Any, iteration_stats: Any,
               requests: Iterable[RequestView] | None, stamp: float | None) -> None:
        """One step (`stamp`: its outputs' engine timestamp, from `StepClock`)."""
        details = getattr(scheduler_stats, "iteration_details", None)
        lines = []
        if details is not None and not details.is_dummy:
            context = sum(r.prompt_len + generated_tokens(r) for r in requests or ()
                          if not r.is_prefilling)
            lines.append({
                "t": stamp, "model_ms": float(details.elapsed_ms),
                "prefills": int(details.num_ctx_requests),
                "prefill_tokens": int(details.num_ctx_tokens),
                "decodes": int(details.num_generation_requests), "decode_context": context,
                "running": int(scheduler_stats.num_running_reqs),
                "waiting": int(scheduler_stats.num_waiting_reqs)})
        for done in getattr(iteration_stats, "finished_requests", None) or ():
            lines.append({
                "request": done.request_id, "prompt": int(done.num_prompt_tokens),
                "cached": int(done.num_cached_tokens),
                "generated": int(done.num_generation_tokens),
                "queued_s": float(done.queued_time), "prefill_s": float(done.prefill_time),
                "decode_s": float(done.decode_time)})
        if lines:
            self._file.write("".join(self._encoder.encode(line).decode() + "\n"
                                     for line in lines))

    def close(self) -> None:
        self._file.close()
