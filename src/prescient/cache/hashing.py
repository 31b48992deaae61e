"""Prefix block hashes, bit-exact with the engines and the KV stores that hold the blocks.

A cache-aware router can only find a prompt's blocks in an index if it names them exactly as
their holder does, so each function here reproduces one producer's rule:

- `vllm_block_hashes`: vLLM's prefix-cache block hashes (`vllm/v1/core/kv_cache_utils.py`
  `hash_block_tokens` over `vllm/utils/hashing.py`). Block `i` is
  `H((parent, tuple(block_tokens), extra_keys))` with `parent` the previous block's hash and,
  for the first block, `NONE_HASH = H(seed)` where `seed` is the engine's `PYTHONHASHSEED`
  string; unset, vLLM 0.32 uses "vllm-none-hash" for the sha256 algorithms and a random seed for
  the xxhash ones, which no router can match (`engine_hash_seed`). `H` is one
  of vLLM's `--prefix-caching-hash-algo` values: `sha256` (pickle, protocol 5), `sha256_cbor`
  (canonical CBOR), `sha256_msgpack`, `xxhash` / `xxhash_cbor` / `xxhash_msgpack` (xxh3-128 of
  the same serialisations). Only full blocks are hashed.
- `external_block_hash`: the integer vLLM publishes in KV events by default
  (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`): the low 64 bits of the big-endian digest.
- `kvs_keys`: upstream Llumnix's KV-store keys (`pkg/scheduler/hasher/*.go`): `sha256_cbor`
  (vLLM's chain over `--kvs-chunk-size` chunks, `hex + "_0"`, seed env `GO_HASH_SEED`, "0" by
  default), `sha256_hex` (sha256 of the previous digest then uint32-LE tokens; only an unfull
  last chunk gets `_0`) and `xxhash` (one running xxh64 over int64-LE tokens, a key per chunk,
  an unfull last chunk zero-padded; `iris.block.hash.key.<decimal>` for v6d).
- `sim_block_hashes`: the simulated engine's chain (`engine/core.py` `_hashes`), so a router in
  the simulator names blocks as the simulated engines do.

Canonical CBOR is encoded here rather than through `cbor2`: the inputs are always a byte string,
a run of non-negative token ids and a few small extra keys, and the token run encodes in one
vectorised pass (a 32k-token prompt hashes in a few milliseconds). The tests check it against
`cbor2.dumps(..., canonical=True)` where cbor2 is installed.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import pickle
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import msgspec
import numpy as np

from prescient.errors import ConfigError
from prescient.model import Request

VllmHashAlgo = Literal["sha256", "sha256_cbor", "sha256_msgpack", "xxhash", "xxhash_cbor",
                       "xxhash_msgpack"]
VLLM_HASH_ALGOS: tuple[VllmHashAlgo, ...] = ("sha256", "sha256_cbor", "sha256_msgpack",
                                             "xxhash", "xxhash_cbor", "xxhash_msgpack")
KvsHashAlgo = Literal["sha256_cbor", "sha256_hex", "xxhash"]
KVS_KEY_SUFFIX = "_0"  # keys saved by the hybrid connector carry a tp-rank suffix; query rank 0
_MASK64 = (1 << 64) - 1
_MSGPACK = msgspec.msgpack.Encoder()


# ---- canonical CBOR (RFC 8949 §4.2.1, as cbor2.dumps(..., canonical=True)) ---------------

def _head(major: int, n: int) -> bytes:
    """A CBOR item head: major type and argument in the shortest form."""
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 1 << 8:
        return bytes((major << 5 | 24, n))
    if n < 1 << 16:
        return bytes((major << 5 | 25,)) + n.to_bytes(2, "big")
    if n < 1 << 32:
        return bytes((major << 5 | 26,)) + n.to_bytes(4, "big")
    if n < 1 << 64:
        return bytes((major << 5 | 27,)) + n.to_bytes(8, "big")
    raise ValueError(f"integer {n} does not fit CBOR's 64-bit argument")


def cbor_canonical(obj: Any) -> bytes:
    """Canonical CBOR of None, bools, ints, bytes, str, and lists/tuples of these."""
    if obj is None:
        return b"\xf6"
    if obj is True or obj is False:
        return b"\xf5" if obj else b"\xf4"
    if isinstance(obj, int):
        return _head(0, obj) if obj >= 0 else _head(1, -1 - obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        data = bytes(obj)
        return _head(2, len(data)) + data
    if isinstance(obj, str):
        data = obj.encode()
        return _head(3, len(data)) + data
    if isinstance(obj, list | tuple):
        return _head(4, len(obj)) + b"".join(cbor_canonical(x) for x in obj)
    raise TypeError(f"cbor_canonical: unsupported type {type(obj).__name__}")


def _cbor_token_items(tokens: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Every token's CBOR item, concatenated, and the byte offset where each item starts.

    Token ids are non-negative and below 2**32 (any tokenizer's vocabulary), so an item is
    1, 2, 3 or 5 bytes: the head alone, or a head byte of 0x18 / 0x19 / 0x1a and the value.
    """
    t = tokens.astype(np.uint64)
    if len(t) and int(t.max()) >= 1 << 32:
        raise ValueError("token ids must be < 2**32")
    size = np.where(t < 24, 1, np.where(t < 256, 2, np.where(t < 65536, 3, 5)))
    ends = np.cumsum(size)
    starts = ends - size
    out = np.zeros(int(ends[-1]) if len(t) else 0, np.uint8)
    one = size == 1
    out[starts[one]] = t[one]
    for width, head in ((2, 0x18), (3, 0x19), (5, 0x1A)):
        rows = np.flatnonzero(size == width)
        s, v = starts[rows], t[rows]
        out[s] = head
        for k in range(1, width):  # big-endian value bytes after the head
            out[s + k] = (v >> np.uint64(8 * (width - 1 - k))) & np.uint64(0xFF)
    return out.tobytes(), np.append(starts, ends[-1] if len(t) else 0)


