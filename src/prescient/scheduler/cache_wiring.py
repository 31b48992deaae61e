"""The live scheduler's cache-aware index: engine KV events or a KV store's metadata service.

`make_live_cache(settings, dispatcher)` swaps the cache-aware feature's hit source (the router's
own history by default, `--cache-index approximate`) for:

- `kv-events` (`LiveKvEvents`): a `KvEventsIndex` fed by a ZMQ subscription to every instance's
  KV-event publisher. An instance's publisher is learned from the instance itself, `GET
  http://<ip>:<api_server_port>/kv_event_sources` (vLLM's answer: per DP rank `{"endpoint",
  "replay_endpoint", "topic"}`; a `*` or wildcard host means the instance's own ip), when the
  instance appears in the CMS, or given by `--kv-events-endpoints`. An instance that leaves is
  unsubscribed and its blocks dropped; one whose answer fails is asked again every few
  seconds. Requests are hashed as vLLM hashes them (`--prefix-caching-hash-algo`,
  `--prefix-caching-hash-seed`, the block size from the events), lazily: a lookup hashes only
  as far as some instance holds the prefix.
- `mooncake` (`LiveMooncake`): before each cache-aware dispatch, the prompt's chunk keys go to
  the metadata service (`--kvs-*`); its answer is handed to the dispatcher as prefetched hits.
  This is the one index that costs a network round trip per request, as upstream's.

Instance-set changes arrive through `on_instances` (the CMS reader's metadata poll): a key-set
comparison there, and all I/O in a background task, so dispatch pays nothing for the wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import zmq

from prescient.cache.hashing import HashMemo
from prescient.cache.kv_events import KvEventsIndex
from prescient.config.scheduler import parse_kv_events_endpoints
from prescient.model import InstanceMetadata, Request
from prescient.policy.cache_aware import IndexHits, PrefetchedHits, PrefixHits, VllmHasher
from prescient.tasks import cancel_and_wait

if TYPE_CHECKING:
    from prescient.cache.mooncake import MooncakeIndex
    from prescient.cache.zmq_events import EngineSource, KvEventsSubscriber
    from prescient.config.scheduler import SchedulerSettings
    from prescient.policy.dispatcher import Dispatcher

_log = logging.getLogger(__name__)
SOURCES_PATH = "/kv_event_sources"
RETRY_S = 5.0  # an instance whose /kv_event_sources failed is asked again this often
FETCH_TIMEOUT_S = 3.0
_WILDCARD_HOST = re.compile(r"^(tcp://)(\*|0\.0\.0\.0|\[::\]|::)(:\d+)$")


def prefix_feature(dispatcher: Dispatcher) -> PrefixHits | None:
    for feature in dispatcher.features:
        if isinstance(feature, PrefixHits):
            return feature
    return None


def make_live_cache(settings: SchedulerSettings, dispatcher: Dispatcher
                    ) -> LiveKvEvents | LiveMooncake | None:
    """The live index `--cache-index` names, wired into the dispatcher; None for the router's
    history (nothing live to run) or when the policy is not cache-aware."""
    feature = prefix_feature(dispatcher)
    if feature is None or settings.cache_index == "approximate":
        return None
    if settings.cache_index == "kv-events":
        return LiveKvEvents(settings, feature)
    return LiveMooncake(settings, feature)


def resolve_endpoint(endpoint: str, host: str) -> str:
    """A publisher's endpoint as a subscriber elsewhere connects to it: a wildcard bind host
    (`tcp://*:5557`) becomes the instance's `host`; ipc and concrete hosts are kept."""
    match = _WILDCARD_HOST.match(endpoint)
    if match is None:
        return endpoint
    return f"{match.group(1)}{host}{match.group(3)}"


def parse_sources(body: Any, md: InstanceMetadata) -> EngineSource:
    """The instance's publisher from its `/kv_event_sources` answer (its own DP rank's entry).

    Raises:
        ValueError: the answer has no usable entry (the message says why).
    """
    from prescient.cache.zmq_events import EngineSource

    if not isinstance(body, dict) or not body:
        raise ValueError(f"expected a non-empty object keyed by DP rank, got {body!r:.200}")
    entry = body.get(str(md.dp_rank)) if len(body) > 1 else next(iter(body.values()))
    if not isinstance(entry, dict) or not isinstance(entry.get("endpoint"), str):
        raise ValueError(f"no endpoint for DP rank {md.dp_rank} in {body!r:.200}")
    replay = entry.get("replay_endpoint")
    return EngineSource(
        md.instance_id, resolve_endpoint(entry["endpoint"], md.ip),
        resolve_endpoint(replay, md.ip) if isinstance(replay, str) and replay else None,
        str(entry.get("topic") or ""))


