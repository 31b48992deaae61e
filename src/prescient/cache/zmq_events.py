"""Live KV events: subscribe to each engine's ZMQ publisher and feed a `KvEventsIndex`.

vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'`) and
SGLang publish `(topic, seq as 8-byte big-endian, msgpack batch)` on a PUB socket, and answer
replay requests on a ROUTER socket (`replay_endpoint`): a DEALER sends `(b"", start_seq)` and
receives `(b"", [topic,] seq, payload)` for every buffered batch from `start_seq` on, then an
end marker whose seq is -1 (shared/reference/vllm-cpu.md §7).

A subscriber joins late (ZMQ's slow joiner) and may drop messages under load; the index reports
each sequence gap and this module answers it by replaying from the engine, or, without a
replay endpoint or when the replay fails, by telling the index to resynchronise. Requires
`pyzmq`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import msgspec
import zmq
import zmq.asyncio

from prescient.cache.kv_events import Gap, KvEventsDecodeError, KvEventsIndex

_log = logging.getLogger(__name__)
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class EngineSource(msgspec.Struct, frozen=True):
    """Where one engine publishes: its instance id, PUB endpoint, optional replay endpoint."""

    instance_id: str
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""


class KvEventsSubscriber:
    """Feeds `index` from every engine in `sources` until `close()`.

    Args:
        index: the index to keep current.
        sources: the engines' publishers.
        replay_timeout_s: how long a replay may take before it counts as failed.
    """

    def __init__(self, index: KvEventsIndex, sources: Sequence[EngineSource], *,
                 replay_timeout_s: float = 2.0) -> None:
        self.index = index
        self.sources = {s.instance_id: s for s in sources}
        self.replay_timeout_s = replay_timeout_s
        self._ctx = zmq.asyncio.Context()
        self._tasks: list[asyncio.Task[None]] = []
        self._replays: dict[str, asyncio.Task[None]] = {}
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        """Connect every SUB socket and start receiving."""
        for source in self.sources.values():
            sock = self._ctx.socket(zmq.SUB)
            sock.connect(source.endpoint)
            sock.setsockopt(zmq.SUBSCRIBE, source.topic.encode())
            self._tasks.append(asyncio.create_task(self._receive(source, sock)))
        self.subscribed.set()

    async def _receive(self, source: EngineSource, sock: zmq.asyncio.Socket) -> None:
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) < 3:
                    _log.warning("KV events from %s: %d frames, expected 3",
                                 source.instance_id, len(frames))
                    continue
                self._apply(source, int.from_bytes(frames[-2], "big"), frames[-1])
        finally:
            sock.close(linger=0)

    def _apply(self, source: EngineSource, seq: int, payload: bytes) -> None:
        try:
            gap = self.index.apply_message(source.instance_id, seq, payload)
        except KvEventsDecodeError as e:
            _log.warning("KV events from %s: %s", source.instance_id, e)
            return
        if gap is not None:
            self._on_gap(source, gap)

    def _on_gap(self, source: EngineSource, gap: Gap) -> None:
        if source.replay_endpoint is None:
            self.index.replay_failed(source.instance_id)
            return
        if source.instance_id not in self._replays:
            self._replays[source.instance_id] = asyncio.create_task(self._replay(source, gap))

    async def _replay(self, source: EngineSource, gap: Gap) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        assert source.replay_endpoint is not None
        sock.connect(source.replay_endpoint)
        try:
            await sock.send_multipart([b"", gap.first.to_bytes(8, "big")])
            async with asyncio.timeout(self.replay_timeout_s):
                while True:
                    frames = await sock.recv_multipart()
                    if frames[-2] == END_SEQ:
                        break
                    self._apply(source, int.from_bytes(frames[-2], "big"), frames[-1])
        except TimeoutError:
            _log.warning("KV events from %s: replay from %d timed out", source.instance_id,
                         gap.first)
        finally:
            sock.close(linger=0)
            self._replays.pop(source.instance_id, None)
        if self.index.awaiting_replay(source.instance_id):
            self.index.replay_failed(source.instance_id)  # still missing: resynchronise

    async def close(self) -> None:
        for task in [*self._tasks, *self._replays.values()]:
            task.cancel()
        for task in [*self._tasks, *self._replays.values()]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._ctx.term()
