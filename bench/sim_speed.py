"""How fast the cluster simulator runs: simulated seconds per wall second, and what it costs.

Eight `llama3-8b-h100` instances (`SimSettings()` defaults, `InstanceSpec` defaults:
max_num_seqs 256, max_num_batched_tokens 8192) replay the bundled Azure conversation trace
(`azure-conv`, ~19.4k requests over ~3500 s, ~5.5 req/s):

1. Capacity. The highest rate scale at which round-robin keeps queueing bounded: the requests
   of the whole scaled trace (or of its first `--capacity-window` simulated seconds), less
   those arriving in the first 10 s, must see a mean queueing delay (arrival to first scheduled
   prefill chunk) below 0.5 s AND a TTFT p99 below 2 s. Found by bisection over the rate scale
   between 20 (comfortable) and 30 (overloaded); the capacity is the highest scale that passed.
2. Speed. (a) the full trace at its native rate, (b) the full trace compressed to 0.85 x
   capacity; policies round-robin and least-requests; each case 3 times (1 with --quick), runs
   interleaved, median reported. Wall time is `time.perf_counter` around `simulate` only.
3. Skip vs stepwise. The same workloads on engines built with `skip_decode_runs=False` (one
   engine step at a time, patched into `prescient.sim.cluster.build_engines` inside this script
   only), interleaved with the normal engines; reports the speed-up of skipping decode runs in
   closed form and asserts that every request's times agree within 1e-9 relative.
4. Memory. tracemalloc bytes per in-flight request: one engine holding N requests (prompt 1000,
   output 200) that are admitted and decoding, without and with `prefix_block_ids`.
5. Profile. pyinstrument on case (b), round-robin: top functions by own and cumulative time.

Run from the repository root:

    .venv/bin/python bench/sim_speed.py            # the recorded numbers (~45 s)
    .venv/bin/python bench/sim_speed.py --quick    # smoke run (~12 s)

It exits non-zero if the skip/stepwise results differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import platform
import statistics
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prescient.config.presets import get_preset
from prescient.engine import EngineConfig, SimEngine
from prescient.model import Request
from prescient.sim import cluster
from prescient.sim.cluster import InstanceSpec, SimResult, simulate
from prescient.sim.metrics import summarize
from prescient.sim.records import RequestRecord
from prescient.sim.traces import load_trace
from prescient.sim.workload import rebase, scale_rate, truncate

TRACE = "azure-conv"
PRESET = "llama3-8b-h100"
NUM_INSTANCES = 8
POLICIES = ("round-robin", "least-requests")
QUEUE_MEAN_LIMIT_S = 0.5
TTFT_P99_LIMIT_S = 2.0
LOAD_FRACTION = 0.85
GOAL_X = 100.0
REL_TOL = 1e-9


@dataclass(frozen=True)
class Mode:
    """Sizes of one benchmark run."""

    repeats: int
    window_s: float | None  # capacity probes: simulated seconds of arrivals (None: all)
    warmup_s: float  # capacity probes: arrivals before this are not measured
    bisect_steps: int
    stepwise_a_s: float  # window of case (a) compared against stepwise engines
    stepwise_b_s: float | None  # window of case (b) compared against stepwise (None: all)
    mem_requests: int
    profile_interval_s: float


DEFAULT = Mode(repeats=3, window_s=None, warmup_s=10.0, bisect_steps=7, stepwise_a_s=600.0,
               stepwise_b_s=None, mem_requests=10_000, profile_interval_s=0.0002)
QUICK = Mode(repeats=1, window_s=None, warmup_s=10.0, bisect_steps=4, stepwise_a_s=120.0,
             stepwise_b_s=60.0, mem_requests=2_000, profile_interval_s=0.0005)


def cluster_specs() -> list[InstanceSpec]:
    return [InstanceSpec(instance_id=f"inst-{i:02d}", preset=PRESET)
            for i in range(NUM_INSTANCES)]


@contextmanager
def stepwise_engines() -> Iterator[None]:
    """Within the block, `simulate` builds engines that never skip decode runs."""
    original = cluster.build_engines

    def build(instances: Sequence[InstanceSpec]) -> dict[str, SimEngine]:
        return {iid: SimEngine(iid, e.config, e.model, skip_decode_runs=False)
                for iid, e in original(instances).items()}

    cluster.build_engines = build
    try:
        yield
    finally:
        cluster.build_engines = original


def timed_simulate(
    requests: Sequence[Request], policy: str, *, stepwise: bool = False
) -> tuple[SimResult, float]:
    """One simulation and its wall time in seconds (perf_counter around `simulate` only)."""
    specs = cluster_specs()
    gc.collect()
    if stepwise:
        with stepwise_engines():
            t0 = time.perf_counter()
            result = simulate(requests, specs, policy)
            wall = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        result = simulate(requests, specs, policy)
        wall = time.perf_counter() - t0
    return result, wall


# ---- 1. capacity ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    scale: float
    num_requests: int
    queue_mean_s: float
    ttft_p99_s: float
    sim_s: float
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.queue_mean_s < QUEUE_MEAN_LIMIT_S and self.ttft_p99_s < TTFT_P99_LIMIT_S


def probe(base: Sequence[Request], scale: float, mode: Mode) -> Probe:
    requests = scale_rate(base, scale)
    if mode.window_s is not None:
        requests = truncate(requests, duration=mode.window_s)
    result, wall = timed_simulate(requests, "round-robin")
    s = summarize(result.policy, result.records, warmup_s=mode.warmup_s)
    if s.num_completed != s.num_requests:
        raise RuntimeError(f"scale {scale}: {s.num_requests - s.num_completed} not completed")
    assert s.queueing.mean is not None and s.ttft.p99 is not None
    return Probe(scale, len(requests), s.queueing.mean, s.ttft.p99, result.sim_time_s, wall)


def find_capacity(base: Sequence[Request], mode: Mode) -> tuple[float, list[Probe]]:
    """Bisection between a passing and a failing scale; returns the highest passing one."""
    lo, hi = probe(base, 20.0, mode), probe(base, 30.0, mode)
    probes = [lo, hi]
    if not lo.ok or hi.ok:
        raise RuntimeError(f"capacity not bracketed by [20, 30]: {lo}, {hi}")
    for _ in range(mode.bisect_steps):
        mid = probe(base, round((lo.scale + hi.scale) / 2, 4), mode)
        probes.append(mid)
        if mid.ok:
            lo = mid
        else:
            hi = mid
    return lo.scale, probes


# ---- 2. + 3. speed, skip vs stepwise --------------------------------------------------------


@dataclass
class Runs:
    """Repeated runs of one case."""

    label: str
    requests: Sequence[Request]
    policy: str
    stepwise: bool = False
    walls: list[float] = field(default_factory=list)
    result: SimResult | None = None

    def run_once(self) -> None:
        result, wall = timed_simulate(self.requests, self.policy, stepwise=self.stepwise)
        if self.result is not None:
            assert result.sim_time_s == self.result.sim_time_s, "nondeterministic run"
        self.result = result
        self.walls.append(wall)

    @property
    def wall(self) -> float:
        assert self.walls
        return statistics.median(self.walls)

    @property
    def sim_per_wall(self) -> float:
        assert self.result is not None
        return self.result.sim_time_s / self.wall


def run_interleaved(cases: Sequence[Runs], repeats: int) -> None:
    """Repeat every case, interleaving them so that machine noise hits all alike."""
    for _ in range(repeats):
        for case in cases:
            case.run_once()


def max_rel_diff(a: Sequence[RequestRecord], b: Sequence[RequestRecord]) -> float:
    """Largest relative difference of per-request times; raises if anything else differs."""
    worst = 0.0
    if len(a) != len(b):
        raise AssertionError(f"{len(a)} vs {len(b)} records")
    for x, y in zip(a, b, strict=True):
        if (x.request_id, x.instance_id, x.rejected) != (y.request_id, y.instance_id, y.rejected):
            raise AssertionError(f"records differ: {x} vs {y}")
        for name in ("first_scheduled_time", "first_token_time", "finish_time"):
            u, v = getattr(x, name), getattr(y, name)
            if u is None or v is None:
                if u is not v:
                    raise AssertionError(f"{x.request_id}.{name}: {u} vs {v}")
                continue
            worst = max(worst, abs(u - v) / max(abs(u), abs(v), 1e-300))
    return worst


def print_speed_table(cases: Sequence[Runs]) -> None:
    print(f"{'case':<34}{'requests':>9}{'sim s':>9}{'wall s':>9}{'sim/wall':>10}"
          f"{'steps':>10}{'steps/s':>10}{'req/s':>9}  wall runs")
    for c in cases:
        assert c.result is not None
        runs = " ".join(f"{w:.3f}" for w in c.walls)
        print(f"{c.label:<34}{len(c.requests):>9}{c.result.sim_time_s:>9.1f}{c.wall:>9.3f}"
              f"{c.sim_per_wall:>9.0f}x{c.result.num_steps:>10}"
              f"{c.result.num_steps / c.wall:>10.0f}{len(c.requests) / c.wall:>9.0f}  {runs}")


def compare_skip(pairs: Sequence[tuple[Runs, Runs]]) -> bool:
    """Print skip/stepwise ratios and result equality; False if any result differs."""
    ok = True
    print(f"{'window':<34}{'steps':>10}{'skip s':>9}{'step s':>9}{'speed-up':>10}"
          f"{'max rel diff':>14}")
    for skip, step in pairs:
        assert skip.result is not None and step.result is not None
        diff = max_rel_diff(skip.result.records, step.result.records)
        same_steps = skip.result.num_steps == step.result.num_steps
        ok = ok and diff <= REL_TOL and same_steps
        verdict = "" if diff <= REL_TOL and same_steps else "  MISMATCH"
        print(f"{skip.label:<34}{skip.result.num_steps:>10}{skip.wall:>9.3f}{step.wall:>9.3f}"
              f"{step.wall / skip.wall:>9.1f}x{diff:>14.1e}{verdict}")
    return ok


# ---- 4. memory ----------------------------------------------------------------------------


def memory_per_request(n: int, with_prefix_ids: bool) -> tuple[float, float, int]:
    """(bytes per Request object, engine bytes per in-flight request, requests decoding)."""
    preset = get_preset(PRESET)
    config = EngineConfig(num_gpu_blocks=4 * n * 100, block_size=preset.block_size,
                          max_num_seqs=n + 1, max_num_batched_tokens=1000 * n)
    engine = SimEngine("mem", config, preset.step_model)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        requests = [
            Request(request_id=f"req-{i:06d}", prompt_len=1000, output_len=200,
                    prefix_block_ids=tuple(range(4 * i, 4 * i + 4)) if with_prefix_ids else ())
            for i in range(n)
        ]
        gc.collect()
        created = tracemalloc.get_traced_memory()[0]
        for req in requests:
            engine.add_request(req, 0.0)
        end = engine.start_step(0.0)  # one step prefills every prompt
        assert end is not None
        engine.complete_step()
        engine.start_step(end)  # a run of decode steps, cut to one
        engine.interrupt(end)
        outcome = engine.complete_step()
        assert not outcome.finished and len(engine._running) == n, "not all in flight"
        del outcome
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (created - before) / n, (after - created) / n, len(engine._running)


# ---- 5. profile ---------------------------------------------------------------------------


def profile(fn: Callable[[], Any], interval: float, top: int, top_cum: int) -> None:
    """Run `fn` under pyinstrument; print the top functions by own and cumulative time."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("pyinstrument is not installed: profile skipped")
        return
    profiler = Profiler(interval=interval)
    profiler.start()
    fn()
    profiler.stop()
    session = profiler.last_session
    assert session is not None
    root = session.root_frame()
    assert root is not None
    own: dict[str, float] = defaultdict(float)
    cum: dict[str, float] = defaultdict(float)

    def walk(frame: Any, stack: frozenset[str]) -> None:
        key = f"{frame.function} ({frame.file_path_short}:{frame.line_no})"
        if not frame.is_synthetic:
            own[key] += frame.total_self_time
            if key not in stack:  # recursion counted once
                cum[key] += frame.time
        for child in frame.children:
            walk(child, stack | {key})

    walk(root, frozenset())
    total = cum.get(next(k for k in cum if k.startswith("simulate ")), root.time)
    print(f"samples: {session.sample_count}, profiled wall {session.duration:.2f} s "
          f"(interval {interval * 1e3:.1f} ms); percentages of simulate()")
    print("own time:")
    for key, t in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * t / total:5.1f}%  {key}")
    print("cumulative (below simulate/EventLoop.run):")
    skip = ("simulate ", "run (prescient/sim/", "<module>", "main (", "profile (", "<lambda>")
    ranked = [(k, t) for k, t in cum.items() if not k.startswith(skip) and "sim_speed" not in k]
    for key, t in sorted(ranked, key=lambda kv: -kv[1])[:top_cum]:
        print(f"  {100 * t / total:5.1f}%  {key}")


