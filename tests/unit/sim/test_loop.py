from __future__ import annotations

import pytest

from prescient.sim.loop import EventLoop, Order


def test_same_time_events_run_by_order_then_by_scheduling_sequence() -> None:
    loop = EventLoop()
    seen: list[str] = []
    loop.at(1.0, Order.ARRIVAL, seen.append, "arrival-1")
    loop.at(1.0, Order.POLL, seen.append, "poll")
    loop.at(1.0, Order.ARRIVAL, seen.append, "arrival-2")
    loop.at(1.0, Order.STEP_END, seen.append, "step-end")
    loop.at(1.0, Order.CAPTURE, seen.append, "capture")
    loop.at(0.5, Order.SAMPLE, seen.append, "early-sample")
    loop.run(stop=lambda: False)
    assert seen == ["early-sample", "step-end", "capture", "poll", "arrival-1", "arrival-2"]
    assert loop.now == 1.0


def test_run_stops_when_asked_and_the_past_is_closed() -> None:
    loop = EventLoop()
    seen: list[int] = []
    for i in range(5):
        loop.at(float(i), Order.ARRIVAL, seen.append, i)
    loop.run(stop=lambda: len(seen) == 3)
    assert seen == [0, 1, 2] and len(loop) == 2
    with pytest.raises(ValueError, match="past"):
        loop.at(1.0, Order.ARRIVAL, seen.append, 9)
