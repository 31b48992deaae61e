"""Rescheduling and failover in the simulator: load-driven migration on vs off; one crash of 8.

1. Load-driven migration. 8 x `llama3-8b-a100` engines with a small KV cache (`KV_BLOCKS`
   blocks of 16 tokens per instance, about what an A10 holds for a 7B model, the Llumnix
   paper's setting), a decode-heavy synthetic workload (Poisson; prompts log-normal mean 256,
   outputs log-normal mean 640: decodes grow and memory runs out), at `RATES` (the highest is
   past what the cluster sustains without preempting). Each dispatch policy runs with the
   rescheduler off and on. "on" is `--enable-rescheduling --rescheduling-policies neutral_load`
   (the default `decode_load` only acts between decode instances of a PD cluster), every
   500 ms, metric `kv_cache_usage_ratio_projected` at or over `--rescheduling-neutral-load-
   threshold` (`THRESHOLDS`), requests picked TOKEN/SR/1024 (the defaults), one migration in
   and out per instance at a time; KV copied at 25 GB/s with Llumnix's pre-copy stages.
   Reported per run: p99 and mean TTFT, p99 TPOT (per-request mean time per output token),
   preemptions, migrations and their downtime; then off/on ratios (Llumnix v0 reports up to
   12x p99 TTFT and ~15% p99 TBT over its baselines).
2. Failover. 8 x `llama3-8b-h100` on the bundled azure-conv trace at rate scale `FAIL_SCALE`
   (`load-balance` dispatch); instance inst-03 fails at `FAIL_AT_S`. Cases: no failure; a crash
   (engine and llumlet die; the CMS sees a stale status, then none) with the gateway replaying
   cut streams on other instances (prompt + tokens streamed so far, recomputed); the same crash
   without replay (what upstream Llumnix does: the streams are lost); a drain (the instance
   reports itself unschedulable and keeps serving) with the failover rescheduling policies
   moving its requests out; and, for scale, 7 instances from the start (what losing one costs
   in capacity alone). Reported: requests lost, replayed, migrated, and the p99 latencies
   against the run without a failure. Latencies count every request after the warm-up.

    .venv/bin/python bench/rescheduling.py            # the recorded numbers
    .venv/bin/python bench/rescheduling.py --quick    # smoke run: one rate, shorter runs

Independent runs go to a process pool (`--jobs`, default 2); results do not depend on it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass

import msgspec

from common import Inline, ms
from prescient.config.scheduler import SchedulerSettings
from prescient.model import Request
from prescient.sim.cluster import Failure, InstanceSpec, SimResult, SimSettings, simulate
from prescient.sim.metrics import Summary, summarize
from prescient.sim.traces import load_trace
from prescient.sim.workload import (
    LengthSpec,
    rebase,
    scale_rate,
    synthetic_workload,
    truncate,
)

NUM_INSTANCES = 8
LOAD_PRESET = "llama3-8b-a100"
KV_BLOCKS = 1200  # x 16 tokens = 19,200 tokens of KV per instance
PROMPT = LengthSpec.lognormal(mean=256, median=180, max=2048)
OUTPUT = LengthSpec.lognormal(mean=640, median=420, max=4096)
RATES = (14.0, 16.0, 18.0)  # requests/s, whole cluster: near, at and past saturation
QUICK_RATES = (16.0,)
NUM_REQUESTS = 3000
QUICK_REQUESTS = 800
DISPATCH = ("round-robin", "load-balance")
THRESHOLDS = (1.0, 0.7)  # --rescheduling-neutral-load-threshold
WARMUP_S = 20.0
COOLDOWN_S = 20.0

FAIL_PRESET = "llama3-8b-h100"
FAIL_SCALE = 20.0
FAIL_AT_S = 60.0
FAIL_DURATION_S = 180.0
QUICK_FAIL_DURATION_S = 100.0
FAILED = "inst-03"


@dataclass(frozen=True)
class Case:
    """One simulation: a label, the requests' source and the settings."""

    label: str
    dispatch: str
    rate: float = 0.0  # load runs
    threshold: float | None = None  # None: rescheduling off
    failure: str = ""  # failover runs: "", "crash", "crash-lost", "drain", "seven"


