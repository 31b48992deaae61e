"""P/D decode side: a request whose prompt KV arrived from a prefill instance."""

from __future__ import annotations

import pytest

from prescient.engine import AnalyticStepTime, EngineConfig, SimEngine
from prescient.model import Request

# 10 ms per step plus 1 ms per scheduled token: the first step's length shows what it computed
SIMPLE = AnalyticStepTime(c0=10.0, c_tok=1.0, c_attn=0.0, c_kv=0.0)


def _engine(blocks: int = 1000) -> SimEngine:
    return SimEngine("d0", EngineConfig(num_gpu_blocks=blocks, block_size=16), SIMPLE,
                     skip_decode_runs=False)


def _finish(engine: SimEngine) -> list[float]:
    """Step to the end; the step durations."""
    durations, now = [], 0.0
    while engine.has_work:
        end = engine.start_step(now)
        assert end is not None
        engine.complete_step()
        durations.append(end - now)
        now = end
    return durations


def test_a_prefilled_request_computes_only_its_last_prompt_token() -> None:
    engine = _engine()
    assert engine.add_request(Request(request_id="a", prompt_len=500, output_len=4), 0.0,
                              prefilled=True) == ""
    durations = _finish(engine)
    assert durations[0] == pytest.approx(0.011)  # 10 ms + 1 token, not 10 + 500
    assert len(durations) == 4  # the first token, then three decode steps
    assert engine.pool.num_free == engine.pool.num_blocks  # every block back


def test_without_the_flag_the_prompt_is_computed() -> None:
    engine = _engine()
    engine.add_request(Request(request_id="a", prompt_len=500, output_len=4), 0.0)
    assert _finish(engine)[0] == pytest.approx(0.510)


def test_a_prefilled_request_holds_blocks_for_its_whole_prompt() -> None:
    engine = _engine()
    engine.add_request(Request(request_id="a", prompt_len=500, output_len=4), 0.0,
                       prefilled=True)
    engine.start_step(0.0)
    assert engine.pool.num_blocks - engine.pool.num_free == -(-500 // 16)


def test_aborting_a_waiting_prefilled_request_forgets_its_kv() -> None:
    engine = _engine()
    engine.add_request(Request(request_id="a", prompt_len=500, output_len=4), 0.0,
                       prefilled=True)
    assert engine.abort("a", 0.0)
    engine.add_request(Request(request_id="a", prompt_len=500, output_len=4), 0.0)
    assert _finish(engine)[0] == pytest.approx(0.510)  # the same id, now not prefilled


def test_a_waiting_prefilled_request_reports_one_uncomputed_token() -> None:
    engine = _engine()
    engine.add_request(Request(request_id="a", prompt_len=500, output_len=4), 0.0,
                       prefilled=True)
    engine.add_request(Request(request_id="b", prompt_len=300, output_len=4), 0.0)
    status = engine.snapshot(0.0, 0)
    assert status.num_uncomputed_tokens_all_waiting_prefills == 1 + 300
