"""The engines' own word on what they cache: vLLM / SGLang KV events, decoded and indexed.

Wire format (`vllm/distributed/kv_events.py`, shared/reference/vllm-cpu.md §7): each ZMQ message
is `(topic, seq as 8-byte big-endian, msgpack(batch))`; a batch is `[ts, events,
data_parallel_rank]` and each event a tagged struct `BlockStored` / `BlockRemoved` /
`AllBlocksCleared`. Producers disagree on the event encoding: SGLang and vLLM's example encode
events as arrays with the tag first (`array_like=True`), the newest vLLM as maps with the tag
under `"type"`. `decode_batch` reads both, and tolerates fields it does not know (new vLLM
versions append fields).

`KvEventsIndex` keeps a global block -> instances index from them (a bounded `BlockIndex`).
Sequence numbers are per engine: a batch that skips ahead is held back and reported as a `Gap`
so the subscriber can ask the engine's replay socket for the missing ones; once they arrive the
held batches apply in order. When replay is impossible (`replay_failed`), the engine's entries
are dropped (its cache content is unknown) and the held batches apply from there. Duplicates
(seq already applied) are ignored, so replaying too much is harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from prescient.cache.index import BlockIndex, BlockKey

_STORED = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
           "lora_name", "extra_keys", "group_idx")
_REMOVED = ("block_hashes", "medium", "group_idx")
DEFAULT_MEDIA: tuple[str | None, ...] = ("GPU", None)  # vLLM says "GPU" even on CPU; SGLang None


class BlockStored(msgspec.Struct, frozen=True, kw_only=True):
    block_hashes: tuple[BlockKey, ...]
    parent_block_hash: BlockKey | None = None
    token_ids: tuple[int, ...] = ()
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, frozen=True, kw_only=True):
    block_hashes: tuple[BlockKey, ...]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, frozen=True):
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, frozen=True, kw_only=True):
    ts: float
    events: tuple[KvEvent, ...]
    data_parallel_rank: int | None = None


class KvEventsDecodeError(ValueError):
    """A payload that is not a KV-event batch."""


class Gap(msgspec.Struct, frozen=True):
    """Batches `first..last` (inclusive) of `instance_id` are missing: replay them."""

    instance_id: str
    first: int
    last: int


_DECODER = msgspec.msgpack.Decoder()


def decode_batch(payload: bytes) -> EventBatch:
    """One msgpack batch in either encoding; raises `KvEventsDecodeError` on anything else."""
    try:
        raw = _DECODER.decode(payload)
    except msgspec.DecodeError as e:
        raise KvEventsDecodeError(f"not msgpack: {e}") from e
    try:
        if isinstance(raw, dict):
            ts, events, rank = raw["ts"], raw["events"], raw.get("data_parallel_rank")
        else:
            ts, events = raw[0], raw[1]
            rank = raw[2] if len(raw) > 2 else None
        return EventBatch(ts=float(ts), events=tuple(_event(e) for e in events),
                          data_parallel_rank=rank)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise KvEventsDecodeError(f"not a KV-event batch: {e!r}") from e


def _event(raw: Any) -> KvEvent:
    if isinstance(raw, dict):
        tag, fields = raw["type"], raw
    else:
        tag, values = raw[0], raw[1:]
        names = _STORED if tag == "BlockStored" else _REMOVED if tag == "BlockRemoved" else ()
        fields = dict(zip(names, values, strict=False))
    if tag == "BlockStored":
        return BlockStored(
            block_hashes=_keys(fields["block_hashes"]),
            parent_block_hash=_key(fields.get("parent_block_hash")),
            token_ids=tuple(fields.get("token_ids") or ()),
            block_size=int(fields.get("block_size") or 0),
            lora_id=fields.get("lora_id"), medium=fields.get("medium"),
            group_idx=fields.get("group_idx"))
    if tag == "BlockRemoved":
        return BlockRemoved(block_hashes=_keys(fields["block_hashes"]),
                            medium=fields.get("medium"), group_idx=fields.get("group_idx"))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown event type {tag!r}")


def _key(value: Any) -> BlockKey | None:
    if value is None or isinstance(value, int | bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a block hash is an int or bytes, not {type(value).__name__}")


def _keys(values: Iterable[Any]) -> tuple[BlockKey, ...]:
    return tuple(_key(v) for v in values)


class KvEventsIndex:
    """Global block -> instances index from the engines' KV events.

    Args:
        max_blocks: bound on indexed blocks (least recently stored are forgotten first).
        media: the `medium` values that count as cached (others, e.g. CPU offload, are ignored).
        max_pending: batches held back per engine while waiting for a replay; beyond this the
            replay is given up (`replay_failed`).
        on_gap: called with each `Gap` as it is found (e.g. to request a replay).
    """

    def __init__(self, max_blocks: int = 1_000_000, *,
                 media: Sequence[str | None] = DEFAULT_MEDIA, max_pending: int = 1000,
                 on_gap: Callable[[Gap], None] | None = None) -> None:
        self.blocks = BlockIndex(max_blocks)
        self.media = frozenset(media)
        self.max_pending = max_pending
        self.on_gap = on_gap
        self.num_gaps = 0
        self.num_resyncs = 0
        self.block_size = 0  # the engines' block size, from BlockStored events (0: none yet)
        self._last_seq: dict[str, int] = {}
        self._pending: dict[str, dict[int, EventBatch]] = {}

    # ---- the KvIndex protocol --------------------------------------------------------------

    def hit_lengths(self, block_hashes: Iterable[BlockKey]) -> dict[str, int]:
        return self.blocks.hit_lengths(block_hashes)

    def advance(self, now: float) -> None:
        """Events carry their own time; nothing expires."""

    # ---- sequenced batches -----------------------------------------------------------------

    def apply_message(self, instance_id: str, seq: int, payload: bytes) -> Gap | None:
        """A ZMQ message's sequence number and payload; see `apply_batch`."""
        return self.apply_batch(instance_id, seq, decode_batch(payload))

    def apply_batch(self, instance_id: str, seq: int, batch: EventBatch) -> Gap | None:
        """Apply a batch in sequence; returns the gap it revealed, if any."""
        last = self._last_seq.get(instance_id)
        if last is not None and seq <= last:
            return None  # already applied (replay overlap)
        pending = self._pending.get(instance_id)
        if last is None or seq == last + 1:
            self._apply(instance_id, batch.events)
            self._last_seq[instance_id] = seq
            if pending:
                self._drain(instance_id)
            return None
        pending = self._pending.setdefault(instance_id, {})
        first_missing = last + 1
        reported = bool(pending)
        pending[seq] = batch
        if len(pending) > self.max_pending:
            self.replay_failed(instance_id)
            return None
        if reported:
            return None  # the gap before the first held batch is being replayed already
        gap = Gap(instance_id, first_missing, seq - 1)
        self.num_gaps += 1
        if self.on_gap is not None:
            self.on_gap(gap)
        return gap

    def replay_failed(self, instance_id: str) -> None:
        """The missing batches will not come: forget the engine's blocks, apply what is held."""
        self.num_resyncs += 1
        self.blocks.clear(instance_id)
        pending = self._pending.pop(instance_id, {})
        for seq in sorted(pending):
            self._apply(instance_id, pending[seq].events)
            self._last_seq[instance_id] = seq

    def expected_seq(self, instance_id: str) -> int | None:
        """The next sequence number wanted from `instance_id` (None before its first)."""
        last = self._last_seq.get(instance_id)
        return None if last is None else last + 1

    def awaiting_replay(self, instance_id: str) -> bool:
        """Batches of `instance_id` are held back behind a gap."""
        return instance_id in self._pending

    def start_instance(self, instance_id: str) -> None:
        """Expect `instance_id`'s batches from sequence 0, knowing nothing of its cache.

        For a new subscription (a replay from 0 then rebuilds what the engine published
        before) and for a publisher that restarted (its sequence went back; its cache is new).
        """
        self.blocks.clear(instance_id)
        self._last_seq[instance_id] = -1
        self._pending.pop(instance_id, None)

    def last_seq(self, instance_id: str) -> int | None:
        """The last sequence number applied from `instance_id` (None: not started)."""
        return self._last_seq.get(instance_id)

    def drop_instance(self, instance_id: str) -> None:
        """The instance is gone: forget its blocks and its sequence."""
        self.blocks.drop_holder(instance_id)
        self._last_seq.pop(instance_id, None)
        self._pending.pop(instance_id, None)

    def _drain(self, instance_id: str) -> None:
        pending = self._pending[instance_id]
        nxt = self._last_seq[instance_id] + 1
        while nxt in pending:
            self._apply(instance_id, pending.pop(nxt).events)
            self._last_seq[instance_id] = nxt
            nxt += 1
        for seq in [s for s in pending if s < nxt]:
            del pending[seq]
        if not pending:
            del self._pending[instance_id]

    # ---- events ----------------------------------------------------------------------------

    def apply_events(self, instance_id: str, events: Iterable[KvEvent]) -> None:
        """Apply events without sequencing (e.g. delivered in order by direct calls)."""
        self._apply(instance_id, events)

    def _apply(self, instance_id: str, events: Iterable[KvEvent]) -> None:
        blocks, media = self.blocks, self.media
        for event in events:
            if isinstance(event, BlockStored):
                if event.medium in media and not event.group_idx:
                    blocks.store(instance_id, event.block_hashes)
                    if event.block_size:
                        self.block_size = event.block_size
            elif isinstance(event, BlockRemoved):
                if event.medium in media and not event.group_idx:
                    blocks.remove(instance_id, event.block_hashes)
            else:
                blocks.clear(instance_id)

    def listener(self, instance_id: str) -> EngineListener:
        """A `BlockPool.listener` that feeds this index directly (the simulator's engines)."""
        return EngineListener(self.blocks, instance_id)


class EngineListener:
    """Direct block events from a simulated engine's pool, in virtual time."""

    __slots__ = ("_blocks", "_instance_id")

    def __init__(self, blocks: BlockIndex, instance_id: str) -> None:
        self._blocks = blocks
        self._instance_id = instance_id

    def stored(self, block_hash: int) -> None:
        self._blocks.store(self._instance_id, (block_hash,))

    def removed(self, block_hash: int) -> None:
        self._blocks.remove(self._instance_id, (block_hash,))
