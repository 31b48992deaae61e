"""`RealtimeEngine`: the pure `SimEngine` stepped on the event loop's clock.

The engine core plans a step and says when it ends; this driver sleeps until then (scaled by
`time_scale`), commits the step, and hands every live request the tokens it gained. It steps
one engine step at a time (never a skipped run of decode steps) so tokens stream out per step
as from a real engine, and it plans the next step at the previous one's end while work remains
(a busy engine runs steps back to back), sleeping toward absolute deadlines so that sleep
overshoot does not accumulate into a slower engine.

Engine time is simulated seconds: `(clock() - start) * time_scale`. Statuses go to `on_status`
after every schedule and when the engine goes idle: upstream's AFTER_SCHEDULE and
BEFORE_RETURN pushes, which feed the llumlet.

Aborts (a client went away) are applied between steps only: a step in flight has planned work
for the request (`SimEngine.abort`). The request's stream ends at once; its engine work stops
at the end of the current step. Migration's engine operations (`between_steps`) wait for the
same boundary, and a request can leave with its stream (`detach`) or arrive with a stand-in for
a stream held elsewhere (`adopt`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from prescient.engine import EngineRequest, SimEngine
from prescient.model import InstanceStatus, Request

logger = logging.getLogger(__name__)

FINISH_LENGTH = "length"  # the request produced its max_tokens
FINISH_ABORT = "abort"  # aborted by the client, or the engine stopped

T = TypeVar("T")


class StreamSink(Protocol):
    """What the driver feeds a live request's progress to: a `TokenStream`, or a stand-in
    for a stream another engine's server holds (a request that arrived by migration)."""

    num_tokens: int
    num_cached_tokens: int

    def _produce(self, total: int, now: float) -> None: ...

    def _finish(self, reason: str, now: float) -> None: ...


class TokenStream:
    """The new token ids of one request, batch by batch: `async for ids in stream`.

    Each batch holds every token produced since the consumer last asked (one per engine step
    when it keeps up). Iteration ends when the request finishes; `finish_reason` then says why.
    Times are engine (simulated) seconds.
    """

    def __init__(self, request: Request, arrival_time: float, vocabulary: Sequence[int]) -> None:
        self.request_id = request.request_id
        self.prompt_len = request.prompt_len
        self.max_tokens = request.output_len
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finish_time: float | None = None
        self.finish_reason: str | None = None
        self.num_tokens = 0  # produced so far
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache (at first token)
        self._vocabulary = vocabulary
        self._rng = random.Random(zlib.crc32(request.request_id.encode()))
        self._pending: deque[int] = deque()
        self._ready = asyncio.Event()

    @property
    def drained(self) -> bool:
        """Finished, and every token has been taken: the batch just taken was the last."""
        return self.finish_reason is not None and not self._pending

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> list[int]:
        while not self._pending:
            if self.finish_reason is not None:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        batch = list(self._pending)
        self._pending.clear()
        return batch

    def _produce(self, total: int, now: float) -> None:
        """The engine reports `total` tokens so far: draw the new ones (pseudo-text)."""
        new = total - self.num_tokens
        if new <= 0 or self.finish_reason is not None:
            return
        vocab, rng = self._vocabulary, self._rng
        self._pending.extend(vocab[rng.randrange(len(vocab))] for _ in range(new))
        self.num_tokens = total
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self._ready.set()

    def _finish(self, reason: str, now: float) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.finish_time = now
            self._ready.set()