# ---- vLLM --------------------------------------------------------------------------------

def _xxh3_128() -> Callable[[bytes], bytes]:
    try:
        import xxhash
    except ImportError as e:  # optional, as in vLLM
        raise ConfigError("the xxhash prefix-caching hash algorithms need the `xxhash` "
                          "package (pip install xxhash)") from e
    return xxhash.xxh3_128_digest  # type: ignore[no-any-return]


def _serializer(algo: VllmHashAlgo) -> Callable[[Any], bytes]:
    if algo.endswith("_cbor"):
        return cbor_canonical
    if algo.endswith("_msgpack"):
        return _MSGPACK.encode
    return lambda obj: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def vllm_hash_function(algo: VllmHashAlgo) -> Callable[[Any], bytes]:
    """vLLM's `get_hash_fn_by_name(algo)`: object -> digest bytes."""
    if algo not in VLLM_HASH_ALGOS:
        raise ConfigError(f"unknown prefix-caching hash algorithm {algo!r}; "
                          f"known: {', '.join(VLLM_HASH_ALGOS)}")
    serialize = _serializer(algo)
    if algo.startswith("xxhash"):
        digest = _xxh3_128()
        return lambda obj: digest(serialize(obj))
    return lambda obj: hashlib.sha256(serialize(obj)).digest()


# vLLM's NONE_HASH seed when PYTHONHASHSEED is unset and the algorithm is cryptographic
# (`vllm/v1/core/kv_cache_utils.py` DEFAULT_NONE_HASH_SEED, vLLM 0.32); the xxhash algorithms get a
# random seed instead, which no router can reproduce.
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_NON_CRYPTO_ALGOS = frozenset({"xxhash", "xxhash_cbor", "xxhash_msgpack"})


