"""Cache-aware scheduling's data side: engine-exact prefix hashing and KV-cache indexes.

Pure modules only are imported here (the scheduling core imports this package and must load no
I/O module); the Mooncake metadata-service client is `prescient.cache.mooncake`.
"""

from prescient.cache.hashing import (
    VLLM_HASH_ALGOS,
    external_block_hash,
    kvs_keys,
    none_hash,
    sim_block_hashes,
    vllm_block_hashes,
)
from prescient.cache.index import ApproximateIndex, BlockIndex, KvIndex, contiguous_hits
from prescient.cache.kv_events import Gap, KvEventsIndex, decode_batch

__all__ = [
    "VLLM_HASH_ALGOS",
    "ApproximateIndex",
    "BlockIndex",
    "Gap",
    "KvEventsIndex",
    "KvIndex",
    "contiguous_hits",
    "decode_batch",
    "external_block_hash",
    "kvs_keys",
    "none_hash",
    "sim_block_hashes",
    "vllm_block_hashes",
]
