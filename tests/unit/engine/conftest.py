"""A minimal driver for engine tests: arrivals and step ends in time order."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from prescient.engine import EngineRequest, SimEngine
from prescient.model import Request

Drive = Callable[[SimEngine, Sequence[Request]], dict[str, EngineRequest]]


def drive(engine: SimEngine, requests: Sequence[Request]) -> dict[str, EngineRequest]:
    """Run `requests` through `engine` to completion; check pool bounds after every event."""
    pending = sorted(requests, key=lambda r: r.arrival_time)
    done: dict[str, EngineRequest] = {}
    end: float | None = None
    i = 0
    while i < len(pending) or engine.has_work:
        arrival = pending[i].arrival_time if i < len(pending) else float("inf")
        if end is not None and end <= arrival:
            now = end
            for req in engine.complete_step().finished:
                done[req.request_id] = req
            end = engine.start_step(now)
        else:
            now = arrival
            refused = engine.add_request(pending[i], now)
            assert not refused, refused
            i += 1
            end = engine.start_step(now) if end is None else engine.interrupt(now)
        assert 0 <= engine.pool.num_free <= engine.pool.num_blocks
    return done


@pytest.fixture
def run() -> Drive:
    return drive
