"""A preset's `frontend_ms` (the serving frontend's time per request outside engine steps)
reaches the simulated engine that much later: it adds to TTFT and E2E, not to TPOT; and
`frontend_busy_ms` more when the engine is busy as the request arrives."""

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


def test_a_busy_engine_adds_the_busy_frontend_time(monkeypatch: pytest.MonkeyPatch) -> None:
    base = presets.get_preset("llama3-8b-h100")
    for name, busy_ms in (("plain", 0.0), ("busy-frontend", 7.0)):
        monkeypatch.setitem(presets.PRESETS, name, msgspec.structs.replace(
            base, name=name, frontend_ms=2.0, frontend_busy_ms=busy_ms))
    requests = [Request(request_id="r0", prompt_len=300, output_len=400, arrival_time=0.0),
                Request(request_id="r1", prompt_len=300, output_len=20, arrival_time=0.5)]
    ttft = {}
    for name in ("plain", "busy-frontend"):
        records = simulate(requests, [InstanceSpec(instance_id="i0", preset=name)],
                           "round-robin").records
        ttft[name] = {r.request_id: r.ttft for r in records}
    # r0 finds the engine idle: only frontend_ms; r1 arrives while r0 decodes: 7 ms more
    assert ttft["busy-frontend"]["r0"] == pytest.approx(ttft["plain"]["r0"])
    r1_plain, r1_busy = ttft["plain"]["r1"], ttft["busy-frontend"]["r1"]
    assert r1_plain is not None and r1_busy is not None
    # (arriving 7 ms later, it waits less of the decode step then in flight)
    assert r1_busy - r1_plain == pytest.approx(0.007, abs=0.003)
