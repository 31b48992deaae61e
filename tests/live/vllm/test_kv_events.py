"""vLLM's own KV events, read with Prescient's decoder, name blocks exactly as Prescient hashes
them: the cache-aware router can find a real engine's blocks (issue 5's bit-exactness, on the
real engine rather than on vLLM's hash function alone)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import zmq

from prescient.cache.hashing import engine_hash_seed, external_block_hash, vllm_block_hashes
from prescient.cache.kv_events import BlockStored, decode_batch

from ..stack import http_post
from .engine import BLOCK_SIZE, HASH_SEED, MODEL, VllmEngine


def test_vllm_block_stored_events_carry_prescients_block_hashes(
        vllm_pair: list[VllmEngine]) -> None:
    engine = vllm_pair[0]
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(engine.kv_endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    time.sleep(0.5)  # ZMQ's slow joiner: events published before the subscription are lost
    prompt = [11 + (i * 7) % 1300 for i in range(BLOCK_SIZE * 5 + 7)]  # 5 full blocks
    try:
        status, answer = http_post(engine.url + "/v1/completions", json.dumps(
            {"model": MODEL, "prompt": prompt, "max_tokens": 1}).encode())
        assert status == 200, answer
        stored: list[BlockStored] = []
        deadline = time.monotonic() + 10
        while sum(len(e.block_hashes) for e in stored) < 5 and time.monotonic() < deadline:
            if sub.poll(200):
                _topic, _seq, payload = sub.recv_multipart()
                stored += [e for e in decode_batch(payload).events if isinstance(e, BlockStored)]
    finally:
        sub.close(linger=0)
    ours = [external_block_hash(d) for d in vllm_block_hashes(
        prompt, BLOCK_SIZE, algo="sha256", seed=HASH_SEED)]
    theirs = [h for event in stored for h in event.block_hashes]
    assert theirs[:5] == ours, (theirs, ours)
    assert stored[0].block_size == BLOCK_SIZE and stored[0].parent_block_hash is None
    assert list(stored[0].token_ids[:BLOCK_SIZE]) == prompt[:BLOCK_SIZE]


def test_the_default_hash_seed_is_a_stock_vllms(vllm_env: Path) -> None:
    """Without PYTHONHASHSEED, vLLM roots the sha256 family at a fixed seed, Prescient's default
    (so stock engines match out of the box), and xxhash at a random one (None: unmatchable)."""
    code = ("from vllm.v1.core.kv_cache_utils import resolve_none_hash_seed as r;"
            "from vllm.utils.hashing import sha256, sha256_cbor, xxhash;"
            "print(r(sha256), r(sha256_cbor), r(xxhash) == r(xxhash))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    out = subprocess.run([str(vllm_env / "bin/python"), "-c", code], capture_output=True,
                         text=True, env=env, timeout=120, check=True).stdout.split()
    assert out[:2] == [engine_hash_seed("sha256", None), engine_hash_seed("sha256_cbor", None)]
    assert out[2] == "False" and engine_hash_seed("xxhash", None) is None
    assert engine_hash_seed("xxhash", "7") == "7"
