"""The simulated engine's KV events, published as a vLLM engine publishes them.

`prescient sim-engine --kv-events-config '<json>'` takes vLLM's `KVEventsConfig` keys
(`enable_kv_cache_events`, `publisher` "zmq" or "null", `endpoint`, `replay_endpoint`,
`buffer_steps`, `hwm`, `max_queue_size`, `topic`; reference/vllm-cpu.md §7) and publishes the
engine's prefix-cache changes (`BlockPool.listener`) on the wire vLLM uses:

- a PUB socket sends `(topic, seq as 8-byte big-endian, msgpack(batch))`, one batch per engine
  step with changes (the events a step makes are flushed together once it yields to the loop);
  a batch is vLLM's `array_like` `[ts, events, data_parallel_rank]`, each event a tagged map
  (`{"type": "BlockStored", "block_hashes": [...], ...}`) with the low 64 bits of the block
  hash as an int (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`, vLLM's default);
- a ROUTER socket on `replay_endpoint` answers `(b"", start_seq)` with `(b"", seq, payload)`
  for every buffered batch from `start_seq` on (the last `buffer_steps`), then `(b"", -1, b"")`;
- the endpoint binds when it has a `*` or `::` or is `ipc://` / `inproc://`, and connects
  otherwise, as vLLM's `ZmqEventPublisher` does.

Blocks stored in one step are one `BlockStored` event per run of consecutive stores, with their
`token_ids` and the run's parent hash when the engine's hasher recorded them (the server's vLLM
hasher does, for token-id prompts). `GET /kv_event_sources` answers the resolved config keyed by
DP rank `"0"`, as vLLM's server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from prescient.cache.hashing import (
    VllmHashAlgo,
    engine_hash_seed,
    external_block_hash,
    vllm_block_hashes,
)
from prescient.errors import ConfigError

if TYPE_CHECKING:
    from prescient.engine import SimEngine

_log = logging.getLogger(__name__)
END_SEQ = (-1).to_bytes(8, "big", signed=True)
MEDIUM = "GPU"  # what vLLM says, on CPU too
FLAG = "--kv-events-config"


class KvEventsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """vLLM's `KVEventsConfig` (its JSON keys and defaults)."""

    enable_kv_cache_events: bool = False
    publisher: Literal["null", "zmq"] | None = None  # None: zmq when enabled, as vLLM
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @property
    def publishes(self) -> bool:
        return self.enable_kv_cache_events and self.publisher != "null"

    def sources(self) -> dict[str, dict[str, Any]]:
        """`GET /kv_event_sources`: the resolved config per DP rank."""
        resolved = msgspec.structs.replace(
            self, publisher=self.publisher or ("zmq" if self.enable_kv_cache_events else "null"))
        return {"0": msgspec.to_builtins(resolved)}


def parse_kv_events_config(text: str) -> KvEventsConfig | None:
    """`--kv-events-config`; None when empty. Raises `ConfigError` naming the flag."""
    if not text.strip():
        return None
    try:
        config = msgspec.json.decode(text, type=KvEventsConfig)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ConfigError(f"{FLAG}: {e} (vLLM's KVEventsConfig JSON, e.g. "
                          '\'{"enable_kv_cache_events": true, "publisher": "zmq", '
                          '"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}\')'
                          ) from None
    for name in ("endpoint", "replay_endpoint"):
        value = getattr(config, name)
        if value is not None and "://" not in value:
            raise ConfigError(f"{FLAG}: {name} {value!r} needs a scheme (tcp://, ipc://)")
    if config.buffer_steps < 1 or config.hwm < 0:
        raise ConfigError(f"{FLAG}: buffer_steps must be >= 1 and hwm >= 0")
    return config


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[int]
    medium: str | None


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[BlockStored | BlockRemoved]
    data_parallel_rank: int | None = None


def _binds(endpoint: str) -> bool:
    return ("*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")))


