"""Scheduling quality on a heterogeneous cluster: 8 x llama3-8b-h100 + 8 x llama3-8b-a100.

The homogeneous benchmark (`sched_quality.py`) finds round-robin within 0.96 of the oracle's
capacity, so no policy can beat it by much there. Heterogeneity is where load information pays:
an A100 takes about three times as long per prefill token. This runs the bundled azure-conv
trace at 0.9 x the oracle's capacity of the mixed cluster (capacity as in `sched_quality.py`:
the highest rate scale where the oracle keeps mean queueing < 0.5 s and TTFT p99 < 2 s, first
and last 10 s unmeasured) and compares p99 TTFT across policies.

    .venv/bin/python bench/heterogeneous.py          # ~2 minutes on 2 cores
"""

from __future__ import annotations

import time

from prescient.sim.cluster import InstanceSpec, SimSettings, simulate
from prescient.sim.metrics import Summary, summarize
from prescient.sim.traces import load_trace
from prescient.sim.workload import rebase, scale_rate

POLICIES = ("round-robin", "least-requests", "power-of-two", "llm-d", "aibrix-least-request",
            "load-balance", "oracle")
TRIM_S = 10.0


def specs() -> list[InstanceSpec]:
    presets = ["llama3-8b-h100"] * 8 + ["llama3-8b-a100"] * 8
    return [InstanceSpec(instance_id=f"inst-{k:02d}", preset=p) for k, p in enumerate(presets)]


def run(policy: str, scale: float) -> Summary:
    requests = scale_rate(rebase(load_trace("azure-conv").requests), scale)
    result = simulate(requests, specs(), policy, SimSettings(seed=0))
    return summarize(policy, result.records, warmup_s=TRIM_S, cooldown_s=TRIM_S)


def sustainable(summary: Summary) -> bool:
    queueing, ttft = summary.queueing.mean, summary.ttft.p99
    return queueing is not None and ttft is not None and queueing < 0.5 and ttft < 2.0


def oracle_capacity(lo: float = 20.0, hi: float = 60.0, steps: int = 7) -> float:
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sustainable(run("oracle", mid)) else (lo, mid)
    return lo


def main() -> None:
    started = time.perf_counter()
    capacity = oracle_capacity()
    scale = 0.9 * capacity
    print(f"oracle capacity: rate scale {capacity:.4f}; table at 0.9 x = {scale:.4f}")
    print(f"{'policy':22} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'TPOT p99 ms':>12} "
          f"{'vs round-robin':>15}")
    rows = {p: run(p, scale) for p in POLICIES}
    rr = rows["round-robin"].ttft.p99 or float("nan")
    for policy, s in rows.items():
        p50, p99, tpot = (s.ttft.p50 or 0) * 1e3, (s.ttft.p99 or 0) * 1e3, (s.tpot.p99 or 0) * 1e3
        print(f"{policy:22} {p50:12.1f} {p99:12.1f} {tpot:12.1f} {rr / (s.ttft.p99 or 1):14.2f}x")
    print(f"wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
