"""Fakes for the gateway tests: OpenAI engines over real sockets, and a scriptable scheduler.

The engines answer instantly (non-stream JSON, or SSE of `events` chunks) and record what they
saw: each request's headers, and clients that went away. Failure modes are switched per engine:
answer 500 for the next N requests, or hold a stream after its first event until released.
"""

from __future__ import annotations

import asyncio
import itertools
import json

from prescient.http.server import Request, Response, Router, serve
from prescient.scheduler.wire import (
    Endpoint,
    LLMInstance,
    NoInstanceAvailableError,
    ReportItem,
    ScheduleRequest,
    SchedulerUnavailableError,
)

MODEL = "fake-model"


class FakeEngine:
    """An OpenAI-compatible engine answering instantly; `await start()`, then `port`."""

    def __init__(self, name: str, events: int = 4) -> None:
        self.name = name
        self.events = events
        self.port = 0
        self.seen: list[dict[str, str]] = []  # headers of each completion request
        self.bodies: list[bytes] = []
        self.fail_next = 0  # answer 500 to this many requests
        self.hold: asyncio.Event | None = None  # streams wait here after their first event
        self.linger: asyncio.Event | None = None  # ...and here after [DONE], before the end
        self.stall = False  # never answer; wait for the client to leave
        self.disconnects = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> FakeEngine:
        if self._server is not None:
            return self
        router = Router()
        router.add("POST", "/v1/completions", self._completion)
        router.add("POST", "/v1/chat/completions", self._completion)
        router.add("GET", "/v1/models", self._models)
        self._server = await serve(router, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def instance(self) -> LLMInstance:
        return LLMInstance(id=self.name, endpoint=Endpoint("127.0.0.1", self.port))

    async def _models(self, request: Request, response: Response) -> None:
        response.send(200, json.dumps({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": self.name}]}).encode())

    async def _completion(self, request: Request, response: Response) -> None:
        self.seen.append(dict(request.headers))
        self.bodies.append(request.body)
        if self.fail_next > 0:
            self.fail_next -= 1
            response.send(500, b'{"error": {"message": "engine exploded", "code": 500}}')
            return
        if self.stall:
            await request.disconnected
            self.disconnects += 1
            return
        body = json.loads(request.body)
        chat = request.path.endswith("chat/completions")
        rid = request.headers.get("x-request-id", "none")
        if not body.get("stream"):
            response.send(200, json.dumps(_whole(chat, rid, self.name)).encode())
            return
        request.disconnected.add_done_callback(self._gone)
        response.start(200)
        for i in range(self.events):
            response.write(b"data: " + json.dumps(_chunk(chat, rid, i)).encode() + b"\n\n")
            await response.drain()
            if i == 0 and self.hold is not None:
                await self.hold.wait()
        response.write(b"data: [DONE]\n\n")
        if self.linger is not None:
            await response.drain()
            await self.linger.wait()
        response.end()

    def _gone(self, _: object) -> None:
        self.disconnects += 1


def _whole(chat: bool, rid: str, name: str) -> dict[str, object]:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    if chat:
        return {"id": rid, "object": "chat.completion", "created": 0, "model": MODEL,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": f"hi from {name}"}}],
                "usage": usage}
    return {"id": rid, "object": "text_completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "text": f"hi from {name}", "finish_reason": "stop"}],
            "usage": usage}


def _chunk(chat: bool, rid: str, i: int) -> dict[str, object]:
    if chat:
        return {"id": rid, "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                "choices": [{"index": 0, "delta": {"content": f"t{i} "},
                             "finish_reason": None}]}
    return {"id": rid, "object": "text_completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]}


class FakeScheduler:
    """The `Scheduler` protocol, scripted: answers in `order` (round robin), or raises."""

    def __init__(self, instances: list[LLMInstance]) -> None:
        self._cycle = itertools.cycle(instances)
        self.unavailable = False  # raise SchedulerUnavailableError
        self.none_for = 0  # raise NoInstanceAvailableError this many times
        self.none_forever = False
        self.scheduled: list[tuple[str, int, int | None]] = []  # (id, tokens, len(ids))
        self.released: list[tuple[str, str]] = []  # (request id, instance id)
        self.reports: list[ReportItem] = []

    async def schedule(self, request: ScheduleRequest) -> list[LLMInstance]:
        if self.unavailable:
            raise SchedulerUnavailableError("scheduler is down (test)")
        if self.none_forever or self.none_for > 0:
            self.none_for -= 1
            raise NoInstanceAvailableError("none (test)")
        ids = request.prompt_token_ids
        self.scheduled.append((request.id, request.prompt_num_tokens,
                               None if ids is None else len(ids)))
        return [next(self._cycle)]

    async def release(self, request: ScheduleRequest) -> None:
        for instance in request.scheduling_result:
            self.released.append((request.id, instance.id))

    async def report(self, items: list[ReportItem]) -> None:
        self.reports.extend(items)

    async def close(self) -> None:
        return None
