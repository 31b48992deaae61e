"""Output-length-aware queueing vs FCFS in the simulated engines.

8 x llama3-8b-h100 with `max_num_seqs` 64, so that requests queue inside the engines, on the
bundled azure-conv trace at rate scale 22 (about 0.9 x round-robin's capacity at the default
`max_num_seqs`; with 64 sequences per instance the engines hold real queues). Dispatch is
least-requests throughout; only the engines' waiting order changes: FCFS, or shortest predicted
output first (`spf`, aged at 100 tokens/s) with the router's prediction from an oracle, a
log-normal error of spread 0.5, or the online per-prompt-bucket histogram.

    .venv/bin/python bench/output_length.py          # ~1 minute on 2 cores
"""

from __future__ import annotations

import time

from prescient.sim.cluster import InstanceSpec, SimSettings, simulate
from prescient.sim.metrics import summarize
from prescient.sim.traces import load_trace
from prescient.sim.workload import rebase, scale_rate

SCALE = 22.0
CASES = (
    ("fcfs", "none"),
    ("spf", "oracle"),
    ("spf", "lognormal:sigma=0.5"),
    ("spf", "histogram"),
)


def main() -> None:
    started = time.perf_counter()
    requests = scale_rate(rebase(load_trace("azure-conv").requests), SCALE)
    print(f"azure-conv x{SCALE:g}, 8 x llama3-8b-h100, max_num_seqs 64, least-requests")
    print(f"{'queue':6} {'predictor':22} {'E2E mean s':>10} {'E2E p50 s':>10} {'E2E p99 s':>10} "
          f"{'TTFT mean ms':>13} {'TTFT p99 ms':>12}")
    for queue, predictor in CASES:
        instances = [InstanceSpec(instance_id=f"inst-{k}", max_num_seqs=64, queue_policy=queue)
                     for k in range(8)]
        settings = SimSettings(seed=0, output_length_predictor=predictor)
        result = simulate(requests, instances, "least-requests", settings)
        s = summarize(queue, result.records, warmup_s=10.0, cooldown_s=10.0)
        print(f"{queue:6} {predictor:22} {s.e2e.mean:10.2f} {s.e2e.p50:10.2f} {s.e2e.p99:10.2f} "
              f"{s.ttft.mean * 1e3:13.1f} {s.ttft.p99 * 1e3:12.1f}")
    print(f"wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
