"""The vLLM plugin's status mapping (integrations/vllm), on stand-ins for vLLM's stats objects.

The real objects are exercised end to end in tests/live/vllm; here each field's rule is pinned down,
and the result must decode as the llumlet's `InstanceStatus` (the wire contract).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import msgspec

from prescient.model import InstanceStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "integrations/vllm/src"))
from prescient_vllm.status import capacity_tokens, engine_status


def stats(**kw: object) -> SimpleNamespace:
    base = dict(num_running_reqs=3, num_waiting_reqs=2, num_skipped_waiting_reqs=1,
                kv_cache_usage=0.25, iteration_details=None)
    return SimpleNamespace(**{**base, **kw})


def request(rid: str, prompt: int, prefilling: bool, generated: int = 0) -> SimpleNamespace:
    return SimpleNamespace(external_req_id=rid, request_id=f"{rid}-internal", prompt_len=prompt,
                           is_prefilling=prefilling,
                           stats=SimpleNamespace(num_generation_tokens=generated))


def details(index: int, ctx_tokens: int, elapsed_ms: float, dummy: bool = False
            ) -> SimpleNamespace:
    return SimpleNamespace(iteration_index=index, num_ctx_tokens=ctx_tokens,
                           elapsed_ms=elapsed_ms, is_dummy=dummy)


def decoded(status: dict[str, object]) -> InstanceStatus:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(status), type=InstanceStatus)


def test_counts_and_kv_tokens_come_from_the_scheduler_stats() -> None:
    s = decoded(engine_status(stats(), capacity=capacity_tokens(100, 32), step_id=7))
    assert (s.num_running_requests, s.num_waiting_requests) == (3, 3)  # skipped ones wait too
    assert (s.num_total_gpu_tokens, s.num_used_gpu_tokens) == (3200, 800)
    assert s.step_id == 7 and s.schedulable
    assert s.profiling_id == -1  # no iteration details: no sample
    assert s.waiting_requests == ()  # no request table: no ids


def test_usage_is_clamped_and_an_unsized_cache_has_no_tokens() -> None:
    assert decoded(engine_status(stats(kv_cache_usage=1.7), capacity=1000, step_id=1)
                   ).num_used_gpu_tokens == 1000
    assert capacity_tokens(None, 32) == 0


def test_prefilling_requests_are_waiting_prefills_and_the_rest_decodes() -> None:
    table = [request("cmpl-a-0", 100, True), request("cmpl-b-0", 40, True),
             request("cmpl-c-0", 10, False, generated=5)]
    s = decoded(engine_status(stats(), capacity=0, step_id=1, requests=table))
    assert s.recent_waiting_requests == s.waiting_requests == ("cmpl-a-0", "cmpl-b-0")
    assert s.num_uncomputed_tokens_all_waiting_prefills == 140
    assert s.num_uncomputed_tokens_scheduler_waiting_prefills == 140
    assert s.scheduler_running_to_decode_requests_num == 1
    assert s.scheduler_running_to_decode_tokens_num == 15


def test_a_request_without_an_external_id_reports_its_own() -> None:
    table = [SimpleNamespace(external_req_id=None, request_id="r1", prompt_len=5,
                             is_prefilling=True)]
    s = decoded(engine_status(stats(), capacity=0, step_id=1, requests=table))
    assert s.waiting_requests == ("r1",)


def test_an_iteration_becomes_a_profiling_sample() -> None:
    s = decoded(engine_status(stats(iteration_details=details(41, 490, 25.8)), capacity=0,
                              step_id=1))
    assert (s.profiling_id, s.step_duration, s.num_scheduled_prefill_tokens) == (41, 25.8, 490)


def test_a_known_period_is_the_samples_duration_rather_than_the_model_time() -> None:
    s = decoded(engine_status(stats(iteration_details=details(41, 490, 25.8)), capacity=0,
                              step_id=1, period_ms=27.1))
    assert (s.profiling_id, s.step_duration) == (41, 27.1)


def test_dummy_and_unmeasured_iterations_are_not_samples() -> None:
    for d in (details(3, 10, 5.0, dummy=True), details(4, 10, 0.0)):
        assert decoded(engine_status(stats(iteration_details=d), capacity=0, step_id=1)
                       ).profiling_id == -1