@dataclass(frozen=True)
class Outcome:
    case: Case
    summary: Summary
    num_migrated: int
    num_aborted: int
    downtime_p50: float | None
    downtime_p99: float | None
    num_lost: int
    num_replayed: int
    wall_s: float


def load_requests(rate: float, n: int) -> list[Request]:
    return synthetic_workload(rate=rate, num_requests=n, prompt=PROMPT, output=OUTPUT, seed=0)


def fail_requests(duration_s: float) -> list[Request]:
    return truncate(scale_rate(rebase(load_trace("azure-conv").requests), FAIL_SCALE),
                    duration=duration_s)


def settings_for(case: Case) -> SimSettings:
    scheduler = SchedulerSettings()
    if case.threshold is not None:
        scheduler = msgspec.structs.replace(
            scheduler, enable_rescheduling=True, rescheduling_policies=("neutral_load",),
            rescheduling_neutral_load_threshold=case.threshold)
    failures: tuple[Failure, ...] = ()
    if case.failure in ("crash", "crash-lost", "drain"):
        kind = "drain" if case.failure == "drain" else "crash"
        failures = (Failure(instance_id=FAILED, at_s=FAIL_AT_S, kind=kind),)
    if case.failure == "drain":
        scheduler = msgspec.structs.replace(
            scheduler, enable_rescheduling=True, rescheduling_policies=("neutral_failover",))
    return SimSettings(seed=0, scheduler=scheduler, failures=failures,
                       gateway_replay=case.failure != "crash-lost")


def instances(case: Case) -> list[InstanceSpec]:
    if case.failure or case.rate == 0.0:
        ids = [f"inst-{k:02d}" for k in range(NUM_INSTANCES)]
        if case.failure == "seven":
            ids.remove(FAILED)
        return [InstanceSpec(instance_id=iid, preset=FAIL_PRESET) for iid in ids]
    return [InstanceSpec(instance_id=f"inst-{k:02d}", preset=LOAD_PRESET,
                         num_gpu_blocks=KV_BLOCKS) for k in range(NUM_INSTANCES)]


def run(case: Case, requests: Sequence[Request]) -> Outcome:
    started = time.perf_counter()
    result: SimResult = simulate(requests, instances(case), case.dispatch, settings_for(case))
    wall = time.perf_counter() - started
    summary = summarize(case.label, result.records, warmup_s=WARMUP_S, cooldown_s=COOLDOWN_S)
    migrated = [m for m in result.migrations if m.outcome == "migrated"]
    downtimes = sorted(m.downtime for m in migrated if m.downtime is not None)
    return Outcome(
        case=case, summary=summary, num_migrated=len(migrated),
        num_aborted=len(result.migrations) - len(migrated),
        downtime_p50=statistics.median(downtimes) if downtimes else None,
        downtime_p99=downtimes[min(len(downtimes) - 1, int(0.99 * len(downtimes)))]
        if downtimes else None,
        num_lost=sum(r.rejected == "instance failed" for r in result.records),
        num_replayed=result.num_replayed, wall_s=wall)


def ratio(off: float | None, on: float | None) -> str:
    return "-" if not off or not on else f"{off / on:.2f}x"