def engine_hash_seed(algo: VllmHashAlgo, pythonhashseed: str | None) -> str | None:
    """The seed a vLLM engine derives its root hash from: its `PYTHONHASHSEED` if set, else
    `DEFAULT_NONE_HASH_SEED` for the sha256 algorithms and a random one (None: unknowable) for
    the xxhash ones."""
    if pythonhashseed is not None:
        return pythonhashseed
    return None if algo in _NON_CRYPTO_ALGOS else DEFAULT_NONE_HASH_SEED


@functools.lru_cache(maxsize=16)
def none_hash(algo: VllmHashAlgo, seed: str) -> bytes:
    """vLLM's `NONE_HASH`: the root parent, `H(PYTHONHASHSEED)` (the string, not a number)."""
    return vllm_hash_function(algo)(seed)


def vllm_block_hashes(
    token_ids: Sequence[int], block_size: int, *, algo: VllmHashAlgo = "sha256_cbor",
    seed: str = "0", extra_keys: tuple[Any, ...] | None = None,
) -> list[bytes]:
    """The digests of the full blocks of `token_ids`, as a vLLM engine computes them.

    `extra_keys` applies to every block (a LoRA name does; vLLM adds a cache salt to the first
    block only and multimodal hashes per block: pass None and hash those prompts elsewhere).
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    if isinstance(token_ids, np.ndarray):  # pickle and msgpack must see Python ints
        token_ids = token_ids.tolist()
    n = len(token_ids) // block_size
    if algo == "sha256_cbor" and n:
        return _sha256_cbor_chain(np.asarray(token_ids[: n * block_size]), block_size,
                                  none_hash(algo, seed), extra_keys)
    fn, parent = vllm_hash_function(algo), none_hash(algo, seed)
    out: list[bytes] = []
    for b in range(n):
        block = token_ids[b * block_size:(b + 1) * block_size]
        tokens = list(block) if algo.endswith("_msgpack") else tuple(block)
        parent = fn((parent, tokens, extra_keys))
        out.append(parent)
    return out


def iter_vllm_block_hashes(
    token_ids: Sequence[int], block_size: int, *, algo: VllmHashAlgo = "sha256",
    seed: str = "0", length: int | None = None, memo: HashMemo | None = None,
) -> Iterator[bytes]:
    """`vllm_block_hashes` of `token_ids[:length]`, one block at a time, for a caller that
    may stop early.

    A lookup needs block `i + 1` only while some holder has blocks `0..i`, so hashing lazily
    costs the prompt's hit length, not its length (no extra keys: plain-text prompts). Nothing
    is copied or encoded ahead: sha256_cbor pre-encodes runs of blocks that double in size.
    `memo` remembers digests by (parent, block): a prefix seen before (the ones that hit) costs
    a dictionary probe per block instead of a serialisation and a hash.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    n = (len(token_ids) if length is None else min(length, len(token_ids))) // block_size
    if not n:
        return
    parent = none_hash(algo, seed)
    if algo == "sha256_cbor":
        yield from _iter_sha256_cbor(token_ids, block_size, n, parent, memo)
        return
    fn, as_list = vllm_hash_function(algo), algo.endswith("_msgpack")
    for b in range(n):
        block = token_ids[b * block_size:(b + 1) * block_size]
        if isinstance(block, np.ndarray):  # pickle and msgpack must see Python ints
            block = block.tolist()
        key = (parent, tuple(block))
        known = memo.get(key) if memo is not None else None
        if known is None:
            known = fn((parent, list(block) if as_list else key[1], None))
            if memo is not None:
                memo.put(key, known)
        parent = known
        yield parent


