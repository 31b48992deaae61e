"""CPU per `schedule_now()` + `release_now()` pair through `SchedulerCore`, the gateway's
embedded path.

N idle instances in an in-memory CMS (full mode) or a static endpoint list (lite mode); 20,000
requests of 100 prompt tokens, each scheduled and released at once; CPU time (process_time)
per pair. Compare code versions side by side in one session by pointing PYTHONPATH at each:

    .venv/bin/python bench/schedule_release.py --mode full --instances 2
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python bench/schedule_release.py ...
"""

from __future__ import annotations

import argparse
import asyncio
import time

from prescient.cms.store import MemoryStore
from prescient.config.scheduler import load_scheduler_settings
from prescient.model import InferType, InstanceMetadata, InstanceStatus
from prescient.scheduler.core import SchedulerCore
from prescient.scheduler.wire import ScheduleRequest


async def pair_us(mode: str, instances: int, requests: int, in_flight: int = 0) -> float:
    store = MemoryStore()
    for i in range(instances):
        await store.put_metadata(InstanceMetadata(
            instance_id=f"i{i}", instance_type=InferType.NEUTRAL, ip="127.0.0.1",
            api_server_port=8000 + i), None)
        await store.put_status(InstanceStatus(
            instance_id=f"i{i}", timestamp_ms=int(time.time() * 1000), update_id=1,
            schedulable=True, num_total_gpu_tokens=100_000), None)
    flags = [] if mode == "full" else [
        "--enable-full-mode-scheduling=false", "--llm-backend-discovery", "endpoints",
        "--llm-backend-endpoints", ",".join(f"127.0.0.1:{8000 + i}" for i in range(instances))]
    core = SchedulerCore(load_scheduler_settings(flags, {}), store=store)
    await core.start()
    batch = [ScheduleRequest(id=f"r{k}", prompt_num_tokens=100) for k in range(requests)]
    start = time.process_time()
    if hasattr(core, "schedule_now"):  # as the gateway calls it (older checkouts: awaited)
        for k, request in enumerate(batch):
            core.schedule_now(request)
            if k >= in_flight:  # a gateway with `in_flight` requests outstanding
                core.release_now(batch[k - in_flight])
    else:
        for k, request in enumerate(batch):
            await core.schedule(request)
            if k >= in_flight:
                await core.release(batch[k - in_flight])
    elapsed = time.process_time() - start
    await core.close()
    return elapsed / requests * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("full", "lite"), default="full")
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--in-flight", type=int, default=0,
                   help="requests scheduled and not yet released at any time (a gateway's "
                        "concurrency)")
    args = p.parse_args()
    us = asyncio.run(pair_us(args.mode, args.instances, args.requests, args.in_flight))
    print(f"{args.mode} mode, {args.instances} instances, {args.in_flight} in flight: "
          f"{us:.1f} us per schedule+release")


if __name__ == "__main__":
    main()
