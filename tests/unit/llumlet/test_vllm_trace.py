"""The vLLM plugin's step clock and step trace (integrations/vllm `prescient_vllm.trace`), on
stand-ins for vLLM's output processor and stats objects; tests/live/vllm/test_step_trace.py
runs them in a real engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "integrations/vllm/src"))
from prescient_vllm.trace import StepClock, StepTrace


class Processor:
    """vLLM's `OutputProcessor.process_outputs(outputs, engine_core_timestamp, stats, ...)`."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def process_outputs(self, outputs: object, engine_core_timestamp: float | None = None,
                        iteration_stats: object = None, weight_version: object = None) -> str:
        self.calls.append((outputs, engine_core_timestamp, iteration_stats, weight_version))
        return "processed"


def scheduler_stats(prefill_tokens: int = 0, decodes: int = 2, running: int = 3,
                    dummy: bool = False) -> SimpleNamespace:
    details = SimpleNamespace(elapsed_ms=3.5, num_ctx_requests=1 if prefill_tokens else 0,
                              num_ctx_tokens=prefill_tokens, num_generation_requests=decodes,
                              is_dummy=dummy)
    return SimpleNamespace(iteration_details=details, num_running_reqs=running,
                           num_waiting_reqs=1 if running else 0)


def request(prompt: int, generated: int, prefilling: bool = False) -> SimpleNamespace:
    return SimpleNamespace(prompt_len=prompt, is_prefilling=prefilling,
                           stats=SimpleNamespace(num_generation_tokens=generated))


def lines(trace: StepTrace, path: Path) -> list[dict[str, object]]:
    trace.close()
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_clock_sees_the_timestamp_vllm_hands_its_output_processor() -> None:
    processor = Processor()
    clock = StepClock(processor)
    # vLLM calls the processor as before: arguments and result pass through unchanged
    assert processor.process_outputs(["o"], 12.25, "stats", weight_version="w") == "processed"
    assert processor.calls == [(["o"], 12.25, "stats", "w")]
    assert clock.tick(scheduler_stats()) == (12.25, None)  # no step before it: no period


def test_a_period_needs_a_step_straight_before_and_outputs_of_its_own() -> None:
    processor = Processor()
    clock = StepClock(processor)
    ticks = []
    for stamp, running in ((1.0, 3), (1.004, 3), (None, 3), (1.010, 3), (1.013, 0), (5.0, 2)):
        if stamp is not None:
            processor.process_outputs([], stamp)
        ticks.append(clock.tick(scheduler_stats(running=running)))
    stamps = [s for s, _ in ticks]
    periods = [None if p is None else round(p, 6) for _, p in ticks]
    assert stamps == [1.0, 1.004, None, 1.010, 1.013, 5.0]
    # a step without outputs has no time, and the gap to the next spans both steps; a step
    # after the engine had nothing left (running 0) ends an idle spell: no period either
    assert periods == [None, 4.0, None, None, 3.0, None]


def test_a_step_line_carries_its_stamp_and_shape(tmp_path: Path) -> None:
    trace = StepTrace(str(tmp_path / "t.jsonl"))
    trace.record(scheduler_stats(prefill_tokens=300, decodes=2), None,
                 [request(100, 5), request(40, 1), request(300, 0, prefilling=True)], 12.25)
    trace.record(scheduler_stats(prefill_tokens=2048, decodes=0), None, [], None)
    assert lines(trace, tmp_path / "t.jsonl") == [
        {"t": 12.25, "model_ms": 3.5, "prefills": 1, "prefill_tokens": 300, "decodes": 2,
         "decode_context": 146, "running": 3, "waiting": 1},
        {"t": None, "model_ms": 3.5, "prefills": 1, "prefill_tokens": 2048, "decodes": 0,
         "decode_context": 0, "running": 3, "waiting": 1}]


def test_finished_requests_are_traced_and_dummy_steps_are_not(tmp_path: Path) -> None:
    trace = StepTrace(str(tmp_path / "t.jsonl"))
    done = SimpleNamespace(request_id="cmpl-r1-0", num_prompt_tokens=64, num_cached_tokens=32,
                           num_generation_tokens=9, queued_time=0.001, prefill_time=0.02,
                           decode_time=0.08)
    trace.record(scheduler_stats(dummy=True), SimpleNamespace(finished_requests=[done]), None,
                 None)
    assert lines(trace, tmp_path / "t.jsonl") == [{
        "request": "cmpl-r1-0", "prompt": 64, "cached": 32, "generated": 9, "queued_s": 0.001,
        "prefill_s": 0.02, "decode_s": 0.08}]
