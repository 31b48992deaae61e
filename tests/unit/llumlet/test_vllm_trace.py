"""The vLLM plugin's step trace (integrations/vllm `prescient_vllm.trace`), on stand-ins for
vLLM's output processor and stats objects; tests/live/vllm/test_step_trace.py runs it in a real
engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "integrations/vllm/src"))
from prescient_vllm.trace import StepTrace


class Processor:
    """vLLM's `OutputProcessor.process_outputs(outputs, engine_core_timestamp, stats, ...)`."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def process_outputs(self, outputs: object, engine_core_timestamp: float | None = None,
                        iteration_stats: object = None, weight_version: object = None) -> str:
        self.calls.append((outputs, engine_core_timestamp, iteration_stats, weight_version))
        return "processed"


def scheduler_stats(prefill_tokens: int = 0, decodes: int = 2, dummy: bool = False
                    ) -> SimpleNamespace:
    details = SimpleNamespace(elapsed_ms=3.5, num_ctx_requests=1 if prefill_tokens else 0,
                              num_ctx_tokens=prefill_tokens, num_generation_requests=decodes,
                              is_dummy=dummy)
    return SimpleNamespace(iteration_details=details, num_running_reqs=3, num_waiting_reqs=1)


def request(prompt: int, generated: int, prefilling: bool = False) -> SimpleNamespace:
    return SimpleNamespace(prompt_len=prompt, is_prefilling=prefilling,
                           stats=SimpleNamespace(num_generation_tokens=generated))


def lines(trace: StepTrace, path: Path) -> list[dict[str, object]]:
    trace.close()
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_step_carries_the_engine_timestamp_the_output_processor_received(
        tmp_path: Path) -> None:
    processor = Processor()
    trace = StepTrace(str(tmp_path / "t.jsonl"), processor)
    # vLLM calls the processor as before: arguments and result pass through unchanged
    assert processor.process_outputs(["o"], 12.25, "stats", weight_version="w") == "processed"
    assert processor.calls == [(["o"], 12.25, "stats", "w")]
    trace.record(scheduler_stats(prefill_tokens=300, decodes=2), None,
                 [request(100, 5), request(40, 1), request(300, 0, prefilling=True)])
    assert lines(trace, tmp_path / "t.jsonl") == [{
        "t": 12.25, "model_ms": 3.5, "prefills": 1, "prefill_tokens": 300, "decodes": 2,
        "decode_context": 146, "running": 3, "waiting": 1}]


def test_a_step_without_outputs_has_no_timestamp_rather_than_the_last_one(
        tmp_path: Path) -> None:
    processor = Processor()
    trace = StepTrace(str(tmp_path / "t.jsonl"), processor)
    processor.process_outputs([], 1.0)
    trace.record(scheduler_stats(), None, [])
    trace.record(scheduler_stats(prefill_tokens=2048, decodes=0), None, [])  # a prefill chunk
    assert [line["t"] for line in lines(trace, tmp_path / "t.jsonl")] == [1.0, None]


def test_finished_requests_are_traced_and_dummy_steps_are_not(tmp_path: Path) -> None:
    trace = StepTrace(str(tmp_path / "t.jsonl"), None)
    done = SimpleNamespace(request_id="cmpl-r1-0", num_prompt_tokens=64, num_cached_tokens=32,
                           num_generation_tokens=9, queued_time=0.001, prefill_time=0.02,
                           decode_time=0.08)
    trace.record(scheduler_stats(dummy=True), SimpleNamespace(finished_requests=[done]), None)
    assert lines(trace, tmp_path / "t.jsonl") == [{
        "request": "cmpl-r1-0", "prompt": 64, "cached": 32, "generated": 9, "queued_s": 0.001,
        "prefill_s": 0.02, "decode_s": 0.08}]
