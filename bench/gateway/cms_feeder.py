"""Keeps fake backends alive in a CMS in Redis, as their llumlets would, for full-mode runs.

A full-mode gateway finds instances and their load in the CMS, not from a list of endpoints.
The fake backends have no llumlet, so this process plays one for each: it registers the
instance's `InstanceMetadata` (ip/api_server_port = the fake backend) and then writes a fresh
`InstanceStatus` every `--interval-ms` (upstream's llumlet push interval is 40 ms) with a new
`update_id` and the wall-clock `timestamp_ms`, an idle, schedulable instance with the KV
capacity of one llama3-8b on an H100. The metadata is re-written every 10 s; both keys carry a
TTL so that a killed feeder leaves nothing behind for long. On SIGTERM it deletes its keys.

Run: `python bench/gateway/cms_feeder.py --redis-port 6399 --backend 127.0.0.1:8001 ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time

import uvloop

from prescient.cms.redis_store import RedisStore
from prescient.model import InstanceMetadata, InstanceStatus

KV_TOKENS = 29_205 * 16  # llama3-8b-h100's KV capacity, tokens
TTL_S = 30.0
METADATA_EVERY_S = 10.0


def instance_id(endpoint: str) -> str:
    return "fake-" + endpoint.replace(":", "-")


def metadata(endpoint: str) -> InstanceMetadata:
    host, _, port = endpoint.rpartition(":")
    now = time.time()
    return InstanceMetadata(instance_id=instance_id(endpoint), backend_type="fake", ip=host,
                            ip_kvs=host, api_server_port=int(port), utc_create=now,
                            utc_update=now, max_num_batched_tokens=8192)


def status(endpoint: str, update_id: int) -> InstanceStatus:
    return InstanceStatus(instance_id=instance_id(endpoint), schedulable=True,
                          timestamp_ms=int(time.time() * 1000), step_id=update_id,
                          update_id=update_id, num_total_gpu_tokens=KV_TOKENS)


async def feed(args: argparse.Namespace) -> None:
    store = RedisStore(args.redis_host, args.redis_port, db=args.redis_db)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    update_id, metadata_due = 0, 0.0
    try:
        while not stop.is_set():
            now = loop.time()
            if now >= metadata_due:
                for ep in args.backend:
                    await store.put_metadata(metadata(ep), TTL_S)
                metadata_due = now + METADATA_EVERY_S
            update_id += 1
            for ep in args.backend:
                await store.put_status(status(ep, update_id), TTL_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval_ms / 1000)
    finally:
        for ep in args.backend:
            await store.delete_instance(instance_id(ep))
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--redis-host", default="127.0.0.1")
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--redis-db", type=int, default=0)
    parser.add_argument("--backend", action="append", required=True, help="host:port, repeated")
    parser.add_argument("--interval-ms", type=float, default=40.0, help="status write period")
    args = parser.parse_args()
    uvloop.run(feed(args))


if __name__ == "__main__":
    main()
