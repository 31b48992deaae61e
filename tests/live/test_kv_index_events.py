"""Live KV events over real ZMQ sockets: a vLLM-style publisher (PUB + ROUTER replay) in the
test, the subscriber feeding an index, and a dropped range recovered through replay."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import msgspec
import pytest

zmq = pytest.importorskip("zmq")
zmq_asyncio = pytest.importorskip("zmq.asyncio")

from prescient.cache.kv_events import KvEventsIndex  # noqa: E402
from prescient.cache.zmq_events import END_SEQ, EngineSource, KvEventsSubscriber  # noqa: E402


def batch(*events: list[object]) -> bytes:
    """vLLM's example encoding: batch and events as arrays, the tag first."""
    return msgspec.msgpack.encode([1.0, list(events), 0])


def stored(*hashes: int) -> list[object]:
    return ["BlockStored", list(hashes), None, [], 16, None, "GPU"]


class Publisher:
    """The engine side: PUB for live batches, ROUTER answering replays from a buffer."""

    def __init__(self, ctx: object, pub: str, replay: str) -> None:
        self.pub = ctx.socket(zmq.PUB)
        self.pub.bind(pub)
        self.router = ctx.socket(zmq.ROUTER)
        self.router.bind(replay)
        self.buffer: list[tuple[int, bytes]] = []
        self.replays: list[int] = []

    async def send(self, seq: int, payload: bytes, *, drop: bool = False) -> None:
        self.buffer.append((seq, payload))
        if not drop:
            await self.pub.send_multipart([b"kv@test", seq.to_bytes(8, "big"), payload])

    async def serve_replays(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            self.replays.append(first)
            for seq, payload in self.buffer:
                if seq >= first:
                    await self.router.send_multipart([client, b"", seq.to_bytes(8, "big"),
                                                      payload])
            await self.router.send_multipart([client, b"", END_SEQ, b""])

    def close(self) -> None:
        self.pub.close(linger=0)
        self.router.close(linger=0)


async def until(check, deadline_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not check():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


def test_subscriber_indexes_live_batches_and_replays_a_dropped_range() -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            pub, rep = f"ipc://{Path(tmp) / 'kv.ipc'}", f"ipc://{Path(tmp) / 'replay.ipc'}"
            ctx = zmq_asyncio.Context()
            engine = Publisher(ctx, pub, rep)
            server = asyncio.create_task(engine.serve_replays())
            index = KvEventsIndex()
            sub = KvEventsSubscriber(index, [EngineSource("e0", pub, rep)])
            await sub.start()
            try:
                # published before the subscriber joined: its first replay (from 0) brings it
                engine.buffer.append((0, batch(stored(1))))
                await until(lambda: index.expected_seq("e0") == 1)
                assert engine.replays == [0]
                await engine.send(1, batch(stored(2)))
                await engine.send(2, batch(stored(3)), drop=True)  # lost on the PUB socket
                await engine.send(3, batch(stored(4)), drop=True)
                await engine.send(4, batch(["BlockRemoved", [1], "GPU"]))  # reveals the gap
                await until(lambda: index.expected_seq("e0") == 5)
                assert engine.replays == [0, 2]
                assert index.hit_lengths([2, 3, 4]) == {"e0": 3}
                assert index.hit_lengths([1]) == {}
                assert index.num_gaps == 1 and index.num_resyncs == 0
            finally:
                await sub.close()
                server.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await server
                engine.close()
                ctx.term()

    asyncio.run(main())


def test_without_a_replay_endpoint_a_gap_resynchronises() -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            pub = f"ipc://{Path(tmp) / 'kv.ipc'}"
            ctx = zmq_asyncio.Context()
            sock = ctx.socket(zmq.PUB)
            sock.bind(pub)
            index = KvEventsIndex()
            sub = KvEventsSubscriber(index, [EngineSource("e0", pub)])
            await sub.start()
            try:
                # ZMQ's slow joiner: re-send seq 0 until the subscriber has it (a repeat reads
                # as a restarted publisher: the same state again)
                while index.expected_seq("e0") != 1:
                    await sock.send_multipart([b"t", (0).to_bytes(8, "big"), batch(stored(1))])
                    await asyncio.sleep(0.02)
                await sock.send_multipart([b"t", (9).to_bytes(8, "big"), batch(stored(5))])
                await until(lambda: index.expected_seq("e0") == 10)
                assert index.num_resyncs == 1
                assert index.hit_lengths([1]) == {} and index.hit_lengths([5]) == {"e0": 1}
            finally:
                await sub.close()
                sock.close(linger=0)
                ctx.term()

    asyncio.run(main())
