"""Prefix hashes bit-exact with vLLM, upstream Llumnix's KV-store keys and the simulated engine.

Every expected value is recomputed here by hand from the producers' published rules (hashlib,
pickle, msgspec, struct, and CBOR bytes written out literally), never by calling the code under
test; where cbor2 / xxhash / vLLM are installed, they cross-check too.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import struct

import msgspec
import numpy as np
import pytest

from prescient.cache.hashing import (
    VLLM_HASH_ALGOS,
    HashMemo,
    cbor_canonical,
    external_block_hash,
    iter_vllm_block_hashes,
    kvs_keys,
    none_hash,
    sim_block_hashes,
    sim_prompt_blocks,
    vllm_block_hashes,
    vllm_hash_function,
)
from prescient.engine import AnalyticStepTime, EngineConfig, SimEngine
from prescient.errors import ConfigError
from prescient.model import Request

SIMPLE = AnalyticStepTime(c0=10.0, c_tok=1.0, c_attn=0.0, c_kv=0.0)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# canonical CBOR written out by hand: 0x83 = array(3), 0x58 0x20 = bytes(32), 0x84 = array(4),
# small ints are one byte, 0xf6 = null, 0x61 0x30 = text "0"
ROOT_CBOR = sha(b"\x61\x30")


def test_sha256_cbor_chain_matches_hand_encoded_cbor() -> None:
    b1 = sha(b"\x83\x58\x20" + ROOT_CBOR + b"\x84\x01\x02\x03\x04\xf6")
    b2 = sha(b"\x83\x58\x20" + b1 + b"\x84\x05\x06\x07\x18\x18\xf6")  # 24 -> 0x18 0x18
    assert none_hash("sha256_cbor", "0") == ROOT_CBOR
    assert vllm_block_hashes([1, 2, 3, 4, 5, 6, 7, 24, 99], 4) == [b1, b2]  # full blocks only


def test_sha256_cbor_encodes_every_integer_width() -> None:
    tokens = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1]
    items = (b"\x00\x17\x18\x18\x18\xff\x19\x01\x00\x19\xff\xff\x1a\x00\x01\x00\x00"
             b"\x1a\xff\xff\xff\xff")
    seed_root = sha(b"\x62\x34\x32")  # text "42"
    expected = sha(b"\x83\x58\x20" + seed_root + b"\x88" + items + b"\xf6")
    assert vllm_block_hashes(tokens, 8, seed="42") == [expected]


def test_extra_keys_are_the_third_element() -> None:
    extra = ("lora-a",)
    expected = sha(b"\x83\x58\x20" + ROOT_CBOR + b"\x82\x01\x02" + b"\x81\x66lora-a")
    assert vllm_block_hashes([1, 2], 2, extra_keys=extra) == [expected]


def test_vectorised_cbor_path_equals_the_generic_encoder() -> None:
    rng = random.Random(3)
    tokens = [rng.choice([rng.randrange(24), rng.randrange(300), rng.randrange(70_000),
                          rng.randrange(2**32)]) for _ in range(16 * 50 + 7)]
    generic = vllm_hash_function("sha256_cbor")
    parent, expected = none_hash("sha256_cbor", "0"), []
    for b in range(50):
        parent = generic((parent, tuple(tokens[16 * b:16 * b + 16]), None))
        expected.append(parent)
    assert vllm_block_hashes(tokens, 16) == expected
    assert vllm_block_hashes(np.array(tokens), 16) == expected


def test_sha256_is_pickle_protocol_5() -> None:
    root = sha(pickle.dumps("0", protocol=5))
    b1 = sha(pickle.dumps((root, (10, 20), None), protocol=5))
    b2 = sha(pickle.dumps((b1, (30, 40), None), protocol=5))
    assert vllm_block_hashes([10, 20, 30, 40], 2, algo="sha256") == [b1, b2]
    assert vllm_block_hashes(np.array([10, 20, 30, 40]), 2, algo="sha256") == [b1, b2]


def test_sha256_msgpack_is_msgspec_msgpack() -> None:
    enc = msgspec.msgpack.encode
    root = sha(enc("0"))
    b1 = sha(enc((root, [10, 20], None)))
    assert vllm_block_hashes([10, 20, 30], 2, algo="sha256_msgpack") == [b1]


def test_xxhash_variants_are_xxh3_128_of_the_same_serialisations() -> None:
    xxhash = pytest.importorskip("xxhash")
    x = xxhash.xxh3_128_digest
    root = x(b"\x61\x30")
    b1 = x(b"\x83\x50" + root + b"\x82\x01\x02\xf6")  # 0x50: bytes(16)
    assert vllm_block_hashes([1, 2], 2, algo="xxhash_cbor") == [b1]
    proot = x(pickle.dumps("0", protocol=5))
    assert vllm_block_hashes([1, 2], 2, algo="xxhash") == [
        x(pickle.dumps((proot, (1, 2), None), protocol=5))]


def test_unknown_algorithm_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="sha256_cbor"):
        vllm_hash_function("md5")  # type: ignore[arg-type]


def test_external_block_hash_is_the_low_64_bits_big_endian() -> None:
    digest = bytes(range(32))
    assert external_block_hash(digest) == int.from_bytes(bytes(range(24, 32)), "big")


def test_cbor_matches_cbor2_where_installed() -> None:
    cbor2 = pytest.importorskip("cbor2")
    for obj in (None, True, False, 0, 23, 24, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -1,
                -25, -2**40, b"", b"\x00" * 40, "", "é-x" * 30, (), [1, (2, b"x")],
                (b"\x01" * 32, tuple(range(300)), None)):
        assert cbor_canonical(obj) == cbor2.dumps(obj, canonical=True), obj


def test_vllm_hash_functions_match_vllm_where_installed() -> None:
    hashing = pytest.importorskip("vllm.utils.hashing")
    for algo in ("sha256", "sha256_cbor"):
        fn = hashing.get_hash_fn_by_name(algo)
        obj = (fn("0"), tuple(range(100, 116)), None)
        assert vllm_hash_function(algo)(obj) == fn(obj)


# ---- upstream Llumnix KV-store keys ------------------------------------------------------

def test_kvs_sha256_cbor_keys_are_the_vllm_chain_in_hex_with_the_rank_suffix() -> None:
    tokens = list(range(1, 11))
    c1 = sha(b"\x83\x58\x20" + ROOT_CBOR + b"\x84\x01\x02\x03\x04\xf6")
    c2 = sha(b"\x83\x58\x20" + c1 + b"\x84\x05\x06\x07\x08\xf6")
    c3 = sha(b"\x83\x58\x20" + c2 + b"\x82\x09\x0a\xf6")  # the unfull chunk, as a short array
    assert kvs_keys(tokens, 4) == [c1.hex() + "_0", c2.hex() + "_0"]
    assert kvs_keys(tokens, 4, save_unfull_chunk=True) == [
        c1.hex() + "_0", c2.hex() + "_0", c3.hex() + "_0"]


def test_kvs_sha256_hex_chains_raw_digests_and_suffixes_only_the_unfull_chunk() -> None:
    tokens = [1, 2, 3, 70000, 5]
    d1 = sha(struct.pack("<2I", 1, 2))
    d2 = sha(d1 + struct.pack("<2I", 3, 70000))
    d3 = sha(d2 + struct.pack("<I", 5))
    assert kvs_keys(tokens, 2, algo="sha256_hex") == [d1.hex(), d2.hex()]
    assert kvs_keys(tokens, 2, algo="sha256_hex", save_unfull_chunk=True) == [
        d1.hex(), d2.hex(), d3.hex() + "_0"]


def test_kvs_xxhash_is_one_running_xxh64_over_int64_tokens() -> None:
    xxhash = pytest.importorskip("xxhash")
    h = xxhash.xxh64(seed=0)
    h.update(struct.pack("<3q", 1, 2, 3))
    k1 = h.intdigest()
    h.update(struct.pack("<3q", 4, 0, 0))  # the unfull chunk, zero-padded
    k2 = h.intdigest()
    assert kvs_keys([1, 2, 3, 4], 3, algo="xxhash") == [f"iris.block.hash.key.{k1}"]
    assert kvs_keys([1, 2, 3, 4], 3, algo="xxhash", save_unfull_chunk=True,
                    iris_meta_prefix="p.", vllm_block_prefix="b.") == [f"p.b.{k1}", f"p.b.{k2}"]


# ---- the simulated engine ----------------------------------------------------------------

def run_to_completion(engine: SimEngine, request: Request) -> None:
    assert not engine.add_request(request, 0.0)
    now = engine.start_step(0.0)
    while now is not None:
        engine.complete_step()
        now = engine.start_step(now)


@pytest.mark.parametrize("kind", ["tokens", "ids"])
def test_sim_block_hashes_name_the_blocks_the_simulated_engine_caches(kind: str) -> None:
    engine = SimEngine("i0", EngineConfig(num_gpu_blocks=1000), SIMPLE)
    bs = engine.config.block_size
    if kind == "tokens":
        first = Request(request_id="a", prompt_len=300, output_len=2,
                        prompt_token_ids=tuple(range(300)))
        second = Request(request_id="b", prompt_len=400, output_len=2,
                         prompt_token_ids=tuple(range(300)) + tuple(range(1000, 1100)))
    else:
        first = Request(request_id="a", prompt_len=300, output_len=2,
                        prefix_block_ids=(1, 2, 3), prefix_block_size=100)
        second = Request(request_id="b", prompt_len=400, output_len=2,
                         prefix_block_ids=(1, 2, 3, 9), prefix_block_size=100)
    run_to_completion(engine, first)
    held = sim_block_hashes(first, bs, sim_prompt_blocks(first, bs))
    assert engine.pool.hit_blocks(held)[0] == len(held) == (300 - 1) // bs
    # the next request finds exactly its shared leading blocks, as the engine will
    mine = sim_block_hashes(second, bs, sim_prompt_blocks(second, bs))
    assert engine.pool.hit_blocks(mine)[0] == 300 // bs


@pytest.mark.parametrize("algo", VLLM_HASH_ALGOS)
def test_lazy_hashing_with_a_memo_equals_the_whole_chain(algo: str) -> None:
    tokens = [(i * 7919) % 50_000 for i in range(1000)]
    want = vllm_block_hashes(tokens[:999], 16, algo=algo, seed="3")  # type: ignore[arg-type]
    memo = HashMemo(capacity=40)  # smaller than the chain: it starts over on the way
    for _ in range(3):
        got = list(iter_vllm_block_hashes(tuple(tokens), 16, algo=algo,  # type: ignore[arg-type]
                                          seed="3", length=999, memo=memo))
        assert got == want
        assert 0 < len(memo) <= 40
    # stopping early hashes no further (a lookup that misses at block 0)
    lazy = iter_vllm_block_hashes(tokens, 16, algo=algo, seed="3")  # type: ignore[arg-type]
    assert next(lazy) == want[0]