# ---- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, < 60 s")
    parser.add_argument("--no-profile", action="store_true", help="skip the pyinstrument run")
    parser.add_argument("--capacity-window", type=float, metavar="SECONDS",
                        help="capacity probes simulate only arrivals in the first SECONDS "
                        "after scaling (default: the whole trace)")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else DEFAULT
    if args.capacity_window is not None:
        mode = dataclasses.replace(mode, window_s=args.capacity_window)
    t_start = time.perf_counter()
    print(f"Python {platform.python_version()} on {platform.machine()}, "
          f"{'quick' if args.quick else 'default'} mode; {NUM_INSTANCES} x {PRESET}, {TRACE}")

    base = rebase(load_trace(TRACE).requests)
    span = max(r.arrival_time for r in base)
    print(f"trace: {len(base)} requests over {span:.0f} s = {len(base) / span:.2f} req/s native")

    window = "whole trace" if mode.window_s is None else f"first {mode.window_s:.0f} s"
    print(f"\n== capacity (round-robin; {window} after scaling, first {mode.warmup_s:.0f} s of "
          f"arrivals unmeasured; ok = mean queueing < {QUEUE_MEAN_LIMIT_S} s and TTFT p99 < "
          f"{TTFT_P99_LIMIT_S} s)")
    capacity, probes = find_capacity(base, mode)
    for p in sorted(probes, key=lambda p: p.scale):
        print(f"  scale {p.scale:8.4f} ({p.num_requests:5d} req): queue mean "
              f"{p.queue_mean_s:6.3f} s, TTFT p99 {p.ttft_p99_s:6.3f} s  "
              f"{'ok' if p.ok else 'overloaded':<10}  ({p.sim_s:.0f} sim s in {p.wall_s:.2f} s)")
    load_scale = LOAD_FRACTION * capacity
    print(f"capacity = rate scale {capacity:.4f} = {capacity * len(base) / span:.1f} req/s; "
          f"(b) uses {LOAD_FRACTION} x capacity = scale {load_scale:.4f} = "
          f"{load_scale * len(base) / span:.1f} req/s")

    native = base
    loaded = scale_rate(base, load_scale)
    speed = [Runs(f"(a) native, {pol}", native, pol) for pol in POLICIES]
    speed += [Runs(f"(b) {LOAD_FRACTION:.0%} cap., {pol}", loaded, pol) for pol in POLICIES]
    win_a = truncate(native, duration=mode.stepwise_a_s)
    win_b = loaded if mode.stepwise_b_s is None else truncate(loaded, duration=mode.stepwise_b_s)
    b_name = "all" if mode.stepwise_b_s is None else f"first {mode.stepwise_b_s:.0f} s"
    pairs = [
        (Runs(f"(a) first {mode.stepwise_a_s:.0f} s, round-robin", win_a, "round-robin"),
         Runs("(a) stepwise", win_a, "round-robin", stepwise=True)),
        (Runs(f"(b) {b_name}, round-robin", win_b, "round-robin"),
         Runs("(b) stepwise", win_b, "round-robin", stepwise=True)),
        (Runs(f"(b) {b_name}, least-requests", win_b, "least-requests"),
         Runs("(b) stepwise", win_b, "least-requests", stepwise=True)),
    ]
    print(f"\n== speed (median of {mode.repeats} interleaved runs; wall = simulate() only)")
    run_interleaved(speed, mode.repeats)
    print_speed_table(speed)
    worst = min(c.sim_per_wall for c in speed)
    print(f"goal >= {GOAL_X:.0f}x real time: {'MET' if worst >= GOAL_X else 'NOT MET'} "
          f"(slowest case {worst:.0f}x)")

    print(f"\n== skip decode runs in closed form vs step one at a time "
          f"(median of {mode.repeats} interleaved runs)")
    run_interleaved([c for pair in pairs for c in pair], mode.repeats)
    same = compare_skip(pairs)
    print(f"per-request times equal within {REL_TOL:g} relative: {'yes' if same else 'NO'}")

    print(f"\n== memory per in-flight request (tracemalloc; one engine, {mode.mem_requests} "
          "requests, prompt 1000, output 200, all admitted and decoding)")
    for with_ids in (False, True):
        req_b, eng_b, n_live = memory_per_request(mode.mem_requests, with_ids)
        what = "4 prefix_block_ids (512 tok)" if with_ids else "no prefix ids"
        print(f"  {what:<30}: engine {eng_b:7.0f} B/request, Request object {req_b:5.0f} B "
              f"({n_live} in flight)")

    if not args.no_profile:
        print("\n== pyinstrument profile of (b), round-robin")
        profile(lambda: simulate(loaded, cluster_specs(), "round-robin"),
                mode.profile_interval_s, top=8, top_cum=14)

    print(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s")
    if not same or not math.isfinite(worst):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
