"""`least-kv`: send each request to the instance whose KV cache is least full.

A worked example of adding a dispatch policy (see docs/policies.md). It is one metric and the
stock `MetricSelector`; in the source tree it would live in `src/prescient/policy/least_kv.py`
and be registered with one entry in `src/prescient/policy/registry.py`:

    "least-kv": least_kv,

Input: the polled `InstanceStatus` of each instance (as stale as the CMS poll interval).
Formula: `num_used_gpu_tokens / num_total_gpu_tokens`, lower is better; an instance with no
status yet scores `inf`, so it is picked only when no instance has one (ties go to id order).

Run this file to compare it with `least-requests` on a small synthetic workload:

    .venv/bin/python examples/plugins/least_kv.py
"""

from __future__ import annotations

import random

from prescient.model import InferType
from prescient.policy import (
    DispatchPolicy,
    InstanceView,
    Pipeline,
    PipelinePolicy,
    SchedulingContext,
)
from prescient.policy.selectors import MetricSelector


class KvUsage:
    """Metric `kv_usage`: fraction of the instance's KV cache in use, from the polled status."""

    name = "kv_usage"
    lower_is_better = True

    def value(self, instance: InstanceView, ctx: SchedulingContext) -> float:
        status = instance.status
        if status is None or status.num_total_gpu_tokens == 0:
            return float("inf")  # never polled yet: know nothing, prefer anything known
        return status.num_used_gpu_tokens / status.num_total_gpu_tokens


def least_kv(rng: random.Random) -> DispatchPolicy:
    """The `least-kv` policy: no filters, lowest KV usage wins."""
    selector = MetricSelector([KvUsage()])
    return PipelinePolicy("least-kv", {InferType.NEUTRAL: Pipeline((), selector)}, rng)


if __name__ == "__main__":
    from prescient.policy import registry
    from prescient.sim import InstanceSpec, simulate
    from prescient.sim.metrics import SloSpec, summarize
    from prescient.sim.report import format_table_text
    from prescient.sim.workload import parse_length_spec, synthetic_workload

    registry.POLICIES["least-kv"] = least_kv  # what the registry line does, at runtime

    requests = synthetic_workload(
        rate=40.0, num_requests=2000, seed=0,
        prompt=parse_length_spec("lognormal:mean=1155,median=1020"),
        output=parse_length_spec("lognormal:mean=211,median=129"),
    )
    instances = [InstanceSpec(instance_id=f"inst-{i}") for i in range(4)]
    slo = SloSpec(ttft_s=6.0, tpot_s=0.05)
    summaries = [
        summarize(policy, simulate(requests, instances, policy).records,
                  slo=slo, warmup_s=5.0, cooldown_s=5.0)
        for policy in ("least-requests", "least-kv")
    ]
    print(format_table_text(summaries, slo))
