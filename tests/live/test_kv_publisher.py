"""The sim-engine's vLLM-style KV-event publisher against the scheduler's subscriber, in one
process over real sockets: real ZMQ (PUB + ROUTER replay), the real HTTP API.

What the router needs from it: block hashes equal to vLLM's hashes of the prompt's token ids,
history published before a subscription recovered through replay, a lost message recovered
through replay, a restarted publisher (sequence back to 0) resynchronised, and the
subscription following the instance set learned from `GET /kv_event_sources`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

pytest.importorskip("zmq")

from prescient.cache.kv_events import KvEventsIndex
from prescient.cache.zmq_events import EngineSource, KvEventsSubscriber
from prescient.config.scheduler import SchedulerSettings
from prescient.config.sim_engine import load_sim_engine_settings
from prescient.errors import ConfigError
from prescient.model import InstanceMetadata, Request
from prescient.policy.cache_aware import PrefixHits, VllmHasher
from prescient.scheduler.cache_wiring import LiveKvEvents
from prescient.simengine.kv_publisher import (
    KvEventPublisher,
    parse_kv_events_config,
)
from prescient.simengine.server import SERVER_KEY, build_app, start_server

from .harness import free_port

MODEL = "prescient-sim"
BS = 16


async def until(check: Callable[[], object], what: str, deadline_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not check():
        assert loop.time() < end, f"waited {deadline_s} s for {what}"
        await asyncio.sleep(0.01)


def router_hashes(ids: list[int]) -> list[Any]:
    """What a scheduler configured like the engine names the prompt's blocks."""
    return VllmHasher("sha256", "0").hashes(
        Request(request_id="q", prompt_len=len(ids), prompt_token_ids=tuple(ids)), BS)


@asynccontextmanager
async def engine(tmp: Path, monkeypatch: pytest.MonkeyPatch, name: str = "e"
                 ) -> AsyncIterator[tuple[str, Any, dict[str, Any]]]:
    """A sim-engine server with KV events on ipc sockets: (url, server, kv_event_sources)."""
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    config = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                         "endpoint": f"ipc://{tmp}/{name}.ipc",
                         "replay_endpoint": f"ipc://{tmp}/{name}-replay.ipc", "topic": "kv"})
    port = free_port()
    settings = load_sim_engine_settings([
        "--host", "127.0.0.1", "--port", str(port), "--time-scale", "50", "--block-size",
        str(BS), "--kv-events-config", config], {})
    app = build_app(settings)
    runner = await start_server(settings, app=app)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http, http.get(url + "/kv_event_sources") as r:
            sources = await r.json()
        yield url, app[SERVER_KEY], sources
    finally:
        await runner.cleanup()


async def complete(url: str, ids: list[int]) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            url + "/v1/completions",
            json={"model": MODEL, "prompt": ids, "max_tokens": 2}) as r:
        assert r.status == 200, await r.text()


def subscriber_of(sources: dict[str, Any], index: KvEventsIndex) -> KvEventsSubscriber:
    rank0 = sources["0"]
    return KvEventsSubscriber(index, [EngineSource("e", rank0["endpoint"],
                                                   rank0["replay_endpoint"], rank0["topic"])])


PROMPT = list(range(1000, 1200))  # 200 tokens: 12 full blocks below the last token


