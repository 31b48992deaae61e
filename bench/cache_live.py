"""What the live `kv-events` index adds to one dispatch, against a run without cache awareness.

The live scheduler's `--cache-index kv-events` hashes each cache-aware request as vLLM hashes
it (`--prefix-caching-hash-algo`) and asks the events index; this benchmark times the whole
`Dispatcher.schedule()` (hashing, lookup, metrics, selection, local account) as the scheduler
runs it, wired by `make_live_cache` exactly as `SchedulerCore` wires it (no sockets: the index
is filled directly with the blocks an engine's events would carry):

- 16 neutral instances with equal, fresh statuses; a 32k-token prompt (32,768 random ids);
- `baseline`: `SchedulerSettings()` defaults (no cache awareness): the dispatch every non-cache
  run pays, unchanged by the wiring (it builds nothing);
- `miss`: cache-aware, nobody holds the prompt: hashing stops at the first block;
- `hit`: cache-aware, one instance holds the whole prompt (2,047 blocks of 16 tokens below the
  last token): every block is hashed and looked up, sha256 (vLLM's default) and sha256_cbor.

Each case: 30 timed calls after 3 warm-up calls, each followed by an untimed `release`; the
median and the best are printed in microseconds.

    .venv/bin/python bench/cache_live.py
"""

from __future__ import annotations

import random
import statistics
import time

import msgspec

from prescient.cache.kv_events import BlockStored
from prescient.config.scheduler import SchedulerSettings
from prescient.model import InstanceMetadata, InstanceStatus, Request
from prescient.policy import make_dispatcher
from prescient.policy.cache_aware import VllmHasher
from prescient.scheduler.cache_wiring import LiveKvEvents, make_live_cache

NUM_INSTANCES = 16
PROMPT_LEN = 32 * 1024
BS = 16


def run(settings: SchedulerSettings, holder_blocks: list[int] | None) -> tuple[float, float]:
    d = make_dispatcher("load-balance", settings, random.Random(0))
    live = make_live_cache(settings, d)
    ids = [f"i{k:02d}" for k in range(NUM_INSTANCES)]
    d.on_instances({i: InstanceMetadata(instance_id=i, block_size=BS) for i in ids}, 0.0)
    d.on_statuses({i: InstanceStatus(instance_id=i, timestamp_ms=1000, update_id=1,
                                     num_total_gpu_tokens=467_280) for i in ids}, 1.0)
    if isinstance(live, LiveKvEvents) and holder_blocks is not None:
        live.index.start_instance("i03")
        live.index.apply_events("i03", [BlockStored(block_hashes=tuple(holder_blocks),
                                                    block_size=BS)])
    rng = random.Random(1)
    prompt = tuple(rng.randrange(128_000) for _ in range(PROMPT_LEN))
    times = []
    for n in range(33):
        req = Request(request_id=f"r{n}", prompt_len=PROMPT_LEN, prompt_token_ids=prompt)
        t0 = time.perf_counter()
        placed = d.schedule(req, 1.0 + n * 1e-3)
        dt = time.perf_counter() - t0
        if holder_blocks:
            assert placed.instance_id == "i03"
        d.release(req.request_id, 1.0 + n * 1e-3)
        if n >= 3:
            times.append(dt)
    return statistics.median(times) * 1e6, min(times) * 1e6


def main() -> None:
    rng = random.Random(1)
    prompt = tuple(rng.randrange(128_000) for _ in range(PROMPT_LEN))
    base = SchedulerSettings()
    cache = msgspec.structs.replace(base, enable_cache_aware_scheduling=True,
                                    cache_index="kv-events", cache_aware_scheduling_min_tokens=0)
    print("| case | median us | best us |")
    print("|---|---|---|")
    rows = [("baseline (no cache awareness)", base, None)]
    for algo in ("sha256", "sha256_cbor"):
        s = msgspec.structs.replace(cache, prefix_caching_hash_algo=algo)
        held = VllmHasher(algo, "0").hashes(
            Request(request_id="h", prompt_len=PROMPT_LEN, prompt_token_ids=prompt), BS)
        rows += [(f"kv-events {algo}, missed everywhere", s, []),
                 (f"kv-events {algo}, 2,047 blocks held by one instance", s, held)]
    for name, settings, held in rows:
        median, best = run(settings, held)
        print(f"| {name} | {median:.0f} | {best:.0f} |")


if __name__ == "__main__":
    main()
