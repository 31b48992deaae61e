"""`prescient llumlet`: put a stock vLLM or SGLang server in the CMS, beside it, unpatched.

Upstream's llumlet lives inside a patched engine, which pushes a status at every step. A stock
engine pushes nothing, so this llumlet pulls a status from a `MetricsScrapeSource` every time
`engine_timeout_s` passes in silence, with `engine_timeout_s` set to `--scrape-interval-ms`.
That is the llumlet's own fallback path, so everything it guarantees holds here too: one write
per scrape, the heartbeat, the TTL, and when a scrape fails, a keepalive with
`schedulable=false` until one succeeds again. (A separate scrape loop calling `push()` would
re-implement that failure path beside it.)

With `--status-endpoint`, a vLLM running Prescient's stat-logger plugin (integrations/vllm)
pushes its status at every step: the llumlet is then in upstream's push mode while the engine
works, and scrapes only when it has been silent for an interval (an idle vLLM runs no steps).
Pushed and scraped statuses draw `update_id` from one counter, so the reader sees one sequence.

A pull is tried once (`source_tries=1`): the next attempt is one interval away anyway, and an
engine that does not answer is unschedulable at once instead of after retries and backoffs.

A scraped status carries what `/metrics` shows: running and waiting requests, and KV usage in
tokens. It has no request ids, step ids or prefill token counts (the scheduler's local account
keeps a dispatch until `--request-local-account-staleness-seconds`; see the scheduler's docs);
a pushed one has them (`prescient_vllm.status` says from where).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
from collections.abc import Mapping

import zmq

from prescient import service
from prescient.cms.redis_store import RedisStore
from prescient.config.llumlet import BACKEND_NAMES, DESCRIPTION, LlumletSettings, llumlet_parser
from prescient.errors import ConfigError
from prescient.llumlet.agent import Llumlet
from prescient.llumlet.push import StatusReceiver
from prescient.llumlet.sources import MetricsScrapeSource
from prescient.model import InferType, InstanceMetadata, InstanceStatus

log = logging.getLogger("prescient.llumlet")

TICK_S = 0.04  # the llumlet's loop period (upstream's push interval), or the scrape's if shorter


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `llumlet` (every `LlumletSettings` flag plus `--print-config`) to `sub`."""
    service.add_service_parser(
        sub, "llumlet", help="register a stock vLLM or SGLang server in the CMS (status "
        "scraped from its /metrics)", description=DESCRIPTION,
        usage="prescient llumlet [options]", add_flags=llumlet_parser)


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Run until SIGTERM/SIGINT (or print the settings); returns the exit status.

    Raises:
        ConfigError: a bad flag, env var or config-file value (named).
    """
    settings = service.resolve_settings(LlumletSettings, args, env)
    if settings is not None:
        service.run_until_signalled(lambda stop: run_until_signalled(settings, stop))
    return 0


def metadata(settings: LlumletSettings) -> InstanceMetadata:
    """The instance as the CMS registers it."""
    iid, host = settings.resolved_instance_id, settings.resolved_advertise_host
    return InstanceMetadata(
        instance_id=iid, instance_type=InferType(settings.instance_type),
        backend_type=BACKEND_NAMES[settings.backend_type], ip=host, ip_kvs=host,
        api_server_port=settings.resolved_api_server_port, unit_id=iid,
        block_size=settings.resolved_block_size, max_num_seqs=settings.max_num_seqs)


def make_llumlet(settings: LlumletSettings, store: RedisStore,
                 source: MetricsScrapeSource) -> Llumlet:
    """A `Llumlet` in pull mode: one scrape per `--scrape-interval-ms`, tried once."""
    interval_s = settings.scrape_interval_ms / 1000
    timeout_s = settings.scrape_timeout_ms / 1000
    return Llumlet(
        store, metadata(settings), source=source, push_interval_s=min(TICK_S, interval_s),
        metadata_interval_s=settings.llumlet_metadata_push_interval_s,
        ttl_s=settings.cms_ttl_s or None, engine_timeout_s=interval_s, source_tries=1,
        source_backoff_s=0.0, source_timeout_s=timeout_s)


async def run_until_signalled(settings: LlumletSettings, stop: asyncio.Event) -> None:
    """Register and write statuses until `stop` is set; then delete the instance's keys."""
    s = settings
    store = RedisStore(s.cms_redis_host, s.cms_redis_port, db=s.cms_redis_db,
                       username=s.cms_redis_username, password=s.cms_redis_password)
    update_ids = itertools.count(1)
    source = MetricsScrapeSource(s.metrics_url, s.resolved_instance_id,
                                 num_total_gpu_tokens=s.num_gpu_tokens or None,
                                 timeout_s=s.scrape_timeout_ms / 1000, update_ids=update_ids)
    llumlet = make_llumlet(s, store, source)
    receiver = None
    if s.status_endpoint:
        def on_status(status: InstanceStatus) -> None:
            status.update_id = next(update_ids)
            llumlet.push(status)

        try:
            receiver = StatusReceiver(s.status_endpoint, on_status)
        except zmq.ZMQError as e:
            raise ConfigError(f"--status-endpoint {s.status_endpoint}: {e}") from None
    tasks = [asyncio.create_task(llumlet.run(), name="llumlet")]
    if receiver is not None:
        tasks.append(asyncio.create_task(receiver.run(), name="llumlet-status-receiver"))
        log.info("llumlet %s: receiving pushed statuses at %s", s.resolved_instance_id,
                 s.status_endpoint)
    log.info("llumlet %s: %s %s at %s:%d, scraping %s every %d ms into the CMS at %s:%d/%d",
             s.resolved_instance_id, s.backend_type, s.instance_type, s.resolved_advertise_host,
             s.resolved_api_server_port, s.metrics_url, s.scrape_interval_ms, s.cms_redis_host,
             s.cms_redis_port, s.cms_redis_db)
    stopped = asyncio.create_task(stop.wait())
    try:
        # the llumlet survives store and engine failures; if it ever ends, so does the command
        await asyncio.wait((*tasks, stopped), return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                task.result()  # raises what ended it
    finally:
        for task in (stopped, *tasks[1:]):
            task.cancel()
        await asyncio.gather(stopped, *tasks[1:], return_exceptions=True)
        await llumlet.stop()  # deletes both keys
        await source.close()
        await store.close()
        log.info("llumlet %s stopped", s.resolved_instance_id)
