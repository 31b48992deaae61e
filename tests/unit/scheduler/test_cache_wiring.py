"""The live scheduler's cache index wiring: publishers found from `/kv_event_sources`
answers, and `--cache-index` choosing the dispatcher's hit source."""

from __future__ import annotations

import random

import pytest

from prescient.cache.kv_events import KvEventsIndex
from prescient.config.scheduler import SchedulerSettings
from prescient.model import InstanceMetadata, Request
from prescient.policy.cache_aware import IndexHits, PrefetchedHits, PrefixHits, VllmHasher
from prescient.policy.registry import make_dispatcher
from prescient.scheduler.cache_wiring import (
    LiveKvEvents,
    LiveMooncake,
    make_live_cache,
    parse_sources,
    prefix_feature,
    resolve_endpoint,
)

MD = InstanceMetadata(instance_id="i0", ip="10.0.0.5", api_server_port=8000)


@pytest.mark.parametrize(("endpoint", "resolved"), [
    ("tcp://*:5557", "tcp://10.0.0.5:5557"),
    ("tcp://0.0.0.0:5557", "tcp://10.0.0.5:5557"),
    ("tcp://[::]:5557", "tcp://10.0.0.5:5557"),
    ("tcp://10.0.0.9:5557", "tcp://10.0.0.9:5557"),
    ("ipc:///tmp/kv-8102.ipc", "ipc:///tmp/kv-8102.ipc"),
])
def test_a_wildcard_bind_host_becomes_the_instance_ip(endpoint: str, resolved: str) -> None:
    assert resolve_endpoint(endpoint, "10.0.0.5") == resolved


def test_sources_take_the_instances_dp_rank_entry() -> None:
    body = {"0": {"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558",
                  "topic": "kv@8000"},
            "1": {"endpoint": "tcp://*:5567", "replay_endpoint": None}}
    source = parse_sources(body, MD)
    assert (source.endpoint, source.replay_endpoint, source.topic) == (
        "tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558", "kv@8000")
    rank1 = InstanceMetadata(instance_id="i1", ip="10.0.0.5", dp_rank=1)
    assert parse_sources(body, rank1).endpoint == "tcp://10.0.0.5:5567"
    assert parse_sources(body, rank1).replay_endpoint is None
    # one entry: whatever its key (an engine's only rank)
    assert parse_sources({"3": body["0"]}, MD).endpoint == "tcp://10.0.0.5:5557"


@pytest.mark.parametrize("body", [{}, [], {"0": {"replay_endpoint": "tcp://*:1"}},
                                  {"0": {"endpoint": 5}}, {"5": {}, "6": {}}])
def test_unusable_sources_raise_value_error(body: object) -> None:
    with pytest.raises(ValueError):
        parse_sources(body, MD)


def dispatcher_of(settings: SchedulerSettings):  # type: ignore[no-untyped-def]
    return make_dispatcher("load-balance", settings, random.Random(0))


def test_the_router_history_and_non_cache_runs_wire_nothing_live() -> None:
    assert make_live_cache(SchedulerSettings(), dispatcher_of(SchedulerSettings())) is None
    on = SchedulerSettings(enable_cache_aware_scheduling=True)
    assert make_live_cache(on, dispatcher_of(on)) is None


def test_kv_events_swaps_in_a_lazy_vllm_hashed_events_index() -> None:
    s = SchedulerSettings(enable_cache_aware_scheduling=True, cache_index="kv-events",
                          prefix_caching_hash_algo="sha256_cbor", prefix_caching_hash_seed="7",
                          cache_aware_scheduling_min_tokens=0)
    d = dispatcher_of(s)
    live = make_live_cache(s, d)
    assert isinstance(live, LiveKvEvents)
    feature = prefix_feature(d)
    assert feature is not None and isinstance(feature.source, IndexHits)
    assert feature.source.index is live.index and isinstance(live.index, KvEventsIndex)
    # hits come from the events' blocks, named as vLLM names them; block size from events
    tokens = tuple(range(100, 165))
    hashes = VllmHasher("sha256_cbor", "7").hashes(
        Request(request_id="r", prompt_len=65, prompt_token_ids=tokens), 32)
    assert len(hashes) == 2
    live.index.start_instance("i0")
    from prescient.cache.kv_events import BlockStored

    live.index.apply_events("i0", [BlockStored(block_hashes=(hashes[0],), block_size=32)])
    d.on_instances({"i0": InstanceMetadata(instance_id="i0", block_size=16)}, 0.0)
    hits = feature.source.hits(Request(request_id="q", prompt_len=65, prompt_token_ids=tokens),
                               d.state, 0.0)
    assert hits == {"i0": 32}


def test_mooncake_swaps_in_prefetched_hits() -> None:
    s = SchedulerSettings(enable_cache_aware_scheduling=True, cache_index="mooncake")
    d = dispatcher_of(s)
    live = make_live_cache(s, d)
    assert isinstance(live, LiveMooncake)
    feature = prefix_feature(d)
    assert isinstance(feature, PrefixHits) and isinstance(feature.source, PrefetchedHits)