class RealtimeEngine:
    """Drives a `SimEngine` in real time; `await run()` in a task.

    Args:
        engine: the engine; it is switched to stepping one step at a time.
        time_scale: simulated seconds per wall second (10: ten times faster than real time).
        on_status: called with a fresh status after every schedule and when the engine goes
            idle (an exception there is logged, never stops the engine).
        clock: monotonic wall seconds.
        vocabulary: token ids output is drawn from (seeded by request id); by default the
            approximate tokenizer's word ids.
        max_lag_s: wall seconds the engine may fall behind its own schedule (an overloaded
            event loop) before it stops catching up and plans from the present.
    """

    def __init__(
        self,
        engine: SimEngine,
        *,
        time_scale: float = 1.0,
        on_status: Callable[[InstanceStatus], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        vocabulary: Sequence[int] | None = None,
        max_lag_s: float = 0.1,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        if vocabulary is None:
            from prescient.tokenizer import ApproxTokenizer

            vocabulary = ApproxTokenizer().known_ids()
        if not vocabulary:
            raise ValueError("vocabulary must not be empty")
        engine.skip_decode_runs = False
        self.engine = engine
        self.time_scale = time_scale
        self.on_status = on_status
        self._clock = clock
        self._start = clock()
        self._vocabulary = tuple(vocabulary)
        self._max_lag = max_lag_s * time_scale
        self._streams: dict[str, StreamSink] = {}
        self._aborts: list[str] = []
        self._ops: list[tuple[Callable[[], object], asyncio.Future[object]]] = []
        self._wake = asyncio.Event()
        self._last_arrival = 0.0
        self._idle_published = True
        self.error: Exception | None = None  # why `run` failed, if it did

    # ---- the surface the server uses -------------------------------------------------------

    def now(self) -> float:
        """Engine time, simulated seconds."""
        return (self._clock() - self._start) * self.time_scale

    @property
    def num_live(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        return len(self._streams)

    def is_live(self, request_id: str) -> bool:
        """The request was submitted and has not finished or been aborted."""
        return request_id in self._streams

    def submit(self, request: Request, *, prefilled: bool = False) -> TokenStream:
        """Queue `request`; its tokens arrive on the returned stream.

        `prefilled`: its prompt's KV arrived from a prefill instance (`SimEngine.add_request`).

        Raises:
            ValueError: the engine refuses it (longer than max_model_len or the KV cache, or
                its id is live already); the message says why.
            RuntimeError: the engine failed (see `run`).
        """
        if self.error is not None:
            raise RuntimeError(f"the engine failed: {self.error!r}")
        now = self.now()
        refusal = self.engine.add_request(request, now, prefilled=prefilled)
        if refusal:
            raise ValueError(refusal)
        stream = TokenStream(request, now, self._vocabulary)
        self._streams[request.request_id] = stream
        self._last_arrival = now
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> bool:
        """Stop a request (its client went away). Its stream ends now; the engine drops it
        before the next step. Returns False when it is not live."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return False
        stream._finish(FINISH_ABORT, self.now())
        self._aborts.append(request_id)
        if not self.engine.busy:
            self._apply_aborts()
        return True

    async def between_steps(self, op: Callable[[], T]) -> T:
        """Run `op` between two engine steps (at once when none is in flight) and return what
        it returns: the engine core changes blocks and the batch only there (migration)."""
        if self.error is not None:
            raise RuntimeError(f"the engine failed: {self.error!r}")
        if not self.engine.busy:
            result = op()
            self._wake.set()  # it may have added work
            return result
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._ops.append((op, future))
        return await future  # type: ignore[return-value]

    def detach(self, request_id: str) -> StreamSink | None:
        """Stop feeding a request's stream (the request left the engine by migration) and
        hand it over; None when the request is not live here."""
        return self._streams.pop(request_id, None)

    def adopt(self, request_id: str, sink: StreamSink) -> None:
        """Feed `sink` the progress of a request that arrived by migration."""
        self._streams[request_id] = sink
        self._wake.set()

    def snapshot(self) -> InstanceStatus:
        """The engine's status now."""
        return self.engine.snapshot(self.now(), int(time.time() * 1000))

    async def run(self) -> None:
        """Step the engine until cancelled; then every live stream ends with "abort".

        An engine failure (a bug: the core raised) is logged, kept in `error`, and re-raised;
        `submit` then refuses new requests with RuntimeError.
        """
        try:
            await self._loop()
        except Exception as e:
            self.error = e
            logger.exception("the simulated engine failed")
            raise
        finally:
            now = self.now()
            for stream in self._streams.values():
                stream._finish(FINISH_ABORT, now)
            self._streams.clear()
            for _, future in self._ops:
                if not future.done():
                    future.set_exception(RuntimeError("the engine stopped"))
            self._ops.clear()

    # ---- the loop --------------------------------------------------------------------------

    async def _loop(self) -> None:
        engine = self.engine
        next_start: float | None = None  # back-to-back start while work remains
        while True:
            self._apply_aborts()
            self._run_ops()
            if not engine.has_work:
                self._publish_idle()
                next_start = None
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self.now()
            start = now if next_start is None else max(next_start, self._last_arrival,
                                                       now - self._max_lag)
            end = engine.start_step(start)
            assert end is not None, "the engine has work, so a step was planned"
            self._idle_published = False
            self._publish()
            await asyncio.sleep(max(0.0, (end - self.now()) / self.time_scale))
            outcome = engine.complete_step()
            self._deliver(outcome.finished, end)
            next_start = end

    def _deliver(self, finished: Sequence[EngineRequest], end: float) -> None:
        done = {r.request_id: r for r in finished}
        count = self.engine.num_output_tokens
        for rid, stream in list(self._streams.items()):
            req = done.get(rid)
            if not stream.num_tokens:  # the prefix-cache hit is known once it is scheduled
                stream.num_cached_tokens = (req.num_cached_tokens if req is not None
                                            else self.engine.num_cached_tokens(rid))
            stream._produce(req.num_output if req is not None else count(rid), end)
            if req is not None:
                stream._finish(FINISH_LENGTH, end)
                del self._streams[rid]

    def _apply_aborts(self) -> None:
        if not self._aborts:
            return
        now = self.now()
        for rid in self._aborts:
            self.engine.abort(rid, now)  # False: it finished in the step that just ended
        self._aborts.clear()

    def _run_ops(self) -> None:
        ops, self._ops = self._ops, []
        for op, future in ops:
            if future.done():  # its caller gave up waiting
                continue
            try:
                future.set_result(op())
            except Exception as e:
                future.set_exception(e)

    def _publish_idle(self) -> None:
        if not self._idle_published:
            self._idle_published = True
            self._publish()

    def _publish(self) -> None:
        """A fresh status to `on_status`, if anyone listens (a snapshot costs a scan)."""
        if self.on_status is None:
            return
        try:
            self.on_status(self.snapshot())
        except Exception:
            logger.exception("on_status failed; the engine goes on")
