"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio
import contextlib

RECANCEL_S = 0.5


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel `task` and return once it has ended.

    A plain `task.cancel(); await task` waits forever when a library inside the task swallows
    the cancellation (redis-py 8 can, in the middle of a reconnect) and the task's loop goes
    on: this cancels again every `RECANCEL_S` until the task is done. Its result or error is
    consumed (a stopped task's last error is of no interest to whoever stops it).
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_S)
    with contextlib.suppress(BaseException):
        task.result()