def _iter_sha256_cbor(token_ids: Sequence[int], block_size: int, n: int, parent: bytes,
                      memo: HashMemo | None) -> Iterator[bytes]:
    """sha256_cbor's lazy chain: memoised blocks first, then runs of blocks encoded at once."""
    done = 0
    if memo is not None:  # known blocks first: no encoding at all
        while done < n:
            block = token_ids[done * block_size:(done + 1) * block_size]
            known = memo.get((parent, tuple(block)))
            if known is None:
                break
            parent = known
            done += 1
            yield parent
    head, tail, sha256 = _head(4, block_size), cbor_canonical(None), hashlib.sha256
    run = 4
    while done < n:
        upto = min(n, done + run)
        items, offsets = _cbor_token_items(
            np.asarray(token_ids[done * block_size:upto * block_size]))
        for b, (start, end) in enumerate(itertools.pairwise(
                offsets[::block_size].tolist()), done):
            h = sha256(b"\x83" + _head(2, len(parent)) + parent + head)
            h.update(items[start:end])
            h.update(tail)
            digest = h.digest()
            if memo is not None:
                block = token_ids[b * block_size:(b + 1) * block_size]
                memo.put((parent, tuple(block)), digest)
            parent = digest
            yield parent
        done, run = upto, run * 2


class HashMemo:
    """Block digests by (parent digest, block content), at most `capacity` of them.

    Full keys, not their hashes: a collision would name a block wrongly. Full, it starts over
    (cheaper than an LRU, and the prefixes in use come back at their next lookup).
    """

    __slots__ = ("_digests", "capacity")

    def __init__(self, capacity: int = 65_536) -> None:
        self.capacity = capacity
        self._digests: dict[tuple[bytes, Any], bytes] = {}

    def __len__(self) -> int:
        return len(self._digests)

    def get(self, key: tuple[bytes, Any]) -> bytes | None:
        return self._digests.get(key)

    def put(self, key: tuple[bytes, Any], digest: bytes) -> None:
        if len(self._digests) >= self.capacity:
            self._digests.clear()
        self._digests[key] = digest


def _sha256_cbor_chain(tokens: np.ndarray, block_size: int, root: bytes,
                       extra_keys: tuple[Any, ...] | None) -> list[bytes]:
    """`sha256(cbor([parent, block, extra]))` per block, on pre-encoded token items."""
    items, offsets = _cbor_token_items(tokens)
    array_head = _head(4, block_size)
    tail = cbor_canonical(extra_keys)
    sha256 = hashlib.sha256
    out: list[bytes] = []
    parent = root
    bounds = offsets[::block_size].tolist()
    for start, end in itertools.pairwise(bounds):
        h = sha256(b"\x83" + _head(2, len(parent)) + parent + array_head)
        h.update(items[start:end])
        h.update(tail)
        parent = h.digest()
        out.append(parent)
    return out


def external_block_hash(digest: bytes) -> int:
    """The int vLLM publishes in KV events (low 64 bits of the big-endian digest)."""
    return int.from_bytes(digest, "big") & _MASK64


# ---- upstream Llumnix KV-store keys -------------------------------------------------------