class BlockContent:
    """What the engine's hasher knew of each block: its parent hash and token ids (bounded)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, tuple[int | None, tuple[int, ...]]] = OrderedDict()

    def record(self, parents_and_blocks: Sequence[tuple[int | None, int, tuple[int, ...]]]
               ) -> None:
        blocks = self._blocks
        for parent, h, tokens in parents_and_blocks:
            blocks[h] = (parent, tokens)
            blocks.move_to_end(h)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def get(self, h: int) -> tuple[int | None, tuple[int, ...]] | None:
        return self._blocks.get(h)


class KvEventPublisher:
    """A `BlockListener` that publishes the pool's changes over ZMQ; `await start()` first.

    Args:
        config: the `--kv-events-config`.
        block_size: the engine's block size (in every `BlockStored`).
        content: parent and tokens of hashed blocks, for the events' `token_ids`.
    """

    def __init__(self, config: KvEventsConfig, block_size: int,
                 content: BlockContent | None = None) -> None:
        self.config = config
        self.block_size = block_size
        self.content = content
        self.seq = 0
        self._topic = config.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._events: list[BlockStored | BlockRemoved] = []
        self._flush_scheduled = False
        self._encoder = msgspec.msgpack.Encoder()
        self._ctx: Any = None
        self._pub: Any = None
        self._replay: Any = None
        self._replay_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the PUB (and ROUTER) sockets; raises `ConfigError` when one cannot bind."""
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        try:
            self._pub = self._socket(zmq.PUB, self.config.endpoint)
            self._pub.setsockopt(zmq.SNDHWM, self.config.hwm)
            if self.config.replay_endpoint:
                self._replay = self._socket(zmq.ROUTER, self.config.replay_endpoint)
                self._replay_task = asyncio.create_task(self._serve_replay(),
                                                        name="kv-events-replay")
        except zmq.ZMQError as e:
            self._close_sockets()
            raise ConfigError(f"{FLAG}: cannot open {e}") from None

    def _socket(self, kind: int, endpoint: str) -> Any:
        sock = self._ctx.socket(kind)
        sock.setsockopt(0x11, 0)  # ZMQ_LINGER: closing never waits for a subscriber
        try:
            (sock.bind if _binds(endpoint) else sock.connect)(endpoint)
        except Exception as e:
            sock.close(linger=0)
            raise type(e)(f"{endpoint}: {e}") from None
        return sock

    async def close(self) -> None:
        self._flush()
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    # ---- BlockListener ---------------------------------------------------------------------

    def stored(self, block_hash: int) -> None:
        h = block_hash & ((1 << 64) - 1)
        known = self.content.get(block_hash) if self.content is not None else None
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockStored) and (known is None or known[0] == last.block_hashes[-1]):
            last.block_hashes.append(h)  # the next block of the same run
            if known is not None and len(last.token_ids) == self.block_size * (
                    len(last.block_hashes) - 1):
                last.token_ids.extend(known[1])
        else:
            parent = known[0] if known is not None else None
            self._events.append(BlockStored(
                [h], parent, list(known[1]) if known is not None else [], self.block_size,
                None, MEDIUM, None))
        self._schedule_flush()

    def removed(self, block_hash: int) -> None:
        h = block_hash & ((1 << 64) - 1)
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockRemoved):
            last.block_hashes.append(h)
        else:
            self._events.append(BlockRemoved([h], MEDIUM))
        self._schedule_flush()

    # ---- publishing ------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._events or self._pub is None:
            return
        payload = self._encoder.encode(EventBatch(time.time(), self._events, 0))
        self._events = []
        seq, self.seq = self.seq, self.seq + 1
        self._buffer.append((seq, payload))
        self._send(seq, payload)

    def _send(self, seq: int, payload: bytes) -> None:
        import zmq

        with contextlib.suppress(zmq.Again):  # a full queue drops, as PUB does at its HWM
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload),
                                     flags=zmq.NOBLOCK)

    async def _serve_replay(self) -> None:
        sock = self._replay
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:
                _log.warning("KV events replay: invalid request of %d frames", len(frames))
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await sock.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            await sock.send_multipart((client, b"", END_SEQ, b""))


class VllmTokenHasher:
    """The engine's `token_hasher`: vLLM's block hashes of a prompt (as the published ints),
    recording each block's parent and tokens for the events.

    The root is vLLM's (`engine_hash_seed`): `H(PYTHONHASHSEED)`, or with the variable unset a
    fixed root for the sha256 algorithms and a random one for the xxhash ones (which no router
    can match), as vLLM 0.32 does.
    """

    def __init__(self, algo: VllmHashAlgo, seed: str | None, content: BlockContent) -> None:
        self.algo = algo
        self.seed = seed if seed is not None else os.urandom(16).hex()
        self.content = content

    def __call__(self, token_ids: Sequence[int], block_size: int) -> list[int]:
        digests = vllm_block_hashes(token_ids, block_size, algo=self.algo, seed=self.seed)
        hashes = [external_block_hash(d) for d in digests]
        parents: list[int | None] = [None, *hashes[:-1]]
        self.content.record([(parents[b], h, tuple(token_ids[b * block_size:(b + 1) * block_size]))
                             for b, h in enumerate(hashes)])
        return hashes


def attach_publisher(engine: SimEngine, config: KvEventsConfig | None, algo: VllmHashAlgo,
                     env: Mapping[str, str]) -> KvEventPublisher | None:
    """Publish `engine`'s KV events if `config` says so: its pool reports to the publisher
    and token-id prompts are hashed as vLLM hashes them. None when it does not publish."""
    if config is None or not config.publishes:
        return None
    seed = engine_hash_seed(algo, env.get("PYTHONHASHSEED"))
    if seed is None:
        _log.warning("PYTHONHASHSEED is not set: %s block hashes get a random root, as in vLLM, "
                     "and no router can match them; set it (and the scheduler's "
                     "--prefix-caching-hash-seed) to one value", algo)
    content = BlockContent(4 * engine.config.num_gpu_blocks)
    engine.token_hasher = VllmTokenHasher(algo, seed, content)
    publisher = KvEventPublisher(config, engine.config.block_size, content)
    engine.pool.listener = publisher
    return publisher