class LiveKvEvents:
    """The `kv-events` index of a live scheduler: subscriptions follow the instance set."""

    def __init__(self, settings: SchedulerSettings, feature: PrefixHits) -> None:
        self.index = KvEventsIndex(settings.cache_index_max_blocks)
        self.overrides = parse_kv_events_endpoints(settings.kv_events_endpoints)
        hasher = VllmHasher(settings.prefix_caching_hash_algo, settings.prefix_caching_hash_seed,
                            memo=HashMemo())
        hasher.hashes(Request(request_id="check", prompt_len=3, prompt_token_ids=(1, 2, 3)),
                      1)  # fails now, naming the flag, if the algorithm needs xxhash
        feature.source = IndexHits(
            self.index, hasher, block_size=settings.prefix_caching_block_size or None,
            lazy=True, learned_block_size=lambda: self.index.block_size)
        self.subscriber: KvEventsSubscriber | None = None
        self._wanted: dict[str, InstanceMetadata] = {}
        self._failed: set[str] = set()
        self._used: dict[str, InstanceMetadata] = {}  # the metadata each subscription came from
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    # ---- fed by the CMS reader (synchronous, cheap) --------------------------------------------

    def on_instances(self, metadata: Mapping[str, InstanceMetadata]) -> None:
        """The CMS's instance set now; subscriptions catch up in the background."""
        wanted = self._wanted
        if metadata.keys() == wanted.keys() and all(
                _same_endpoint(md, wanted[iid]) for iid, md in metadata.items()):
            return
        self._wanted = dict(metadata)
        self._changed.set()

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        from prescient.cache.zmq_events import KvEventsSubscriber

        if self._task is not None:
            return
        self.subscriber = KvEventsSubscriber(self.index)
        await self.subscriber.start()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
            total=FETCH_TIMEOUT_S))
        self._task = asyncio.create_task(self._run(), name="prescient-kv-events")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        if self.subscriber is not None:
            await self.subscriber.close()
            self.subscriber = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            try:
                await self._reconcile()
            except Exception:  # a bug here must not end the subscriptions' upkeep
                _log.exception("KV events: updating the subscriptions failed; retrying")
                self._failed.update(self._wanted)
            timeout = RETRY_S if self._failed else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def _reconcile(self) -> None:
        subscriber = self.subscriber
        assert subscriber is not None
        wanted = self._wanted
        for iid in [i for i in subscriber.sources if i not in wanted]:
            subscriber.remove(iid)
            self._used.pop(iid, None)
            _log.info("KV events of %s: instance left; unsubscribed", iid)
        self._failed &= wanted.keys()
        used = self._used
        todo = [md for iid, md in wanted.items()
                if iid not in subscriber.sources or iid in self._failed
                or not _same_endpoint(used[iid], md)]
        found = await asyncio.gather(*(self._source(md) for md in todo))
        for md, source in zip(todo, found, strict=True):
            if md.instance_id not in self._wanted:
                continue  # left while we asked
            if source is None:
                self._failed.add(md.instance_id)
            else:
                try:
                    subscriber.add(source)
                except zmq.ZMQError as e:
                    if md.instance_id not in self._failed:
                        _log.warning("KV events of %s: cannot subscribe to %s (%s)",
                                     md.instance_id, source.endpoint, e)
                    self._failed.add(md.instance_id)
                    continue
                self._failed.discard(md.instance_id)
                self._used[md.instance_id] = md

    async def _source(self, md: InstanceMetadata) -> EngineSource | None:
        """The instance's publisher: the override, else its own `/kv_event_sources`."""
        from prescient.cache.zmq_events import EngineSource

        override = self.overrides.get(md.instance_id)
        if override is not None:
            return EngineSource(md.instance_id, override[0], override[1])
        url = f"http://{md.ip}:{md.api_server_port}{SOURCES_PATH}"
        assert self._session is not None
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                return parse_sources(await resp.json(content_type=None), md)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            if md.instance_id not in self._failed:  # say it once per outage
                _log.warning("KV events of %s: GET %s failed (%s); asking again every %g s "
                             "(is the engine started with --kv-events-config?)",
                             md.instance_id, url, e or type(e).__name__, RETRY_S)
            return None


def _same_endpoint(a: InstanceMetadata, b: InstanceMetadata) -> bool:
    return a.ip == b.ip and a.api_server_port == b.api_server_port and a.dp_rank == b.dp_rank


class LiveMooncake:
    """The `mooncake` index of a live scheduler: prefetched hits from the metadata service."""

    def __init__(self, settings: SchedulerSettings, feature: PrefixHits) -> None:
        from prescient.cache.mooncake import MooncakeClient, MooncakeIndex

        s = settings
        if s.kvs_backend != "mooncake":
            from prescient.errors import ConfigError

            raise ConfigError(f"--cache-index mooncake needs --kvs-backend mooncake, not "
                              f"{s.kvs_backend!r}")
        client = MooncakeClient(
            s.kvs_metadata_service_http_server_host, s.kvs_metadata_service_http_server_port,
            retry_times=s.kvs_retry_times, retry_interval_ms=s.kvs_retry_interval_ms,
            down_duration_s=s.kvs_metadata_service_down_duration_s)
        self.index: MooncakeIndex = MooncakeIndex(
            client, chunk_size=s.kvs_chunk_size, algo=s.kvs_hash_algo,
            save_unfull_chunk=s.kvs_enable_save_unfull_chunk, seed=s.kvs_hash_seed,
            iris_meta_prefix=s.kvs_iris_meta_prefix, vllm_block_prefix=s.kvs_vllm_block_prefix)
        self.hits = PrefetchedHits()
        self.min_tokens = feature.min_tokens
        feature.source = self.hits
        self._metadata: dict[str, InstanceMetadata] = {}

    def on_instances(self, metadata: Mapping[str, InstanceMetadata]) -> None:
        self._metadata = dict(metadata)

    async def prefetch(self, request: Request) -> None:
        """Ask the metadata service who holds `request`'s chunks (nothing when it is down)."""
        tokens = request.prompt_token_ids
        if tokens is None or request.prompt_len < self.min_tokens:
            return
        self.hits.put(request.request_id,
                      await self.index.instance_hits(tokens, self._metadata))

    async def start(self) -> None:
        """Nothing runs in the background: the client connects on the first query."""

    async def close(self) -> None:
        await self.index.client.close()