def kvs_keys(
    tokens: Sequence[int], chunk_size: int, *, algo: KvsHashAlgo = "sha256_cbor",
    save_unfull_chunk: bool = False, seed: str = "0", iris_meta_prefix: str = "iris.",
    vllm_block_prefix: str = "block.hash.key.",
) -> list[str]:
    """The KV store's keys of `tokens`' chunks (`--kvs-hash-algo`, `--kvs-chunk-size`)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if algo == "sha256_cbor":
        return _kvs_sha256_cbor(tokens, chunk_size, save_unfull_chunk, seed)
    if algo == "sha256_hex":
        return _kvs_sha256_hex(tokens, chunk_size, save_unfull_chunk)
    if algo == "xxhash":
        prefix = iris_meta_prefix + vllm_block_prefix
        return [f"{prefix}{h}" for h in _kvs_xxhash64(tokens, chunk_size, save_unfull_chunk)]
    raise ConfigError(f"unknown --kvs-hash-algo {algo!r}")


def _kvs_sha256_cbor(tokens: Sequence[int], chunk: int, unfull: bool, seed: str) -> list[str]:
    full = len(tokens) // chunk
    digests = vllm_block_hashes(tokens, chunk, algo="sha256_cbor", seed=seed)
    if unfull and len(tokens) % chunk:
        parent = digests[-1] if digests else none_hash("sha256_cbor", seed)
        digests.append(hashlib.sha256(cbor_canonical(
            [parent, list(tokens[full * chunk:]), None])).digest())
    return [d.hex() + KVS_KEY_SUFFIX for d in digests]


def _kvs_sha256_hex(tokens: Sequence[int], chunk: int, unfull: bool) -> list[str]:
    keys: list[str] = []
    prior = b""
    starts = range(0, len(tokens) if unfull else len(tokens) // chunk * chunk, chunk)
    for start in starts:
        part = tokens[start:start + chunk]
        prior = hashlib.sha256(prior + struct.pack(f"<{len(part)}I", *part)).digest()
        keys.append(prior.hex() + (KVS_KEY_SUFFIX if len(part) < chunk else ""))
    return keys


def _kvs_xxhash64(tokens: Sequence[int], chunk: int, unfull: bool) -> list[int]:
    try:
        import xxhash
    except ImportError as e:
        raise ConfigError("--kvs-hash-algo xxhash needs the `xxhash` package") from e
    h = xxhash.xxh64(seed=0)
    out: list[int] = []
    full = len(tokens) // chunk
    for b in range(full):
        h.update(struct.pack(f"<{chunk}q", *tokens[b * chunk:(b + 1) * chunk]))
        out.append(h.intdigest())
    rest = len(tokens) - full * chunk
    if unfull and rest:
        h.update(struct.pack(f"<{chunk}q", *tokens[full * chunk:], *([0] * (chunk - rest))))
        out.append(h.intdigest())
    return out


# ---- the simulated engine ----------------------------------------------------------------

def sim_coverage_blocks(request: Request, block_size: int) -> int:
    """Leading blocks of `request` whose content is shareable (as `SimEngine` counts them)."""
    if request.prompt_token_ids is not None:
        tokens = request.prompt_len
    else:
        tokens = len(request.prefix_block_ids) * request.prefix_block_size
    return min(tokens, request.prompt_len + request.output_len) // block_size


def sim_prompt_blocks(request: Request, block_size: int) -> int:
    """Blocks a simulated engine can find cached for a new request (never the last token)."""
    return max(0, min(sim_coverage_blocks(request, block_size),
                      (request.prompt_len - 1) // block_size))


def sim_block_hashes(request: Request, block_size: int, upto: int) -> list[int]:
    """The simulated engine's chain hashes of `request`'s first `upto` blocks.

    `h_i = hash((h_{i-1}, key_i))` from `h_{-1} = 0`, `key_i` the block's token ids, or, for
    requests described by `prefix_block_ids`, (id at the block's start, offset in that id, id
    at the block's end). Python hashes ints and tuples of ints without a random seed, so the
    values are stable across processes.
    """
    return extend_sim_chain(request, block_size, [], upto)


def extend_sim_chain(request: Request, block_size: int, hashes: list[int],
                     upto: int) -> list[int]:
    """Append the chain hashes of blocks `len(hashes) .. upto - 1` to `hashes` (in place) and
    return it: the simulated engine computes its requests' chains lazily, block by block."""
    token_ids, ids = request.prompt_token_ids, request.prefix_block_ids
    size = request.prefix_block_size
    h = hashes[-1] if hashes else 0
    for b in range(len(hashes), upto):
        s = b * block_size
        if token_ids is not None:
            key: tuple[int, ...] = tuple(token_ids[s:s + block_size])
        else:
            key = (ids[s // size], s % size, ids[(s + block_size - 1) // size])
        h = hash((h, key))
        hashes.append(h)
    return hashes
