"""A preset's `frontend_ms` (the serving frontend's time per request outside engine steps)
reaches the simulated engine that much later: it adds to TTFT and E2E, not to TPOT."""

from __future__ import annotations

import msgspec
import pytest

from prescient.config import presets
from prescient.model import Request
from prescient.sim.cluster import InstanceSpec, simulate


def run(preset: str) -> tuple[float, float]:
    requests = [Request(request_id="r0", prompt_len=300, output_len=20, arrival_time=0.0)]
    record = simulate(requests, [InstanceSpec(instance_id="i0", preset=preset)],
                      "round-robin").records[0]
    assert record.ttft is not None and record.tpot is not None
    return record.ttft, record.tpot


def test_frontend_time_delays_the_first_token_only(monkeypatch: pytest.MonkeyPatch) -> None:
    base = presets.get_preset("llama3-8b-h100")
    slow = msgspec.structs.replace(base, name="slow-frontend", frontend_ms=12.5)
    monkeypatch.setitem(presets.PRESETS, "slow-frontend", slow)
    ttft, tpot = run("llama3-8b-h100")
    ttft_slow, tpot_slow = run("slow-frontend")
    assert ttft_slow - ttft == pytest.approx(0.0125)
    assert tpot_slow == pytest.approx(tpot)