def print_load(outcomes: Sequence[Outcome], rates: Sequence[float]) -> None:
    print("\n## Load-driven migration: rescheduling off vs on\n")
    print(f"{NUM_INSTANCES} x {LOAD_PRESET}, {KV_BLOCKS} KV blocks each; prompts log-normal "
          f"mean 256, outputs log-normal mean 640; seed 0; warm-up/cool-down {WARMUP_S:g} s\n")
    print("| rate | dispatch | rescheduling | TTFT p99 ms | TTFT mean ms | TPOT p99 ms | "
          "TPOT mean ms | preemptions | migrations (aborted) | downtime p50/p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        s, c = o.summary, o.case
        resched = "off" if c.threshold is None else f"on, threshold {c.threshold:g}"
        print(f"| {c.rate:g} | {c.dispatch} | {resched} | {ms(s.ttft.p99)} | {ms(s.ttft.mean)} | "
              f"{ms(s.tpot.p99)} | {ms(s.tpot.mean)} | {s.num_preemptions} | "
              f"{o.num_migrated} ({o.num_aborted}) | {ms(o.downtime_p50)}/{ms(o.downtime_p99)} |")
    print("\nOff / on (higher is better for rescheduling):\n")
    print("| rate | dispatch | threshold | TTFT p99 | TTFT mean | TPOT p99 | TPOT mean | "
          "preemptions off -> on |")
    print("|---|---|---|---|---|---|---|---|")
    by = {(o.case.rate, o.case.dispatch, o.case.threshold): o for o in outcomes}
    for rate in rates:
        for dispatch in DISPATCH:
            off = by[(rate, dispatch, None)].summary
            for threshold in THRESHOLDS:
                on = by[(rate, dispatch, threshold)].summary
                cells = [ratio(off.ttft.p99, on.ttft.p99), ratio(off.ttft.mean, on.ttft.mean),
                         ratio(off.tpot.p99, on.tpot.p99), ratio(off.tpot.mean, on.tpot.mean)]
                print(f"| {rate:g} | {dispatch} | {threshold:g} | {' | '.join(cells)} | "
                      f"{off.num_preemptions} -> {on.num_preemptions} |")


def print_failover(outcomes: Sequence[Outcome]) -> None:
    print("\n## Failover: one of 8 instances fails under load\n")
    print(f"{NUM_INSTANCES} x {FAIL_PRESET}, azure-conv x{FAIL_SCALE:g}, load-balance; "
          f"{FAILED} fails at {FAIL_AT_S:g} s\n")
    print("| case | requests | lost | replayed | migrated | TTFT p99 ms | E2E p99 ms | "
          "TPOT p99 ms | added TTFT p99 ms | added E2E p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = outcomes[0].summary
    for o in outcomes:
        s = o.summary
        added_ttft = (s.ttft.p99 or 0) - (base.ttft.p99 or 0)
        added_e2e = (s.e2e.p99 or 0) - (base.e2e.p99 or 0)
        print(f"| {o.case.label} | {s.num_requests} | {o.num_lost} | {o.num_replayed} | "
              f"{o.num_migrated} | {ms(s.ttft.p99)} | {ms(s.e2e.p99)} | {ms(s.tpot.p99)} | "
              f"{added_ttft * 1e3:+.0f} | {added_e2e * 1e3:+.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one rate, shorter runs")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--only", choices=("load", "failover"), help="run one part")
    args = parser.parse_args()
    started = time.perf_counter()
    rates = QUICK_RATES if args.quick else RATES
    n = QUICK_REQUESTS if args.quick else NUM_REQUESTS
    pool: Executor = Inline() if args.jobs == 1 else ProcessPoolExecutor(args.jobs)
    load_cases = [Case(f"{d} {t}", d, rate, t) for rate in rates for d in DISPATCH
                  for t in (None, *THRESHOLDS)]
    fail_cases = [Case("no failure", "load-balance"),
                  Case("crash, gateway replays", "load-balance", failure="crash"),
                  Case("crash, no replay (lost)", "load-balance", failure="crash-lost"),
                  Case("drain + failover migration", "load-balance", failure="drain"),
                  Case("reference: 7 instances throughout", "load-balance", failure="seven")]
    duration = QUICK_FAIL_DURATION_S if args.quick else FAIL_DURATION_S
    futures = []
    if args.only in (None, "load"):
        futures += [pool.submit(run, c, load_requests(c.rate, n)) for c in load_cases]
    if args.only in (None, "failover"):
        futures += [pool.submit(run, c, fail_requests(duration)) for c in fail_cases]
    outcomes = [f.result() for f in futures]
    if args.only in (None, "load"):
        print_load(outcomes[:len(load_cases)], rates)
    if args.only in (None, "failover"):
        print_failover(outcomes[-len(fail_cases):])
    sim_wall = sum(o.wall_s for o in outcomes)
    print(f"\n{len(outcomes)} runs, {sim_wall:.0f} s of simulation, "
          f"wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
