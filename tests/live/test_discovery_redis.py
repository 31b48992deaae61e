"""Redis discovery against a real Redis: registration, expiry, bad records, outages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import pytest

from prescient.discovery.base import DiscoveredInstance
from prescient.discovery.codec import decode_pod, instance_id, wall_clock_ms
from prescient.discovery.redis import RedisRegistrar, RedisResolver
from prescient.discovery.registrar import DiscoveryError
from prescient.model import InferType

from .discovery_helpers import wait_until
from .harness import RedisTarget, private_redis, shared_redis


def inst(pod: str, rank: int, dp_size: int = 1, port: int | None = None) -> DiscoveredInstance:
    return DiscoveredInstance(instance_id=instance_id(pod, rank), host="127.0.0.1",
                              port=port or 9000 + rank, dp_rank=rank, dp_size=dp_size,
                              model="m", instance_type=InferType.NEUTRAL)


def resolver(target: RedisTarget, **kw: object) -> RedisResolver:
    args: dict[str, object] = {"db": target.db, "refresh_interval_s": 0.05}
    args.update(kw)
    return RedisResolver(target.host, target.port, **args)  # type: ignore[arg-type]


def registrar(target: RedisTarget, pod: str, **kw: object) -> RedisRegistrar:
    return RedisRegistrar(target.host, target.port, pod, db=target.db, **kw)  # type: ignore[arg-type]


async def until_written(write: Callable[[], Awaitable[None]], timeout_s: float = 15.0) -> None:
    """Write until a write succeeds, as a sidecar's next heartbeat would after a failed one."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await write()
        except DiscoveryError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def ids(instances: Sequence[DiscoveredInstance]) -> list[str]:
    return [i.instance_id for i in instances]


def test_registration_appears_and_subscribers_hear_of_it() -> None:
    async def main(target: RedisTarget) -> None:
        res, reg = resolver(target), registrar(target, "pod-a")
        seen: list[list[str]] = []
        res.subscribe(lambda xs: seen.append(ids(xs)))
        await res.start()
        assert res.instances() == [] and seen == [[]]
        await reg.publish([inst("pod-a", 0)])
        await wait_until(lambda: ids(res.instances()) == ["pod-a_dp0"], "pod-a_dp0 registered")
        assert seen[-1] == ["pod-a_dp0"]
        assert res.instances()[0] == inst("pod-a", 0)
        stored = decode_pod(target_get(target, "llumnix:discovery:pod-a"))
        assert stored.pod_name == "pod-a" and stored.instances == (inst("pod-a", 0),)
        assert abs(stored.timestamp_ms - wall_clock_ms()) < 600_000  # a wall-clock stamp
        await reg.close()
        await res.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_two_pods_with_dp_ranks() -> None:
    async def main(target: RedisTarget) -> None:
        res = resolver(target)
        await res.start()
        a, b = registrar(target, "pod-a"), registrar(target, "pod-b")
        await a.publish([inst("pod-a", 0, 2, 9000), inst("pod-a", 1, 2, 9001)])
        await b.publish([inst("pod-b", 0, 1, 9100)])
        await wait_until(lambda: len(res.instances()) == 3, "three instances")
        assert ids(res.instances()) == ["pod-a_dp0", "pod-a_dp1", "pod-b_dp0"]
        assert [(i.port, i.dp_rank, i.dp_size) for i in res.instances()] == [
            (9000, 0, 2), (9001, 1, 2), (9100, 0, 1)]
        await a.publish([inst("pod-a", 1, 2, 9001)])  # rank 0 failed its health check
        await wait_until(lambda: len(res.instances()) == 2, "pod-a_dp0 dropped")
        assert ids(res.instances()) == ["pod-a_dp1", "pod-b_dp0"]
        await b.close()  # a clean stop deletes the record
        await wait_until(lambda: ids(res.instances()) == ["pod-a_dp1"], "pod-b withdrawn")
        assert target.cli("EXISTS", b.key) == "0"
        await a.close()
        await res.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_a_stale_record_is_expired_and_its_key_deleted() -> None:
    async def main(target: RedisTarget) -> None:
        now = wall_clock_ms()
        fresh, stale = registrar(target, "fresh"), registrar(
            target, "stale", wall_ms=lambda: now - 61_000)  # older than the 60 s TTL
        await fresh.publish([inst("fresh", 0)])
        await stale.publish([inst("stale", 0)])
        assert target.cli("EXISTS", stale.key) == "1"
        res = resolver(target, status_ttl_s=60.0)
        await res.start()
        assert ids(res.instances()) == ["fresh_dp0"]
        assert target.cli("EXISTS", stale.key) == "0"
        assert target.cli("EXISTS", fresh.key) == "1"
        for r in (fresh, stale, res):
            await r.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_a_live_pod_stops_heartbeating_and_expires() -> None:
    async def main(target: RedisTarget) -> None:
        clock = [wall_clock_ms()]
        res = resolver(target, status_ttl_s=30.0, wall_ms=lambda: clock[0])
        reg = registrar(target, "pod-a", wall_ms=lambda: clock[0])
        await reg.publish([inst("pod-a", 0)])
        await res.start()
        assert ids(res.instances()) == ["pod-a_dp0"]
        await reg.publish([])  # nothing healthy: nothing written, the record ages
        clock[0] += 29_000
        await res.refresh()
        assert ids(res.instances()) == ["pod-a_dp0"]
        clock[0] += 2_000
        await res.refresh()
        assert res.instances() == []
        assert target.cli("EXISTS", reg.key) == "0"
        await res.close()
        await reg.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def test_expiry_spares_a_record_rewritten_after_the_read() -> None:
    async def main(target: RedisTarget) -> None:
        old_time = wall_clock_ms() - 120_000
        old = registrar(target, "pod-a", wall_ms=lambda: old_time)
        await old.publish([inst("pod-a", 0)])
        old_value = target_get(target, old.key)
        new = registrar(target, "pod-a")
        await new.publish([inst("pod-a", 0)])  # the sidecar came back between read and delete
        res = resolver(target)
        await res._expire(old.key, old_value, decode_pod(old_value), wall_clock_ms())
        assert target.cli("EXISTS", old.key) == "1"
        await res._expire(old.key, target_get(target, old.key), decode_pod(old_value),
                          wall_clock_ms())
        assert target.cli("EXISTS", old.key) == "0"
        for r in (old, new, res):
            await r.close()

    with shared_redis() as target:
        asyncio.run(main(target))


