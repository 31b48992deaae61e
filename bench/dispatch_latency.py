"""Decision latency of `Dispatcher.schedule()` at 16 to 4,096 instances, and of one status poll.

The scheduling core is what a scheduler process runs for every request, so its latency adds to
every TTFT. This benchmark builds a `load-balance` dispatcher (`SchedulerSettings()` defaults:
full mode, local account on, neutral metric `all_prefills_tokens_num` with soft threshold 8192,
top-k 1, failover domain `instance`) over N neutral instances, gives every instance a realistic,
varied `InstanceStatus`, and times `schedule()` calls one at a time with
`time.perf_counter_ns`:

- statuses: KV capacity of `llama3-8b-h100` (29,205 blocks x 16 tokens), KV usage uniform in
  [0, 0.95], 0-64 running and 0-8 waiting requests, 0-2,048 uncomputed prompt tokens per waiting
  request, a running prefill chunk on a third of the instances, 1% unschedulable (so the
  failover filter has work), timestamps fresh;
- requests: prompts of 50-4,000 tokens (log-uniform); the simulated clock advances 1 ms per
  call (1,000 requests/s);
- in flight: a request is released (`release()`, untimed) once 300 newer ones have been
  dispatched, so the local account holds a few hundred entries;
- polls: every 500 calls (every 500 simulated ms, the default `--cms-pull-status-interval-ms`)
  a fresh status for every instance is applied with `on_statuses` (timed separately). A
  status lists the in-flight requests dispatched to its instance more than 40 ms before the
  poll as waiting (those since the previous poll also as recently waiting), so reconciliation
  marks them found and uncounts them, as in a live cluster.

Each N first runs 1,000 untimed warm-up calls (and two polls), then 5,000 timed calls; the
whole measurement is repeated (default 3 times, N interleaved) and the median of each
percentile over the repeats is reported, with the per-repeat values printed. The same is done
for lite-mode load-balance (`enable_full_mode_scheduling=False`, metric `num_requests`:
router-local in-flight counts, no CMS) for reference.

Run from the repository root:

    .venv/bin/python bench/dispatch_latency.py            # the recorded numbers (~10 s)
    .venv/bin/python bench/dispatch_latency.py --quick    # smoke run (~2 s)

Goals (issue "Full-mode and lite-mode scheduling core"): full-mode load-balance p99 <= 100 us
at 128 instances and <= 1 ms at 4,096 instances.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np

from prescient.config.presets import get_preset
from prescient.config.scheduler import SchedulerSettings
from prescient.model import InstanceMetadata, InstanceStatus, Request
from prescient.policy import Dispatcher, make_dispatcher

SIZES = (16, 128, 1024, 4096)
GOALS_US = {128: 100.0, 4096: 1000.0}  # full-mode p99 goals
PRESET = "llama3-8b-h100"
CALL_INTERVAL_S = 0.001  # simulated time between two schedule() calls
POLL_EVERY = 500  # calls between status polls (500 ms at 1 ms per call)
IN_FLIGHT = 300  # requests kept in flight; older ones are released
PUSH_LAG_S = 0.04  # a dispatch shows up in a status this long after it happened
UNSCHEDULABLE_FRACTION = 0.01


@dataclass(frozen=True)
class Mode:
    repeats: int
    warmup_calls: int
    timed_calls: int


DEFAULT = Mode(repeats=3, warmup_calls=1000, timed_calls=5000)
QUICK = Mode(repeats=1, warmup_calls=200, timed_calls=1000)


@dataclass
class Variant:
    """One dispatcher configuration and what was measured for it."""

    label: str
    settings: SchedulerSettings
    schedule_us: dict[int, list[np.ndarray]] = field(default_factory=dict)  # N -> per repeat
    poll_ms: dict[int, list[float]] = field(default_factory=dict)  # N -> every timed poll
    fallback: dict[int, list[float]] = field(default_factory=dict)  # N -> share per repeat


class Cluster:
    """Synthetic instances with varied load, and the statuses a CMS poll would return."""

    def __init__(self, n: int, rng: random.Random) -> None:
        preset = get_preset(PRESET)
        self.total_tokens = preset.num_gpu_blocks * 16
        self.rng = rng
        self.ids = [f"inst-{i:05d}" for i in range(n)]
        self.metadata = {iid: InstanceMetadata(instance_id=iid, unit_id=iid,
                                               node_id=f"node-{i // 8}",
                                               max_num_batched_tokens=8192)
                         for i, iid in enumerate(self.ids)}
        self.update_id = 0
        self.last_poll = -1.0
        # request id -> (instance id, dispatch time), in dispatch order
        self.in_flight: dict[str, tuple[str, float]] = {}

    def statuses(self, now: float) -> dict[str, InstanceStatus]:
        """One poll: a fresh, varied status per instance, listing the in-flight requests that
        reached their instance at least `PUSH_LAG_S` ago as waiting."""
        self.update_id += 1
        waiting: dict[str, list[str]] = {}
        recent: dict[str, list[str]] = {}
        for rid, (iid, at) in self.in_flight.items():
            if at <= now - PUSH_LAG_S:
                waiting.setdefault(iid, []).append(rid)
                if at > self.last_poll - PUSH_LAG_S:
                    recent.setdefault(iid, []).append(rid)
        self.last_poll = now
        rng = self.rng
        ts = round(now * 1000)
        out: dict[str, InstanceStatus] = {}
        for iid in self.ids:
            ids = tuple(waiting.get(iid, ()))
            num_waiting = rng.randint(0, 8) + len(ids)
            waiting_tokens = sum(rng.randint(0, 2048) for _ in range(num_waiting))
            running_prefill = rng.randint(1, 8192) if rng.random() < 1 / 3 else 0
            num_running = rng.randint(0, 64)
            out[iid] = InstanceStatus(
                instance_id=iid,
                schedulable=rng.random() >= UNSCHEDULABLE_FRACTION,
                timestamp_ms=ts - rng.randint(0, 40),
                step_id=self.update_id * 10,
                update_id=self.update_id,
                recent_waiting_requests=tuple(recent.get(iid, ())),
                waiting_requests=ids,
                num_waiting_requests=num_waiting,
                num_running_requests=num_running,
                scheduler_running_to_decode_requests_num=num_running,
                num_total_gpu_tokens=self.total_tokens,
                num_used_gpu_tokens=int(self.total_tokens * rng.uniform(0.0, 0.95)) // 16 * 16,
                num_uncomputed_tokens_scheduler_waiting_prefills=waiting_tokens,
                num_uncomputed_tokens_all_waiting_prefills=waiting_tokens,
                num_uncomputed_tokens_scheduler_running_prefills=running_prefill,
                num_unallocated_tokens_scheduler_running_prefills=running_prefill // 2,
                scheduler_running_to_decode_tokens_num=num_running * rng.randint(200, 1500),
            )
        return out


class Driver:
    """One dispatcher over one synthetic cluster, driven call by call."""

    def __init__(self, n: int, settings: SchedulerSettings, seed: int) -> None:
        rng = random.Random(seed)
        self.cluster = Cluster(n, random.Random(rng.getrandbits(64)))
        self.req_rng = random.Random(rng.getrandbits(64))
        self.dispatcher: Dispatcher = make_dispatcher("load-balance", settings,
                                                      random.Random(rng.getrandbits(64)))
        self.now = 0.0
        self.calls = 0
        self.order: deque[str] = deque()
        self.threshold = settings.dispatch_neutral_load_threshold
        self.fallbacks = 0  # timed calls where no instance was under the soft threshold
        self.dispatcher.on_instances(self.cluster.metadata, self.now)
        self.poll()

    def poll(self) -> float:
        """Apply one full poll; returns its wall time in ms (building statuses excluded)."""
        statuses = self.cluster.statuses(self.now)
        t0 = time.perf_counter_ns()
        self.dispatcher.on_statuses(statuses, self.now)
        return (time.perf_counter_ns() - t0) / 1e6

    def request(self) -> Request:
        prompt = int(math.exp(self.req_rng.uniform(math.log(50), math.log(4000))))
        return Request(request_id=f"req-{self.calls:08d}", prompt_len=prompt,
                       output_len=self.req_rng.randint(1, 1000), arrival_time=self.now)

    def run(self, calls: int, *, timed: bool) -> tuple[np.ndarray, list[float]]:
        """`calls` schedule() calls; per-call ns (if timed) and the poll times in ms."""
        out = np.zeros(calls if timed else 0, np.int64)
        polls: list[float] = []
        dispatcher, in_flight, order = self.dispatcher, self.cluster.in_flight, self.order
        for i in range(calls):
            self.calls += 1
            self.now += CALL_INTERVAL_S
            req = self.request()
            if timed and dispatcher.full_mode and self.all_over_threshold():
                self.fallbacks += 1
            t0 = time.perf_counter_ns()
            decision = dispatcher.schedule(req, self.now)
            t1 = time.perf_counter_ns()
            if timed:
                out[i] = t1 - t0
            iid = decision.instance_id
            if iid is None:
                raise RuntimeError(f"no instance for {req.request_id}")
            in_flight[req.request_id] = (iid, self.now)
            order.append(req.request_id)
            if len(order) > IN_FLIGHT:
                done = order.popleft()
                del in_flight[done]
                dispatcher.release(done, self.now)
            if self.calls % POLL_EVERY == 0:
                polls.append(self.poll())
        return out, polls

    def all_over_threshold(self) -> bool:
        """True when the soft threshold filter keeps nobody, so the pipeline runs its fallback
        pass (the filters twice). Computed outside the timed region from the same columns as
        `all_prefills_tokens_num`."""
        st = self.dispatcher.state
        load = (st.s("num_uncomputed_tokens_all_waiting_prefills")
                + st.s("num_uncomputed_tokens_scheduler_running_prefills")
                + st.a("num_uncomputed_tokens_inflight_dispatch_prefill_requests"))
        return not bool((load < self.threshold).any())

    def account_entries(self) -> tuple[int, int]:
        """(entries in the local account, entries still counted: not yet seen in a status)."""
        account = self.dispatcher.account
        if account is None:
            return 0, 0
        entries = [e for a in account._accounts.values() for e in a.entries.values()]
        return len(entries), sum(not e.found_in_cms for e in entries)


def measure(variant: Variant, n: int, mode: Mode, seed: int) -> str:
    driver = Driver(n, variant.settings, seed)
    driver.run(mode.warmup_calls, timed=False)
    gc.collect()
    ns, polls = driver.run(mode.timed_calls, timed=True)
    variant.schedule_us.setdefault(n, []).append(ns / 1000.0)
    variant.poll_ms.setdefault(n, []).extend(polls)
    variant.fallback.setdefault(n, []).append(driver.fallbacks / mode.timed_calls)
    entries, counted = driver.account_entries()
    return f"local account at the end: {entries} entries, {counted} of them still counted"


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q))


def summary(runs: Sequence[np.ndarray], q: float) -> tuple[float, list[float]]:
    per = [pct(r, q) for r in runs]
    return statistics.median(per), per


def print_table(variant: Variant, full: bool) -> bool:
    print(f"\n== {variant.label}: schedule() latency, us (median over repeats of each "
          f"percentile; the last column lists each repeat's p50/p99)")
    print(f"{'N':>6}{'calls':>8}{'p50':>9}{'p99':>9}{'p99.9':>9}{'mean':>9}{'fallback':>10}"
          f"  {'goal (p99)':<22} per-repeat p50/p99")
    all_met = True
    for n, runs in variant.schedule_us.items():
        p50, p50s = summary(runs, 50)
        p99, p99s = summary(runs, 99)
        p999, _ = summary(runs, 99.9)
        mean = statistics.median(float(r.mean()) for r in runs)
        goal = ""
        if full and n in GOALS_US:
            met = p99 <= GOALS_US[n]
            all_met = all_met and met
            goal = f"<= {GOALS_US[n]:g} us: {'MET' if met else 'NOT MET'}"
        reps = " ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(p50s, p99s, strict=True))
        fallback = f"{statistics.mean(variant.fallback[n]):.0%}" if full else "-"
        print(f"{n:>6}{sum(len(r) for r in runs):>8}{p50:>9.1f}{p99:>9.1f}{p999:>9.1f}"
              f"{mean:>9.1f}{fallback:>10}  {goal:<22} {reps}")
    print(f"-- {variant.label}: on_statuses() for one full poll (all N statuses), ms")
    print(f"{'N':>6}{'polls':>8}{'p50':>9}{'max':>9}")
    for n, polls in variant.poll_ms.items():
        print(f"{n:>6}{len(polls):>8}{statistics.median(polls):>9.2f}{max(polls):>9.2f}")
    if full:
        print("(fallback: share of timed calls where every instance was at or over the soft "
              "threshold, so the filters ran a second time without it)")
    return all_met


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, one short repeat")
    parser.add_argument("--sizes", type=lambda s: tuple(int(x) for x in s.split(",")),
                        default=SIZES, help="instance counts, comma-separated")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else DEFAULT
    t_start = time.perf_counter()
    print(f"Python {platform.python_version()}, numpy {np.__version__}, msgspec "
          f"{msgspec.__version__} on {platform.machine()}; "
          f"{'quick' if args.quick else 'default'} mode: {mode.repeats} repeat(s) x "
          f"{mode.timed_calls} timed calls per N after {mode.warmup_calls} warm-up calls; "
          f"poll every {POLL_EVERY} calls, {IN_FLIGHT} requests in flight")
    defaults = SchedulerSettings()
    full = Variant(
        f"full-mode load-balance (metric {defaults.dispatch_neutral_load_metric}, soft "
        f"threshold {defaults.dispatch_neutral_load_threshold:g}, local account on)", defaults)
    lite = Variant("lite-mode load-balance (metric num_requests, router-local counts)",
                   msgspec.structs.replace(defaults, enable_full_mode_scheduling=False,
                                           dispatch_prefill_load_metric="num_requests",
                                           dispatch_decode_load_metric="num_requests",
                                           dispatch_neutral_load_metric="num_requests"))
    for rep in range(mode.repeats):
        for n in args.sizes:
            for variant in (full, lite):
                note = measure(variant, n, mode, seed=rep)
                if variant is full:
                    print(f"repeat {rep + 1}, N={n}: {note}", flush=True)
    met = print_table(full, full=True)
    print_table(lite, full=False)
    checked = [n for n in GOALS_US if n in args.sizes]
    print(f"\ngoals (full mode, p99 <= 100 us at 128, <= 1 ms at 4096): "
          f"{('MET' if met else 'NOT MET') if checked else 'not measured'}")
    print(f"benchmark wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
