"""A SimPy-small event loop: a heap of `(time, order, seq, callback, args)`.

`order` is the one same-time rule: at equal times, engine step ends run first (so a status
captured at that instant sees the next step scheduled), then status captures, then CMS polls
(which read those captures), then arrivals (dispatched on the freshest view), then load samples.
`seq` is a per-loop counter, so equal (time, order) pairs run in the order they were scheduled.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Callable
from itertools import count
from typing import Any


class Order(enum.IntEnum):
    """Tie-break for events at the same simulated time (lower runs first)."""

    STEP_END = 0
    CAPTURE = 1
    POLL = 2
    ARRIVAL = 3
    SAMPLE = 4


class EventLoop:
    """Runs callbacks in simulated-time order. Callbacks schedule follow-ups with `at`."""

    def __init__(self) -> None:
        self.now = 0.0  # seconds
        self._heap: list[tuple[float, int, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = count()

    def at(self, time: float, order: Order, callback: Callable[..., None], *args: Any) -> None:
        if time < self.now:
            raise ValueError(f"cannot schedule in the past ({time} < {self.now})")
        heapq.heappush(self._heap, (time, order, next(self._seq), callback, args))

    def run(self, stop: Callable[[], bool]) -> None:
        """Run events until `stop()` is true after one, or none are left."""
        heap = self._heap
        while heap:
            time, _, _, callback, args = heapq.heappop(heap)
            self.now = time
            callback(*args)
            if stop():
                return

    def __len__(self) -> int:
        return len(self._heap)
