"""Scheduling quality in the simulator: every dispatch policy on the same cluster and trace.

Sixteen `llama3-8b-h100` instances (`InstanceSpec` defaults: max_num_seqs 256,
max_num_batched_tokens 8192, prefix caching on) replay the bundled Azure conversation trace
(`azure-conv`, 19,366 requests, the whole trace at every rate scale: `scale_rate(rebase(trace),
s)`), with `SimSettings(seed=...)` defaults otherwise: llumlet push every 40 ms, CMS status poll
every 500 ms (`SchedulerSettings.cms_pull_status_interval_ms` default), peer routers scraping
engine metrics every 50 ms. Only requests arriving after the first 10 s and before the last 10 s
of arrivals are measured (`summarize(..., warmup_s=10, cooldown_s=10)`).

1. Capacity: the highest rate scale at which the ORACLE policy (true engine state at dispatch,
   least outstanding work) keeps the mean queueing delay (arrival to first scheduled prefill
   chunk) below 0.5 s AND the TTFT p99 below 2 s; i.e. what the cluster can serve with ideal
   dispatch. Bisection (7 steps) between scale 40 (must pass) and 60 (must fail); the highest
   passing scale is the capacity. Round-robin's capacity by the same rule is reported too.
2. Table at 0.9 x capacity, seed 0: p50/p99/mean TTFT, p99 TPOT, SLO attainment (TTFT <= 1000
   ms and TPOT <= 50 ms) for round-robin, random, least-requests, power-of-two, load-balance
   (full mode, `SchedulerSettings()` defaults), llm-d, aibrix-least-request,
   aibrix-least-kv-cache, sglang-power-of-two and oracle, plus load-balance variants (clearly
   labelled, settings changed with `msgspec.structs.replace`). The same table for seeds 1 and 2
   (the seed drives the policies' random choices and the llumlets' push phases; the trace is
   fixed).
3. Goodput, `prescient.sim.experiment.goodput` semantics: the highest rate scale at which at
   least 90% of the measured requests meet the SLO. Per policy: check 0.6 x capacity passes
   (halving until it does) and capacity fails (raising by 0.2 x capacity until it does), then
   7 bisection steps (seed 0). Also, for the policies (not the variants), a TTFT-only goodput:
   the same with TTFT <= 1000 ms alone, bracket 0.8-1.2 x capacity.
4. Goals (issue "Full-mode and lite-mode scheduling core"): full-mode load-balance has the best
   p99 TTFT and the best goodput of all non-oracle policies, its p99 TTFT is at least 5x better
   than round-robin's and within 20% of the oracle's (load-balance p99 <= 1.2 x oracle p99).
5. Plots: `prescient.sim.report.write_results` for round-robin, least-requests, llm-d,
   load-balance and oracle at 0.9 x capacity (seed 0) into a temporary directory;
   `ttft_cdf.png` and `load_timeline.png` are copied to `--figures` (default bench/figures).

Independent runs go to a process pool (`--jobs`, default 2); results do not depend on it.
Run from the repository root:

    .venv/bin/python bench/sched_quality.py              # the recorded numbers (~4 min)
    .venv/bin/python bench/sched_quality.py --quick      # smoke run (~2 min): fewer steps, seed 0

Markdown tables are printed as they go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from common import Inline, ms, pct, verdict
from prescient.config.scheduler import SchedulerSettings
from prescient.model import Request
from prescient.sim.cluster import InstanceSpec, SimResult, SimSettings, simulate
from prescient.sim.metrics import SloSpec, Summary, summarize
from prescient.sim.report import write_results
from prescient.sim.traces import load_trace
from prescient.sim.workload import rebase, scale_rate

TRACE = "azure-conv"
PRESET = "llama3-8b-h100"
NUM_INSTANCES = 16
WARMUP_S = COOLDOWN_S = 10.0
QUEUE_MEAN_LIMIT_S = 0.5
TTFT_P99_LIMIT_S = 2.0
CAPACITY_BRACKET = (40.0, 60.0)
LOAD_FRACTION = 0.9
SLO = SloSpec(ttft_s=1.0, tpot_s=0.05)
TTFT_SLO = SloSpec(ttft_s=1.0)  # secondary goodput: the part of the SLO dispatch controls
GOODPUT_ATTAINMENT = 0.9  # as prescient.sim.experiment.GOODPUT_ATTAINMENT
GOODPUT_BRACKETS = {"slo": (0.6, 1.0), "ttft": (0.8, 1.2)}  # x capacity
RR_FACTOR_GOAL = 5.0
ORACLE_GAP_GOAL = 1.2
LB = "load-balance"
POLICIES = ("round-robin", "random", "least-requests", "power-of-two", LB, "llm-d",
            "aibrix-least-request", "aibrix-least-kv-cache", "sglang-power-of-two", "oracle")
# label -> (policy, SchedulerSettings changes); variants of load-balance, not the defaults
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "variant: load-balance, metric num_waiting_requests": (
        LB, {"dispatch_neutral_load_metric": "num_waiting_requests"}),
    "variant: load-balance, dispatch_top_k 2": (LB, {"dispatch_top_k": 2}),
    "variant: load-balance, CMS poll 50 ms": (LB, {"cms_pull_status_interval_ms": 50}),
    "variant: load-balance, local account off": (
        LB, {"enable_instance_status_local_account": False}),
}
PLOTTED = ("round-robin", "least-requests", "llm-d", LB, "oracle")
FIGURES = ("ttft_cdf.png", "load_timeline.png")


@dataclass(frozen=True)
class Mode:
    capacity_steps: int
    goodput_steps: int
    seeds: tuple[int, ...]


DEFAULT = Mode(capacity_steps=7, goodput_steps=7, seeds=(0, 1, 2))
QUICK = Mode(capacity_steps=3, goodput_steps=3, seeds=(0,))


# ---- one simulation (runs in a worker process) -------------------------------------------

_BASE: list[Request] | None = None


def base_trace() -> list[Request]:
    global _BASE
    if _BASE is None:
        _BASE = rebase(load_trace(TRACE).requests)
    return _BASE


def specs() -> list[InstanceSpec]:
    return [InstanceSpec(instance_id=f"inst-{i:02d}", preset=PRESET)
            for i in range(NUM_INSTANCES)]


def policy_of(label: str) -> tuple[str, SchedulerSettings]:
    policy, changes = VARIANTS.get(label, (label, {}))
    return policy, msgspec.structs.replace(SchedulerSettings(), **changes)


@dataclass(frozen=True)
class Run:
    label: str
    scale: float
    seed: int
    summary: Summary  # with SLO
    ttft_attainment: float  # with TTFT_SLO
    wall_s: float
    result: SimResult | None = None  # kept only when asked for (plots)

    @property
    def capacity_ok(self) -> bool:
        s = self.summary
        assert s.queueing.mean is not None and s.ttft.p99 is not None
        return s.queueing.mean < QUEUE_MEAN_LIMIT_S and s.ttft.p99 < TTFT_P99_LIMIT_S

    def attainment(self, kind: str) -> float:
        att = self.summary.slo_attainment if kind == "slo" else self.ttft_attainment
        assert att is not None
        return att

    def slo_ok(self, kind: str = "slo") -> bool:
        return self.attainment(kind) >= GOODPUT_ATTAINMENT


def run(label: str, scale: float, seed: int, keep_result: bool = False) -> Run:
    policy, scheduler = policy_of(label)
    requests = scale_rate(base_trace(), scale)
    t0 = time.perf_counter()
    result = simulate(requests, specs(), policy, SimSettings(seed=seed, scheduler=scheduler))
    wall = time.perf_counter() - t0
    summary = summarize(label, result.records, slo=SLO, warmup_s=WARMUP_S,
                        cooldown_s=COOLDOWN_S)
    ttft_only = summarize(label, result.records, slo=TTFT_SLO, warmup_s=WARMUP_S,
                          cooldown_s=COOLDOWN_S).slo_attainment
    assert ttft_only is not None
    return Run(label, scale, seed, summary, ttft_only, wall, result if keep_result else None)


def bisect(label: str, lo: float, hi: float, steps: int, ok: Callable[[Run], bool],
           *, widen: float | None = None) -> tuple[float, list[Run]]:
    """Highest passing scale; `lo` must pass and `hi` fail (else widen by halving `lo` /
    raising `hi` by `widen`, or raise if `widen` is None)."""
    runs = [run(label, lo, 0), run(label, hi, 0)]
    while not ok(runs[0]):
        if widen is None or lo < 1.0:
            raise RuntimeError(f"{label}: scale {lo:g} does not pass")
        lo = round(lo / 2, 4)
        runs.insert(0, run(label, lo, 0))
    while ok(runs[-1]):
        if widen is None or hi > 1e4:
            raise RuntimeError(f"{label}: scale {hi:g} does not fail")
        hi = round(hi + widen, 4)
        runs.append(run(label, hi, 0))
    best, worst = runs[0], runs[-1]
    for _ in range(steps):
        mid = run(label, round((best.scale + worst.scale) / 2, 4), 0)
        runs.append(mid)
        if ok(mid):
            best = mid
        else:
            worst = mid
    return best.scale, sorted(runs, key=lambda r: r.scale)


def capacity_job(label: str, steps: int) -> tuple[float, list[Run]]:
    return bisect(label, *CAPACITY_BRACKET, steps, lambda r: r.capacity_ok)


def goodput_job(label: str, capacity: float, steps: int, kind: str
                ) -> tuple[float, list[Run]]:
    """Goodput under SLO (`kind` "slo") or TTFT_SLO ("ttft")."""
    lo, hi = (round(f * capacity, 4) for f in GOODPUT_BRACKETS[kind])
    return bisect(label, lo, hi, steps, lambda r: r.slo_ok(kind),
                  widen=round(0.2 * capacity, 4))




# ---- printing ---------------------------------------------------------------------------






def print_capacity(label: str, capacity: float, runs: Sequence[Run], native_rps: float) -> None:
    print(f"\ncapacity probes, {label} (ok = mean queueing < {QUEUE_MEAN_LIMIT_S} s and TTFT "
          f"p99 < {TTFT_P99_LIMIT_S} s):\n")
    print("| rate scale | req/s | mean queueing | TTFT p99 | |")
    print("|---:|---:|---:|---:|---|")
    for r in runs:
        s = r.summary
        mark = f"**{r.scale:.4f}**" if r.scale == capacity else f"{r.scale:.4f}"
        print(f"| {mark} | {r.scale * native_rps:.1f} | {s.queueing.mean:.3f} s | "
              f"{s.ttft.p99:.3f} s | {'ok' if r.capacity_ok else 'overloaded'} |")
    print(f"\n{label} capacity = rate scale {capacity:.4f} = {capacity * native_rps:.1f} req/s")


Goodputs = dict[str, dict[str, float]]  # kind ("slo", "ttft") -> label -> rate scale


def print_table(runs: Sequence[Run], goodputs: Goodputs | None, native_rps: float) -> None:
    head = ("| policy | TTFT p50 ms | TTFT p99 ms | TTFT mean ms | TPOT p99 ms | SLO met |"
            " preempted | done |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if goodputs is not None:
        head += " goodput (scale) | goodput req/s | TTFT-only goodput (scale) |"
        rule += "---:|---:|---:|"
    print(head)
    print(rule)
    for r in runs:
        s = r.summary
        row = (f"| {r.label} | {ms(s.ttft.p50)} | {ms(s.ttft.p99)} | {ms(s.ttft.mean)} | "
               f"{ms(s.tpot.p99)} | {pct(s.slo_attainment)} | {s.preempted_requests} | "
               f"{s.num_completed}/{s.num_requests} |")
        if goodputs is not None:
            g = goodputs["slo"][r.label]
            t = goodputs["ttft"].get(r.label)
            row += f" {g:.4f} | {g * native_rps:.1f} | {'-' if t is None else f'{t:.4f}'} |"
        print(row)


def print_goodput_probes(label: str, runs: Sequence[Run], kind: str) -> None:
    probes = ", ".join(f"{r.scale:.4f}: {pct(r.attainment(kind))}"
                       f"{'' if r.slo_ok(kind) else ' x'}" for r in runs)
    print(f"  {label}: {probes}")




def print_goals(runs: dict[str, Run], all_goodputs: Goodputs) -> None:
    goodputs = all_goodputs["slo"]
    p99 = {k: r.summary.ttft.p99 for k, r in runs.items()}
    lb = p99[LB]
    assert lb is not None
    rivals = [p for p in POLICIES if p not in (LB, "oracle")]
    best_p99 = min(rivals, key=lambda p: p99[p] or float("inf"))
    best_gp = max(rivals, key=lambda p: goodputs[p])
    rr_ratio = (p99["round-robin"] or 0.0) / lb
    gap = lb / (p99["oracle"] or float("nan"))
    print("\n| goal | value | |")
    print("|---|---|---|")
    print(f"| best p99 TTFT of the non-oracle policies | load-balance {ms(lb)} ms; best other: "
          f"{best_p99} {ms(p99[best_p99])} ms | {verdict(lb <= (p99[best_p99] or 0.0))} |")
    tie = " (tie)" if goodputs[LB] == goodputs[best_gp] else ""
    print(f"| best goodput of the non-oracle policies | load-balance {goodputs[LB]:.4f}; best "
          f"other: {best_gp} {goodputs[best_gp]:.4f}{tie} | "
          f"{verdict(goodputs[LB] >= goodputs[best_gp])} |")
    ttft = all_goodputs["ttft"]
    best_ttft = max(rivals, key=lambda p: ttft[p])
    tie = " (tie)" if ttft[LB] == ttft[best_ttft] else ""
    print(f"| (not a goal) best TTFT-only goodput of the non-oracle policies | load-balance "
          f"{ttft[LB]:.4f}; best other: {best_ttft} {ttft[best_ttft]:.4f}{tie} | "
          f"{'yes' if ttft[LB] >= ttft[best_ttft] else 'no'} |")
    print(f"| p99 TTFT >= {RR_FACTOR_GOAL:g}x better than round-robin | round-robin / "
          f"load-balance = {rr_ratio:.2f}x | {verdict(rr_ratio >= RR_FACTOR_GOAL)} |")
    print(f"| p99 TTFT within 20% of oracle | load-balance / oracle = {gap:.2f} | "
          f"{verdict(gap <= ORACLE_GAP_GOAL)} |")


def print_by_seed(table: dict[tuple[str, int], Run], labels: Sequence[str],
                  seeds: Sequence[int]) -> None:
    print("\n== p99 TTFT (ms) by seed, and rank among the non-oracle policies (1 = best)\n")
    print("| policy | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---:|" * len(seeds))
    ranks = {}
    for seed in seeds:
        order = sorted((p for p in POLICIES if p != "oracle"),
                       key=lambda p: table[(p, seed)].summary.ttft.p99 or 0.0)
        ranks[seed] = {p: i + 1 for i, p in enumerate(order)}
    for p in labels:
        cells = []
        for seed in seeds:
            value = ms(table[(p, seed)].summary.ttft.p99)
            rank = ranks[seed].get(p)
            cells.append(value if rank is None else f"{value} (#{rank})")
        print(f"| {p} | " + " | ".join(cells) + " |")
    for name, num, den in (("round-robin / load-balance", "round-robin", LB),
                           ("load-balance / oracle", LB, "oracle")):
        ratios = [(table[(num, seed)].summary.ttft.p99 or 0.0)
                  / (table[(den, seed)].summary.ttft.p99 or float("nan")) for seed in seeds]
        print(f"| *{name}* | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")


def plots(runs: Sequence[Run], out: Path, scale: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        chosen = [r for r in runs if r.result is not None]
        write_results(
            Path(tmp),
            summaries=[r.summary for r in chosen],
            records_by_policy={r.label: r.result.records for r in chosen if r.result},
            load_by_policy={r.label: r.result.load for r in chosen if r.result},
            scenario={"trace": TRACE, "instances": NUM_INSTANCES, "preset": PRESET,
                      "rate_scale": scale, "seed": 0},
        )
        out.mkdir(parents=True, exist_ok=True)
        for name in FIGURES:
            shutil.copyfile(Path(tmp) / name, out / name)
            print(f"wrote {out / name}")


# ---- main ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (not the recorded one)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--figures", type=Path, default=Path("bench/figures"),
                        help="where ttft_cdf.png and load_timeline.png go")
    parser.add_argument("--no-variants", action="store_true", help="skip load-balance variants")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else DEFAULT
    labels = [*POLICIES, *(() if args.no_variants else VARIANTS)]
    t_start = time.perf_counter()
    base = base_trace()
    span = max(r.arrival_time for r in base)
    native_rps = len(base) / span
    print(f"Python {platform.python_version()} on {platform.machine()}, "
          f"{'quick' if args.quick else 'default'} mode, {args.jobs} job(s); {NUM_INSTANCES} x "
          f"{PRESET}, {TRACE}: {len(base)} requests over {span:.0f} s = {native_rps:.2f} req/s "
          f"native; measured: arrivals after the first {WARMUP_S:g} s and before the last "
          f"{COOLDOWN_S:g} s")
    pool: Executor = Inline() if args.jobs <= 1 else ProcessPoolExecutor(args.jobs)
    with pool:
        # 1. capacity
        cap_jobs = {p: pool.submit(capacity_job, p, mode.capacity_steps)
                    for p in ("oracle", "round-robin")}
        capacity, cap_runs = cap_jobs["oracle"].result()
        print_capacity("oracle", capacity, cap_runs, native_rps)
        rr_capacity, rr_runs = cap_jobs["round-robin"].result()
        print_capacity("round-robin", rr_capacity, rr_runs, native_rps)
        load = round(LOAD_FRACTION * capacity, 4)
        print(f"\nload = {LOAD_FRACTION} x oracle capacity = rate scale {load:.4f} = "
              f"{load * native_rps:.1f} req/s (round-robin capacity {rr_capacity:.4f} = "
              f"{rr_capacity / capacity:.3f} x oracle's)", flush=True)

        # 2. + 3. goodput bisections (long) first, then the tables (short)
        gp_jobs = {(kind, p): pool.submit(goodput_job, p, capacity, mode.goodput_steps, kind)
                   for kind in ("slo", "ttft") for p in (labels if kind == "slo" else POLICIES)}
        table_jobs = {(p, seed): pool.submit(run, p, load, seed,
                                             seed == 0 and p in PLOTTED)
                      for seed in mode.seeds for p in labels}
        table = {key: job.result() for key, job in table_jobs.items()}
        goodput_runs = {key: job.result() for key, job in gp_jobs.items()}
    goodputs: Goodputs = {"slo": {}, "ttft": {}}
    for (kind, p), (g, _) in goodput_runs.items():
        goodputs[kind][p] = g

    slo = f"TTFT <= {(SLO.ttft_s or 0) * 1e3:g} ms and TPOT <= {(SLO.tpot_s or 0) * 1e3:g} ms"
    seed0 = {p: table[(p, 0)] for p in labels}
    print(f"\n== seed 0, rate scale {load:.4f} ({load * native_rps:.1f} req/s); SLO {slo}; "
          f"goodput: highest rate scale with >= {GOODPUT_ATTAINMENT:.0%} of requests meeting "
          f"the SLO; TTFT-only goodput: the same with TTFT <= "
          f"{(TTFT_SLO.ttft_s or 0) * 1e3:g} ms alone (policies only)\n")
    print_table(list(seed0.values()), goodputs, native_rps)
    for kind, what in (("slo", "SLO"), ("ttft", "TTFT-only SLO")):
        print(f"\ngoodput probes, {what} (rate scale: attainment, x = below 90%):")
        for (k, p), (_, runs) in goodput_runs.items():
            if k == kind:
                print_goodput_probes(p, runs, kind)
    print_goals(seed0, goodputs)
    for seed in mode.seeds[1:]:
        print(f"\n== seed {seed}, rate scale {load:.4f}\n")
        print_table([table[(p, seed)] for p in labels], None, native_rps)
    if len(mode.seeds) > 1:
        print_by_seed(table, labels, mode.seeds)
    print(f"\n== plots ({', '.join(PLOTTED)}; seed 0, rate scale {load:.4f})")
    plots([seed0[p] for p in PLOTTED], args.figures, load)
    walls = [r.wall_s for r in table.values()]
    print(f"\nsimulate() wall per run at the table's load: {min(walls):.2f}-{max(walls):.2f} s; "
          f"benchmark wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
