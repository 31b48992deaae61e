"""A synthetic trace in the Mooncake FAST'25 format, shaped like the published traces.

The real Kimi traces (`kvcache-ai/Mooncake` `FAST25-release/traces/`) are not bundled, so
cache-aware benchmarks generate rows with the same schema (`timestamp` in ms, `input_length`,
`output_length`, `hash_ids` of 512-token blocks; `prescient.sim.traces.load_mooncake_jsonl`
reads them) and the statistics the Mooncake paper publishes for its arXiv trace
(shared/reference/papers.md §6):

- input: mean ~7,590 tokens (`input_length`); heavy-tailed (the conversation trace's median is
  0.57x its mean), so both parts below are lognormal;
- output: mean ~182 tokens;
- prefix reuse: an infinite cache would hit ~50% of the prompt blocks ("up to 50% cache hit";
  the published traces span 36.6% (conversation) to 64% (synthetic)). `ideal_hit_rate`
  measures it: the defaults give 0.44-0.51 from 3,000 to 24,000 requests.

Each request is one shared prefix (a document or system prompt: `num_docs` of them, Zipf
popularity) followed by blocks of its own, the last one partial. Arrivals are Poisson.
Nothing here is tuned to any routing policy: the pool size and lengths follow from the three
statistics above.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BLOCK = 512  # tokens per hash id, as in the Mooncake traces
_DOC_ID_BASE = 1_000_000_000  # shared blocks' ids, apart from the private ones
_IDEAL_ID_BASE = 2_000_000_000  # `ideal_miss_rows`' fresh ids, apart from both


def _lognormal(rng: np.random.Generator, mean: float, median: float, size: int) -> np.ndarray:
    sigma = np.sqrt(2 * np.log(mean / median))
    return rng.lognormal(np.log(median), sigma, size)


def mooncake_rows(n: int, *, seed: int = 0, rate: float = 10.0, num_docs: int = 1000,
                  zipf: float = 1.1, doc_blocks: tuple[float, float] = (9.5, 6.0),
                  own_blocks: tuple[float, float] = (7.0, 4.0),
                  output: tuple[float, float] = (182.0, 150.0)) -> list[dict[str, object]]:
    """`n` Mooncake-format rows.

    Args:
        n: requests.
        seed: the generator's seed.
        rate: mean arrivals per second (Poisson).
        num_docs: shared prefixes in the pool.
        zipf: the pool's popularity exponent (rank r drawn with weight r**-zipf).
        doc_blocks: (mean, median) of a shared prefix's length in blocks (at least 1).
        own_blocks: (mean, median) of a request's private blocks (at least 1, the last
            partial).
        output: (mean, median) output tokens, capped at 2,000.
    """
    rng = np.random.default_rng(seed)
    doc_len = np.maximum(1, np.rint(_lognormal(rng, *doc_blocks, num_docs))).astype(int)
    starts = _DOC_ID_BASE + np.concatenate(([0], np.cumsum(doc_len)[:-1]))
    weights = 1.0 / np.arange(1, num_docs + 1) ** zipf
    picks = rng.choice(num_docs, size=n, p=weights / weights.sum())
    own = np.maximum(1, np.rint(_lognormal(rng, *own_blocks, n))).astype(int)
    partial = rng.integers(1, BLOCK, size=n)  # tokens missing from the last block
    outputs = np.clip(np.rint(_lognormal(rng, *output, n)), 1, 2000).astype(int)
    times = np.cumsum(rng.exponential(1000.0 / rate, size=n))
    rows: list[dict[str, object]] = []
    next_id = 0
    for i in range(n):
        d = picks[i]
        ids = [*range(int(starts[d]), int(starts[d] + doc_len[d])),
               *range(next_id, next_id + int(own[i]))]
        next_id += int(own[i])
        rows.append({"timestamp": round(float(times[i]), 3),
                     "input_length": len(ids) * BLOCK - int(partial[i]),
                     "output_length": int(outputs[i]), "hash_ids": ids})
    return rows


def ideal_hit_rate(rows: Sequence[dict[str, object]]) -> float:
    """Blocks an infinite cache would hold when they arrive, over all blocks.

    A hit run starts at the first block and stops at the first id no earlier row had: as in
    the Mooncake traces, an id names a block together with everything before it.
    """
    seen: set[int] = set()
    hit = total = 0
    for row in rows:
        ids = row["hash_ids"]
        assert isinstance(ids, list)
        total += len(ids)
        run = 0
        while run < len(ids) and ids[run] in seen:
            run += 1
        hit += run
        seen.update(ids)
    return hit / max(1, total)


def ideal_miss_rows(rows: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """The rows with what an infinite cache would hold when they arrive cut off.

    Each row loses its leading blocks that an earlier row had (`ideal_hit_rate`'s hit run),
    keeping at least one token, and its remaining blocks get fresh ids that no row shares:
    served without any cache, these rows cost the prefill work the best possible cache would
    leave. (Their shorter prompts also shorten the decodes' KV reads and footprints, which
    caching does not: goodput on them bounds a cache's gain from above.)
    """
    seen: set[int] = set()
    out: list[dict[str, object]] = []
    next_id = _IDEAL_ID_BASE
    for row in rows:
        ids = row["hash_ids"]
        length = row["input_length"]
        assert isinstance(ids, list) and isinstance(length, int)
        run = 0
        while run < len(ids) and ids[run] in seen:
            run += 1
        seen.update(ids)
        kept = len(ids) - run
        out.append({**row, "input_length": max(1, length - run * BLOCK),
                    "hash_ids": list(range(next_id, next_id + kept))})
        next_id += kept
    return out