def target_get(target: RedisTarget, key: str) -> bytes:
    import redis

    client = redis.Redis(host=target.host, port=target.port, db=target.db)
    try:
        value = client.get(key)
    finally:
        client.close()
    assert isinstance(value, bytes)
    return value


def test_garbage_and_unusable_records_are_skipped_not_deleted(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main(target: RedisTarget) -> None:
        target.cli("SET", "llumnix:discovery:garbage", "not a protobuf")
        target.cli("SET", "llumnix:other:pod", "ignored: not a discovery key")
        good = registrar(target, "good")
        await good.publish([inst("good", 0)])
        res = resolver(target)
        await res.start()
        for _ in range(3):
            await res.refresh()
        assert ids(res.instances()) == ["good_dp0"]
        assert target.cli("EXISTS", "llumnix:discovery:garbage") == "1"
        await good.close()
        await res.close()

    caplog.set_level(logging.WARNING, logger="prescient.discovery.redis")
    with shared_redis() as target:
        asyncio.run(main(target))
    garbage = [r for r in caplog.records if "llumnix:discovery:garbage" in r.getMessage()]
    assert len(garbage) == 1  # warned once, not on every poll


def test_redis_outage_keeps_the_last_set_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        with private_redis() as server:
            target = server.target
            res = resolver(target, timeout_s=0.5, retry_times=0)
            reg = registrar(target, "pod-a", timeout_s=0.5)  # its retry reconnects
            await reg.publish([inst("pod-a", 0)])
            await res.start()
            assert ids(res.instances()) == ["pod-a_dp0"]
            server.stop()
            for _ in range(3):
                await res.refresh()
            assert ids(res.instances()) == ["pod-a_dp0"]  # kept through the outage
            server.start()  # back, but empty: the sidecar re-registers at its next heartbeat
            await until_written(lambda: reg.publish([inst("pod-a", 0), inst("pod-a", 1)]))
            await wait_until(lambda: len(res.instances()) == 2, "recovery after the outage")
            await reg.close()
            await res.close()

    caplog.set_level(logging.INFO, logger="prescient.discovery.redis")
    asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1


def test_the_discovery_redis_db_flag_reaches_registrar_and_resolver() -> None:
    from prescient.config.scheduler import load_scheduler_settings
    from prescient.discovery.factory import make_registrar, make_resolver

    async def main(target: RedisTarget) -> None:
        settings = load_scheduler_settings([
            "--llm-backend-discovery", "redis", "--discovery-redis-host", target.host,
            "--discovery-redis-port", str(target.port),
            "--discovery-redis-db", str(target.db)], {})
        res, reg = make_resolver(settings), make_registrar(settings, "pod-db")
        await res.start()
        await reg.publish([inst("pod-db", 0)])
        await wait_until(lambda: ids(res.instances()) == ["pod-db_dp0"], "pod-db registered")
        assert decode_pod(target_get(target, "llumnix:discovery:pod-db")).pod_name == "pod-db"
        await reg.close()
        await res.close()

    with shared_redis() as target:
        assert target.db != 0  # the record must land in the chosen database, not the default
        asyncio.run(main(target))
