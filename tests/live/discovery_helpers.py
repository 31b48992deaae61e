"""Helpers of the discovery live tests: waiting on a condition, and tiny engines with /health."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

from .harness import free_port


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout_s` (a deadline, not a
    timing assertion: generous, for a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class HealthEngine:
    """An HTTP server with `GET /health` answering 200 while `healthy`, else 503."""

    def __init__(self, healthy: bool = True) -> None:
        self.healthy = healthy
        self.port = free_port()
        self.checks = 0
        self._runner: web.AppRunner | None = None

    async def _health(self, request: web.Request) -> web.Response:
        self.checks += 1
        return web.Response(status=200 if self.healthy else 503, text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"
