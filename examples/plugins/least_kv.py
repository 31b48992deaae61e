"""`least-kv`: send each request to the instance whose KV cache is least full.

A worked example of adding a dispatch policy (see docs/policies.md). It is one metric and the
stock `MetricSelector`; in the source tree it would live in `src/prescient/policy/least_kv.py`
and be registered with one entry in `src/prescient/policy/registry.py`:

    "least-kv": least_kv,

Input: the polled `InstanceStatus` columns of every instance (as stale as the CMS poll).
Formula: `num_used_gpu_tokens / num_total_gpu_tokens`, lower is better, computed for all
instances at once; ties go to instance id order. It is a full-mode policy: only instances with
a polled status are candidates, and unschedulable or stale ones are filtered out.

Run this file to compare it with `least-requests` on a small synthetic workload:

    .venv/bin/python examples/plugins/least_kv.py
"""

from __future__ import annotations

import random

import numpy as np

from prescient.model import InferType
from prescient.policy import Dispatcher, Pipeline, SchedulingContext
from prescient.policy.filters import Fresh, Schedulable
from prescient.policy.registry import DispatchSettings
from prescient.policy.selectors import MetricSelector


class KvUsage:
    """Metric `kv_usage`: fraction of each instance's KV cache in use, from its polled status."""

    name = "kv_usage"
    lower_is_better = True

    def compute(self, ctx: SchedulingContext) -> np.ndarray:
        used = ctx.state.s("num_used_gpu_tokens")
        total = ctx.state.s("num_total_gpu_tokens")
        # never polled yet (total 0): know nothing, prefer anything known
        return np.where(total > 0, used / np.maximum(total, 1), np.inf)


def least_kv(settings: DispatchSettings, rng: random.Random) -> Dispatcher:
    """The `least-kv` policy: healthy instances, lowest KV usage wins."""
    filters = [Schedulable(), Fresh(settings.instance_staleness_seconds)]
    pipeline = Pipeline(filters, MetricSelector([KvUsage()]))
    return Dispatcher("least-kv", {InferType.NEUTRAL: pipeline}, rng, full_mode=True)


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
