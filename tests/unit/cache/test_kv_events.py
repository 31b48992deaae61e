"""KV events: both wire encodings, sequencing with gaps and replay, and the engine hook.

The producers' structs are declared here as vLLM and SGLang declare them (msgspec, tagged) and
encoded with msgspec, so decoding is checked against the real encoders' output.
"""

from __future__ import annotations

import msgspec
import pytest

from prescient.cache.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    Gap,
    KvEventsDecodeError,
    KvEventsIndex,
    decode_batch,
)
from prescient.engine.kv_cache import BlockPool


# -- vLLM (newest): events are maps tagged under "type", the batch an array ------------------
class VStored(msgspec.Struct, omit_defaults=True, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    locality: str | None = None
    session_id: str | None = None


class VRemoved(msgspec.Struct, omit_defaults=True, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None
    ownership: str | None = None


class VCleared(msgspec.Struct, omit_defaults=True, tag="AllBlocksCleared"):
    pass


class VBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[VStored | VRemoved | VCleared]
    data_parallel_rank: int | None = None


# -- SGLang / vLLM's example: events are arrays with the tag first -------------------------
class SStored(msgspec.Struct, array_like=True, omit_defaults=True, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None


class SRemoved(msgspec.Struct, array_like=True, omit_defaults=True, tag="BlockRemoved"):
    block_hashes: list[int]


class SCleared(msgspec.Struct, array_like=True, omit_defaults=True, tag="AllBlocksCleared"):
    pass


class SBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[SStored | SRemoved | SCleared]


def vllm_payload(*events: object, rank: int | None = 0) -> bytes:
    return msgspec.msgpack.encode(VBatch(ts=1.5, events=list(events), data_parallel_rank=rank))  # type: ignore[arg-type]


def sglang_payload(*events: object) -> bytes:
    return msgspec.msgpack.encode(SBatch(ts=2.5, events=list(events)))  # type: ignore[arg-type]


def stored(*hashes: int, medium: str | None = "GPU", **kw: object) -> VStored:
    return VStored(block_hashes=list(hashes), parent_block_hash=None, token_ids=[1, 2],
                   block_size=16, lora_id=None, medium=medium, lora_name=None, **kw)  # type: ignore[arg-type]


def test_decodes_vllm_map_encoded_events_with_unknown_trailing_fields() -> None:
    payload = vllm_payload(
        stored(11, 12, locality="local", session_id="s", kv_cache_spec_kind="full_attention",
               group_idx=0),
        VRemoved(block_hashes=[11], medium="GPU", ownership="x"), VCleared())
    batch = decode_batch(payload)
    assert batch.ts == 1.5 and batch.data_parallel_rank == 0
    assert batch.events == (
        BlockStored(block_hashes=(11, 12), token_ids=(1, 2), block_size=16, medium="GPU",
                    group_idx=0),
        BlockRemoved(block_hashes=(11,), medium="GPU"), AllBlocksCleared())


def test_decodes_sglang_array_encoded_events() -> None:
    batch = decode_batch(sglang_payload(
        SStored(block_hashes=[7, 8], parent_block_hash=6, token_ids=[3] * 32, block_size=16,
                lora_id=None),
        SRemoved(block_hashes=[7]), SCleared()))
    assert batch.data_parallel_rank is None
    assert batch.events == (
        BlockStored(block_hashes=(7, 8), parent_block_hash=6, token_ids=(3,) * 32,
                    block_size=16),
        BlockRemoved(block_hashes=(7,)), AllBlocksCleared())


def test_bytes_hashes_are_kept_as_bytes() -> None:
    batch = decode_batch(vllm_payload(stored(), VRemoved(block_hashes=[b"\x01" * 32],
                                                         medium=None)))
    assert batch.events[1] == BlockRemoved(block_hashes=(b"\x01" * 32,))


@pytest.mark.parametrize("payload", [b"\xc1", msgspec.msgpack.encode([1.0, [["Nope", 1]]]),
                                     msgspec.msgpack.encode({"ts": 1.0}),
                                     msgspec.msgpack.encode([1.0, [{"type": "BlockStored"}]]),
                                     msgspec.msgpack.encode([1.0, [["BlockStored", [1.5]]]])])
def test_garbage_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(KvEventsDecodeError):
        decode_batch(payload)


def test_index_applies_stores_removes_and_clears_per_engine() -> None:
    index = KvEventsIndex()
    assert index.apply_message("e0", 0, vllm_payload(stored(1, 2, 3))) is None
    assert index.apply_message("e1", 7, sglang_payload(
        SStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=[], block_size=16,
                lora_id=None))) is None
    assert index.hit_lengths([1, 2, 3]) == {"e0": 3, "e1": 2}
    index.apply_message("e0", 1, vllm_payload(VRemoved(block_hashes=[2], medium="GPU")))
    assert index.hit_lengths([1, 2, 3]) == {"e0": 1, "e1": 2}
    index.apply_message("e1", 8, sglang_payload(SCleared()))
    assert index.hit_lengths([1, 2, 3]) == {"e0": 1}


def test_other_media_and_other_kv_groups_do_not_count_as_cached() -> None:
    index = KvEventsIndex()
    index.apply_message("e0", 0, vllm_payload(stored(1, medium="CPU"),
                                              stored(1, group_idx=1), stored(2)))
    assert index.hit_lengths([1]) == {} and index.hit_lengths([2]) == {"e0": 1}


def test_a_gap_is_reported_once_and_held_batches_apply_after_the_replay() -> None:
    gaps: list[Gap] = []
    index = KvEventsIndex(on_gap=gaps.append)
    index.apply_message("e0", 5, vllm_payload(stored(1)))
    gap = index.apply_message("e0", 8, vllm_payload(VRemoved(block_hashes=[1], medium="GPU")))
    assert gap == Gap("e0", 6, 7) and gaps == [gap]
    assert index.apply_message("e0", 9, vllm_payload(stored(4))) is None  # held, not reported
    assert index.hit_lengths([1]) == {"e0": 1}  # nothing after the gap applied yet
    assert index.expected_seq("e0") == 6
    # the replay: 5 again (a harmless duplicate), then the missing 6 and 7
    index.apply_message("e0", 5, vllm_payload(VCleared()))
    index.apply_message("e0", 6, vllm_payload(stored(2)))
    assert index.hit_lengths([2]) == {"e0": 1} and index.hit_lengths([4]) == {}
    index.apply_message("e0", 7, vllm_payload(stored(3)))
    assert index.expected_seq("e0") == 10
    assert index.hit_lengths([1]) == {}  # 8 removed it
    assert index.hit_lengths([4]) == {"e0": 1} and index.hit_lengths([1, 2]) == {}
    assert index.num_gaps == 1


def test_a_failed_replay_forgets_the_engine_and_resumes_from_what_was_held() -> None:
    index = KvEventsIndex()
    index.apply_message("e0", 0, vllm_payload(stored(1, 2)))
    index.apply_message("e1", 0, vllm_payload(stored(1)))
    index.apply_message("e0", 3, vllm_payload(stored(9)))
    index.replay_failed("e0")
    assert index.hit_lengths([1, 2]) == {"e1": 1}  # e0's old state is unknown: dropped
    assert index.hit_lengths([9]) == {"e0": 1}
    assert index.expected_seq("e0") == 4 and index.num_resyncs == 1


def test_too_many_held_batches_give_up_on_the_replay() -> None:
    index = KvEventsIndex(max_pending=2)
    index.apply_message("e0", 0, vllm_payload(stored(1)))
    for seq in (5, 6, 7):
        index.apply_message("e0", seq, vllm_payload(stored(seq)))
    assert index.num_resyncs == 1 and index.expected_seq("e0") == 8
    assert index.hit_lengths([1]) == {} and index.hit_lengths([7]) == {"e0": 1}


def test_memory_is_bounded() -> None:
    index = KvEventsIndex(max_blocks=100)
    for seq in range(50):
        index.apply_batch("e0", seq, EventBatch(ts=0.0, events=(BlockStored(
            block_hashes=tuple(range(seq * 10, seq * 10 + 10)), medium="GPU"),)))
    assert len(index.blocks) == 100 and index.blocks.size("e0") == 100
    assert index.hit_lengths(range(490, 500)) == {"e0": 10}


def test_a_dropped_instance_is_forgotten() -> None:
    index = KvEventsIndex()
    index.apply_message("e0", 3, vllm_payload(stored(1)))
    index.drop_instance("e0")
    assert index.hit_lengths([1]) == {} and index.expected_seq("e0") is None


def test_the_block_pool_listener_mirrors_the_engine_cache() -> None:
    index = KvEventsIndex()
    pool = BlockPool(num_blocks=3, block_size=16)
    pool.listener = index.listener("e0")
    pool.allocate(2)
    assert pool.register(101) and pool.register(102)
    assert not pool.register(101)  # already cached: no second event
    assert index.hit_lengths([101, 102]) == {"e0": 2}
    pool.release([101, 102], 0)  # freed but still cached
    assert index.hit_lengths([101, 102]) == {"e0": 2}
    pool.allocate(2)  # one uncached block, then the oldest cached one (102, freed tail first)
    assert index.hit_lengths([101]) == {"e0": 1} and index.hit_lengths([102]) == {}
    assert pool.hit_blocks([101, 102])[0] == 1
