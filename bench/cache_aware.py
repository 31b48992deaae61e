"""Cache-aware scheduling in the simulator: Prescient's backends against the peers' routers.

Sixteen `llama3-8b-h100` instances (`InstanceSpec` defaults: prefix caching on, 16-token
blocks, 29,205 blocks each) serve two prefix-heavy workloads:

- `sessions`: multi-turn chats (`session_workload`): turns per session uniform 2-12, first
  prompt lognormal (median 2,000, mean 3,000 tokens), each turn adds uniform 100-1,000 user
  tokens to the previous prompt + output, output lognormal (median 200, mean 250), think time
  30 s (mean). No prefix is shared across sessions.
- `mooncake`: a Mooncake-format trace (JSON lines with `hash_ids` of 512-token blocks, loaded
  by `load_mooncake_jsonl`), generated because the real trace is not bundled
  (`prescient.sim.mooncake_synth`, shaped by the Mooncake paper's published statistics:
  mean input ~7.6k tokens, mean output 182, ~50% of prompt blocks reusable with an infinite
  cache): 1,000 shared documents / system prompts (lognormal, mean 9.5 blocks, Zipf(1.1)
  popularity), each request one document followed by lognormal (mean 7) blocks of its own,
  the last one partial; Poisson arrivals at 10/s.
- `mooncake-ideal` (not run by default): the same rows less what an infinite cache would hold
  when each arrives (`ideal_miss_rows`), all private. No cache, and no routing, can leave less
  prefill work, so the best goodput here over round-robin's on `mooncake` bounds what caching
  can gain there (from above: the shorter prompts also lighten the decodes' KV reads).
- `--workload-seed N` draws a second workload of each shape (robustness of the ranking).

Policies: Prescient `load-balance` with `--enable-cache-aware-scheduling` and each index backend
(`approximate`: router history, TTL 120 s; `kv-events`: the engines' block events, exact;
`mooncake`: the simulated metadata service, 256-token chunks),
plain `load-balance`, `round-robin`, and the peers' cache-aware routers (`policy/cache_peers.py`:
SGLang `cache_aware` and `lmetric`, llm-d's default profile, Dynamo's KV cost with its
approximate indexer and with KV events, production-stack `prefixaware`). Every policy sees the
identical request list and the same defaults otherwise (`SimSettings(seed=0)`: llumlet push 40
ms, CMS poll 500 ms, peers scrape 50 ms). `mooncake` is the simulated Mooncake metadata
service (`cache/sim.py`, `--kvs-chunk-size` 256, no outage; the client against a real HTTP
server is tested in tests/live/test_kv_index_mooncake.py and test_cache_live.py).

Measured (requests arriving after the first 5% and before the last 5% of the arrival span):
1. Goodput: the highest rate scale at which >= 90% of requests meet TTFT <= 2 s and TPOT <=
   100 ms; doubling from scale 1 then bisection (`--steps`).
2. At high load (load-balance's goodput scale, where a cache-blind scheduler saturates):
   prefix hit rate (cached prompt tokens / prompt tokens), p50 / p99 TTFT, SLO attainment.
3. Ratios: Prescient's best goodput over round-robin's and over the best peer's; its p99 TTFT
   over the best peer's.
4. Index cost: `hit_lengths` for a 32k-token prompt fully held by one of 16 instances (2,048
   blocks of 16) in a KV-events index of 1M blocks, and bytes per indexed block (tracemalloc);
   hashing the prompt (vLLM `sha256_cbor`, the simulated engine's chain) is timed apart.

    .venv/bin/python bench/cache_aware.py --quick    # smoke run: smaller workloads, 3 steps
    .venv/bin/python bench/cache_aware.py            # the recorded numbers
    .venv/bin/python bench/cache_aware.py --workload-seed 1 --workloads sessions \
        --skip-index-cost                            # a second sessions workload
    .venv/bin/python bench/cache_aware.py --workloads mooncake-ideal \
        --variants round-robin --skip-index-cost     # the bound on caching's gain
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from common import Inline, ms, pct, verdict
from prescient.cache.hashing import sim_block_hashes, vllm_block_hashes
from prescient.cache.kv_events import KvEventsIndex
from prescient.cache.sim import use_kv_events, use_mooncake
from prescient.config.scheduler import SchedulerSettings
from prescient.model import Request
from prescient.sim.cluster import ClusterSim, InstanceSpec, SimSettings
from prescient.sim.metrics import SloSpec, Summary, summarize
from prescient.sim.mooncake_synth import ideal_miss_rows, mooncake_rows
from prescient.sim.traces import load_mooncake_jsonl
from prescient.sim.workload import parse_length_spec, rebase, scale_rate, session_workload

PRESET = "llama3-8b-h100"
NUM_INSTANCES = 16
TRIM = 0.05  # warm-up and cool-down, each a fraction of the arrival span
SLO = SloSpec(ttft_s=2.0, tpot_s=0.1)
ATTAINMENT = 0.9
LB, RR = "load-balance", "round-robin"
CACHE = {"enable_cache_aware_scheduling": True}


@dataclass(frozen=True)
class Variant:
    label: str
    policy: str
    settings: tuple[tuple[str, object], ...] = ()
    kv_events: bool = False
    mooncake: bool = False
    prescient: bool = False
    peer: bool = False


VARIANTS = (
    Variant("prescient cache-aware (approximate)", LB, tuple(CACHE.items()), prescient=True),
    Variant("prescient cache-aware (kv-events)", LB, tuple(CACHE.items()), kv_events=True,
            prescient=True),
    Variant("prescient cache-aware (mooncake)", LB, tuple(CACHE.items()), mooncake=True,
            prescient=True),
    Variant(LB, LB),
    Variant(RR, RR),
    Variant("sglang-cache-aware", "sglang-cache-aware", peer=True),
    Variant("sglang-lmetric", "sglang-lmetric", peer=True),
    Variant("llm-d-prefix", "llm-d-prefix", peer=True),
    Variant("dynamo-kv (approximate)", "dynamo-kv", peer=True),
    Variant("dynamo-kv (kv-events)", "dynamo-kv", kv_events=True, peer=True),
    Variant("production-stack-prefixaware", "production-stack-prefixaware", peer=True),
)
BY_LABEL = {v.label: v for v in VARIANTS}


@dataclass(frozen=True)
class Mode:
    steps: int
    sessions: int  # sessions in the session workload
    mooncake: int  # requests in the Mooncake-format workload
    seed: int = 0  # the workload generators' seed


DEFAULT = Mode(steps=4, sessions=1500, mooncake=6000)
QUICK = Mode(steps=3, sessions=800, mooncake=3000)


# ---- workloads -------------------------------------------------------------------------

@functools.cache
def sessions(n: int, seed: int = 0) -> tuple[Request, ...]:
    return tuple(rebase(session_workload(
        num_sessions=n, turns=parse_length_spec("uniform:2:12"), session_rate=n / 120,
        think_time=30.0, first_prompt=parse_length_spec("lognormal:mean=3000,median=2000"),
        turn_prompt=parse_length_spec("uniform:100:1000"),
        output=parse_length_spec("lognormal:mean=250,median=200,max=2000"), seed=seed)))


@functools.cache
def mooncake(n: int, seed: int = 0, ideal: bool = False) -> tuple[Request, ...]:
    rows = mooncake_rows(n, seed=seed)
    if ideal:
        rows = ideal_miss_rows(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mooncake.jsonl"
        path.write_bytes(b"\n".join(msgspec.json.encode(r) for r in rows))
        return tuple(rebase(load_mooncake_jsonl(path).requests))


WORKLOADS = ("sessions", "mooncake", "mooncake-ideal")


def workload(name: str, mode: Mode) -> Sequence[Request]:
    """`mooncake-ideal`: the Mooncake-format rows without what an infinite cache would hold
    (`ideal_miss_rows`): any routing there computes no more than the best cache could let it."""
    if name == "sessions":
        return sessions(mode.sessions, mode.seed)
    return mooncake(mode.mooncake, mode.seed, ideal=name == "mooncake-ideal")


# ---- one simulation (in a worker process) ------------------------------------------------

@dataclass(frozen=True)
class Run:
    label: str
    workload: str
    scale: float
    summary: Summary
    hit_rate: float
    wall_s: float

    @property
    def ok(self) -> bool:
        att = self.summary.slo_attainment
        return att is not None and att >= ATTAINMENT


def specs() -> list[InstanceSpec]:
    return [InstanceSpec(instance_id=f"inst-{i:02d}", preset=PRESET)
            for i in range(NUM_INSTANCES)]


def run(label: str, name: str, mode: Mode, scale: float) -> Run:
    v = BY_LABEL[label]
    scheduler = msgspec.structs.replace(SchedulerSettings(), **dict(v.settings))
    requests = scale_rate(list(workload(name, mode)), scale)
    t0 = time.perf_counter()
    sim = ClusterSim(requests, specs(), v.policy, SimSettings(seed=0, scheduler=scheduler))
    if v.kv_events:
        use_kv_events(sim)
    if v.mooncake:
        use_mooncake(sim)
    result = sim.run()
    wall = time.perf_counter() - t0
    trim = TRIM * requests[-1].arrival_time
    summary = summarize(label, result.records, slo=SLO, warmup_s=trim, cooldown_s=trim)
    done = [r for r in result.records if r.first_token_time is not None]
    hit = sum(r.num_cached_tokens for r in done) / max(1, sum(r.prompt_len for r in done))
    return Run(label, name, scale, summary, hit, wall)


def goodput(label: str, name: str, mode: Mode) -> tuple[float, list[Run]]:
    """Highest passing scale: double / halve from 1 to a bracket, then bisect."""
    runs = [run(label, name, mode, 1.0)]
    if runs[0].ok:
        while runs[-1].ok and runs[-1].scale < 256:
            runs.append(run(label, name, mode, runs[-1].scale * 2))
        best, worst = runs[-2], runs[-1]
    else:
        while not runs[-1].ok and runs[-1].scale > 1 / 256:
            runs.append(run(label, name, mode, runs[-1].scale / 2))
        best, worst = runs[-1], runs[-2]
    if not best.ok:
        return 0.0, runs
    for _ in range(mode.steps):
        mid = run(label, name, mode, round((best.scale + worst.scale) / 2, 4))
        runs.append(mid)
        best, worst = (mid, worst) if mid.ok else (best, mid)
    return best.scale, runs


# ---- index cost ----------------------------------------------------------------------------

def index_cost() -> list[str]:
    rng = np.random.default_rng(0)
    index = KvEventsIndex(max_blocks=2_000_000)
    prompt = rng.integers(0, 128_000, size=32 * 1024).tolist()
    hashes = [int(h) for h in rng.integers(0, 2**63, size=2048)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for k in range(NUM_INSTANCES):  # 16 x 62,500 blocks of others' prefixes, 1M in all
        others = rng.integers(0, 2**63, size=62_500).tolist()
        index.blocks.store(f"inst-{k:02d}", others)
    per_block = (tracemalloc.get_traced_memory()[0] - before) / len(index.blocks)
    tracemalloc.stop()
    index.blocks.store("inst-03", hashes)  # one instance holds the whole prompt
    index.blocks.store("inst-07", hashes[:1000])
    assert index.hit_lengths(hashes) == {"inst-03": 2048, "inst-07": 1000}
    lookup = best_of(lambda: index.hit_lengths(hashes))
    miss = best_of(lambda: index.hit_lengths([2**63 + 1, *hashes]))
    vllm = best_of(lambda: vllm_block_hashes(prompt, 16), repeat=5)
    req = Request(request_id="x", prompt_len=len(prompt), prompt_token_ids=tuple(prompt))
    sim = best_of(lambda: sim_block_hashes(req, 16, 2047), repeat=5)
    return [
        "| measure | value |", "|---|---|",
        f"| lookup, 32k-token prompt (2,048 blocks) fully held, 1M-block index | "
        f"{lookup * 1e6:.0f} us |",
        f"| lookup, first block missed everywhere | {miss * 1e6:.1f} us |",
        f"| bytes per indexed block (int hash key, holder bitmask, LRU order) | "
        f"{per_block:.0f} B |",
        f"| hashing the prompt, vLLM sha256_cbor (2,048 blocks) | {vllm * 1e3:.2f} ms |",
        f"| hashing the prompt, simulated engine's chain | {sim * 1e3:.2f} ms |",
    ]


def best_of(fn: Callable[[], object], repeat: int = 50) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---- report --------------------------------------------------------------------------------

def table(name: str, goodputs: dict[str, float], at_load: dict[str, Run], scale: float,
          variants: Sequence[Variant] = VARIANTS) -> list[str]:
    lines = [f"### {name}: goodput, and the high-load point (scale {scale:g})", "",
             "| policy | goodput (rate scale) | prefix hit rate | p50 TTFT (ms) | p99 TTFT (ms) "
             "| SLO attainment |", "|---|---|---|---|---|---|"]
    for v in variants:
        r = at_load[v.label]
        s = r.summary
        lines.append(f"| {v.label} | {goodputs[v.label]:.3f} | {pct(r.hit_rate)} | "
                     f"{ms(s.ttft.p50)} | {ms(s.ttft.p99)} | {pct(s.slo_attainment)} |")
    if variants is not VARIANTS:  # a subset: no comparison with every peer
        return [*lines, ""]
    best = max((v for v in VARIANTS if v.prescient), key=lambda v: goodputs[v.label])
    peer = max((v for v in VARIANTS if v.peer), key=lambda v: goodputs[v.label])
    best_p99 = min((v for v in VARIANTS if v.peer),
                   key=lambda v: at_load[v.label].summary.ttft.p99 or float("inf"))
    gp, rr, pg = goodputs[best.label], goodputs[RR], goodputs[peer.label]
    p99 = at_load[best.label].summary.ttft.p99 or float("inf")
    p99_peer = at_load[best_p99.label].summary.ttft.p99 or float("inf")
    lines += ["",
              f"- Prescient's best: {best.label}, goodput {gp:.3f}; "
              f"x{gp / rr if rr else float('inf'):.2f} round-robin ({rr:.3f}), "
              f"x{gp / pg if pg else float('inf'):.2f} the best peer ({peer.label}, {pg:.3f}).",
              f"- p99 TTFT at high load: {ms(p99)} ms vs the best peer's {ms(p99_peer)} ms "
              f"({best_p99.label}): ratio {p99 / p99_peer:.2f}.",
              f"- Goals: highest goodput of all: {verdict(gp >= max(goodputs.values()))}; "
              f">= 2x round-robin: {verdict(bool(rr) and gp >= 2 * rr)}; p99 TTFT no worse "
              f"than the best peer's: {verdict(p99 <= p99_peer)}.", ""]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads, fewer steps")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--workloads", default="sessions,mooncake")
    parser.add_argument("--steps", type=int, default=None, help="bisection steps")
    parser.add_argument("--skip-index-cost", action="store_true",
                        help="leave out the index cost measurement")
    parser.add_argument("--workload-seed", type=int, default=0,
                        help="the workload generators' seed (a second workload of the same shape)")
    parser.add_argument("--variants", default="", help="only these policies (labels, comma-"
                        "separated; load-balance always runs: it sets the high-load point)")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else DEFAULT
    mode = Mode(mode.steps if args.steps is None else args.steps, mode.sessions, mode.mooncake,
                args.workload_seed)
    names = args.workloads.split(",")
    if unknown_workloads := set(names) - set(WORKLOADS):
        parser.error(f"--workloads: unknown {sorted(unknown_workloads)}; known: {WORKLOADS}")
    t0 = time.perf_counter()
    print(f"# Cache-aware scheduling ({'quick' if args.quick else 'full'}, workload seed "
          f"{mode.seed}; {platform.python_version()}, {platform.machine()})\n")
    if not args.skip_index_cost:
        print("## Index cost\n")
        print("\n".join(index_cost()) + "\n", flush=True)
    variants = VARIANTS
    if args.variants:
        wanted = {label.strip() for label in args.variants.split(",")} | {LB}
        unknown = wanted - set(BY_LABEL)
        if unknown:
            parser.error(f"--variants: unknown {sorted(unknown)}; known: {sorted(BY_LABEL)}")
        variants = tuple(v for v in VARIANTS if v.label in wanted)
    pool: Executor = Inline() if args.jobs == 1 else ProcessPoolExecutor(args.jobs)
    with pool:
        for name in names:
            reqs = workload(name, mode)
            print(f"## {name}: {len(reqs)} requests over {reqs[-1].arrival_time:.0f} s at "
                  f"scale 1\n", flush=True)
            futures = {v.label: pool.submit(goodput, v.label, name, mode) for v in variants}
            goodputs = {label: f.result()[0] for label, f in futures.items()}
            scale = goodputs[LB] or 1.0
            at_load = {v.label: pool.submit(run, v.label, name, mode, scale) for v in variants}
            print("\n".join(table(name, goodputs, {k: f.result() for k, f in at_load.items()},
                                  scale, variants)), flush=True)
    print(f"_wall time {time.perf_counter() - t0:.0f} s_")
    return 0


if __name__ == "__main__":
    sys.exit(main())