def test_kv_event_sources_answers_vllms_resolved_config(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with engine(tmp_path, monkeypatch) as (_, _, sources):
            assert sources["0"]["endpoint"] == f"ipc://{tmp_path}/e.ipc"
            assert sources["0"]["publisher"] == "zmq" and sources["0"]["buffer_steps"] == 10_000

    asyncio.run(main())


def test_history_before_the_subscription_arrives_by_replay_hashed_as_vllm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with engine(tmp_path, monkeypatch) as (url, server, sources):
            await complete(url, PROMPT)  # published to no one yet
            index = KvEventsIndex()
            sub = subscriber_of(sources, index)
            await sub.start()
            try:
                await until(lambda: index.hit_lengths(router_hashes(PROMPT)), "the replay")
                assert index.hit_lengths(router_hashes(PROMPT)) == {"e": 12}
                assert index.block_size == BS
                # the engine found the same blocks: its own hit counter says so
                await complete(url, PROMPT)
                assert server.metrics.prefix_cache_hits._value.get() == 12 * BS
            finally:
                await sub.close()

    asyncio.run(main())


class LossyPublisher(KvEventPublisher):
    """Loses the batches numbered in `lose` on the PUB socket (they stay in the buffer)."""

    lose: frozenset[int] = frozenset()

    def _send(self, seq: int, payload: bytes) -> None:
        if seq not in self.lose:
            super()._send(seq, payload)


def test_a_lost_batch_is_recovered_by_replay_and_a_restart_resynchronises(
        tmp_path: Path) -> None:
    async def main() -> None:
        pub, rep = f"ipc://{tmp_path}/p.ipc", f"ipc://{tmp_path}/r.ipc"
        config = parse_kv_events_config(json.dumps({
            "enable_kv_cache_events": True, "endpoint": pub, "replay_endpoint": rep}))
        assert config is not None
        publisher = LossyPublisher(config, BS)
        publisher.lose = frozenset({1, 2})
        await publisher.start()
        index = KvEventsIndex()
        sub = KvEventsSubscriber(index, [EngineSource("e", pub, rep)])
        await sub.start()
        try:
            await until(lambda: index.last_seq("e") == -1 and not sub._replays, "subscribed")
            await asyncio.sleep(0.2)  # the SUB socket's connection (slow joiner)
            for h in (1, 2, 3, 4):  # one batch each: seq 0..3, 1 and 2 lost
                publisher.stored(h)
                await asyncio.sleep(0.02)
            await until(lambda: index.expected_seq("e") == 4, "seq 3 and the replayed gap")
            assert index.hit_lengths([1, 2, 3, 4]) == {"e": 4}
            assert index.num_gaps >= 1 and index.num_resyncs == 0
            # the engine restarts: a new publisher on the same sockets, sequence from 0
            await publisher.close()
            publisher = LossyPublisher(config, BS)
            await publisher.start()
            await asyncio.sleep(0.3)  # reconnection
            publisher.stored(9)
            await until(lambda: index.hit_lengths([9]), "the new publisher's block")
            assert index.hit_lengths([1]) == {}, "the old process's cache is gone"
            sub.remove("e")
            assert index.hit_lengths([9]) == {} and index.last_seq("e") is None
        finally:
            await sub.close()
            await publisher.close()

    asyncio.run(main())


def test_the_live_index_follows_the_instance_set_through_kv_event_sources(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with engine(tmp_path, monkeypatch) as (url, _, _):
            port = int(url.rsplit(":", 1)[1])
            settings = SchedulerSettings(enable_cache_aware_scheduling=True,
                                         cache_index="kv-events")
            feature = PrefixHits(source=None)  # type: ignore[arg-type]
            live = LiveKvEvents(settings, feature)
            await live.start()
            try:
                md = InstanceMetadata(instance_id="e", ip="127.0.0.1", api_server_port=port)
                live.on_instances({"e": md})
                await until(lambda: live.subscriber and "e" in live.subscriber.sources,
                            "the subscription")
                await complete(url, PROMPT)
                await until(lambda: live.index.hit_lengths(router_hashes(PROMPT)), "events")
                live.on_instances({})  # the instance left the CMS
                await until(lambda: live.subscriber and not live.subscriber.sources,
                            "the unsubscription")
                assert live.index.hit_lengths(router_hashes(PROMPT)) == {}
            finally:
                await live.close()

    asyncio.run(main())


def test_bad_kv_events_configs_name_the_flag() -> None:
    for bad in ('{"enable_kv_cache_events": "yes"}', '{"endpoint": "localhost:1"}',
                '{"nope": 1}', "{"):
        with pytest.raises(ConfigError, match="--kv-events-config"):
            parse_kv_events_config(bad)
    assert parse_kv_events_config("") is None


def test_an_override_names_the_publisher_without_asking_the_instance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with engine(tmp_path, monkeypatch) as (url, _, sources):
            rank0 = sources["0"]
            settings = SchedulerSettings(
                enable_cache_aware_scheduling=True, cache_index="kv-events",
                kv_events_endpoints=f"e={rank0['endpoint']}|{rank0['replay_endpoint']}")
            live = LiveKvEvents(settings, PrefixHits(source=None))  # type: ignore[arg-type]
            await live.start()
            try:
                # the metadata points nowhere: only the override can find the publisher
                md = InstanceMetadata(instance_id="e", ip="127.0.0.1", api_server_port=1)
                await complete(url, PROMPT)
                live.on_instances({"e": md})
                await until(lambda: live.index.hit_lengths(router_hashes(PROMPT)),
                            "the replayed history through the override")
                assert live.subscriber is not None
                assert live.subscriber.sources["e"].topic == ""  # the override has none
            finally:
                await live.close()

    asyncio.run(main())


def test_an_instance_without_kv_events_is_asked_again_until_it_has_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        monkeypatch.setattr("prescient.scheduler.cache_wiring.RETRY_S", 0.05)
        port = free_port()
        settings = SchedulerSettings(enable_cache_aware_scheduling=True,
                                     cache_index="kv-events")
        live = LiveKvEvents(settings, PrefixHits(source=None))  # type: ignore[arg-type]
        await live.start()
        try:
            md = InstanceMetadata(instance_id="e", ip="127.0.0.1", api_server_port=port)
            live.on_instances({"e": md})  # nothing listens there yet
            await until(lambda: "e" in live._failed, "the failed answer")
            assert live.subscriber is not None and not live.subscriber.sources
            # the engine comes up on that port, publishing: the retry subscribes
            monkeypatch.setenv("PYTHONHASHSEED", "0")
            config = json.dumps({"enable_kv_cache_events": True,
                                 "endpoint": f"ipc://{tmp_path}/late.ipc",
                                 "replay_endpoint": f"ipc://{tmp_path}/late-replay.ipc"})
            runner = await start_server(load_sim_engine_settings([
                "--host", "127.0.0.1", "--port", str(port), "--kv-events-config", config], {}))
            try:
                await until(lambda: "e" in live.subscriber.sources, "the retried subscription")
                assert not live._failed
            finally:
                await runner.cleanup()
        finally:
            await live.close()

    asyncio.run(main())


def test_an_unusable_endpoint_is_reported_and_retried_not_fatal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        monkeypatch.setattr("prescient.scheduler.cache_wiring.RETRY_S", 0.05)
        settings = SchedulerSettings(enable_cache_aware_scheduling=True,
                                     cache_index="kv-events",
                                     kv_events_endpoints="e=nope://x|tcp://127.0.0.1:1")
        live = LiveKvEvents(settings, PrefixHits(source=None))  # type: ignore[arg-type]
        await live.start()
        try:
            md = InstanceMetadata(instance_id="e", ip="127.0.0.1", api_server_port=1)
            live.on_instances({"e": md})
            await until(lambda: "e" in live._failed, "the failed subscription")
            await asyncio.sleep(0.2)  # retried, still failing, still running
            assert live._task is not None and not live._task.done()
            assert live.subscriber is not None and not live.subscriber.sources
        finally:
            await live.close()

    asyncio.run(main())


# vLLM 0.32's own structs (vllm/distributed/kv_events.py, reference/vllm-cpu.md §7): what a
# consumer written against vLLM decodes the batches with
class _VllmEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class _VllmStored(_VllmEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class _VllmRemoved(_VllmEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class _VllmBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[_VllmStored | _VllmRemoved]
    data_parallel_rank: int | None = None


def test_batches_decode_with_vllms_own_structs(tmp_path: Path) -> None:
    async def main() -> None:
        from prescient.simengine.kv_publisher import BlockContent

        pub = f"ipc://{tmp_path}/v.ipc"
        config = parse_kv_events_config(json.dumps({"enable_kv_cache_events": True,
                                                    "endpoint": pub, "topic": "kv@1"}))
        assert config is not None
        content = BlockContent(10)
        content.record([(None, 7, tuple(range(BS))), (7, 8, tuple(range(BS, 2 * BS)))])
        publisher = KvEventPublisher(config, BS, content)
        await publisher.start()
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.connect(pub)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@1")
        try:
            frames: list[bytes] = []
            while not frames:  # slow joiner: publish until one arrives
                publisher.stored(7)
                publisher.stored(8)
                publisher.removed(5)
                with contextlib.suppress(TimeoutError):
                    frames = await asyncio.wait_for(sub.recv_multipart(), 0.1)
            topic, seq, payload = frames
            batch = msgspec.msgpack.decode(payload, type=_VllmBatch)
            stored, removed = batch.events
            assert topic == b"kv@1" and len(seq) == 8 and batch.data_parallel_rank == 0
            assert isinstance(stored, _VllmStored) and isinstance(removed, _VllmRemoved)
            assert stored.block_hashes == [7, 8] and stored.parent_block_hash is None
            assert stored.token_ids == list(range(2 * BS)) and stored.block_size == BS
            assert stored.medium == "GPU" and removed.block_hashes == [5]
        finally:
            sub.close(linger=0)
            ctx.destroy(linger=0)
            await publisher.close()

    asyncio.run(main())
