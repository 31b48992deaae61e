"""etcd discovery against a real etcd: watch, leases (revoke and expiry), re-reads, failover, auth.

Each test uses its own key prefix on one module-wide etcd, so tests cannot see each other's
records; tests that stop etcd or enable auth get an etcd of their own.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from prescient.discovery.base import DiscoveredInstance
from prescient.discovery.codec import instance_id, wall_clock_ms
from prescient.discovery.etcd import EtcdRegistrar, EtcdResolver
from prescient.discovery.etcd_client import EtcdClient, EtcdError

from .discovery_helpers import wait_until
from .etcd_harness import ETCD_BINARY, MISSING_REASON, EtcdServer, etcd_server
from .harness import free_port

pytestmark = pytest.mark.skipif(ETCD_BINARY is None, reason=MISSING_REASON)
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    with etcd_server(tmp_path_factory.mktemp("etcd") / "data") as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"test/{next(_prefixes)}/discovery/"


def inst(pod: str, rank: int, port: int = 9000) -> DiscoveredInstance:
    return DiscoveredInstance(instance_id=instance_id(pod, rank), host="127.0.0.1",
                              port=port + rank, dp_rank=rank, model="m")


def ids(instances: Sequence[DiscoveredInstance]) -> list[str]:
    return [i.instance_id for i in instances]


def keys_under(server: EtcdServer, prefix: str) -> list[str]:
    """Keys under `prefix`, read with plain HTTP (not the code under test)."""
    raw = prefix.encode()
    end = raw[:-1] + bytes([raw[-1] + 1])
    data = server.call("/v3/kv/range", {"key": base64.b64encode(raw).decode(),
                                        "range_end": base64.b64encode(end).decode()})
    kvs = data.get("kvs", [])
    assert isinstance(kvs, list)
    return [base64.b64decode(kv["key"]).decode() for kv in kvs]


def test_registration_reaches_a_running_resolver_through_the_watch(
        etcd: EtcdServer, prefix: str) -> None:
    async def main() -> None:
        res = EtcdResolver([etcd.endpoint], prefix=prefix)  # re-read only after an hour
        seen: list[list[str]] = []
        res.subscribe(lambda xs: seen.append(ids(xs)))
        await res.start()
        assert res.instances() == []
        reg = EtcdRegistrar([etcd.endpoint], "pod-a", prefix=prefix)
        await reg.publish([inst("pod-a", 0), inst("pod-a", 1)])
        await wait_until(lambda: len(res.instances()) == 2, "both ranks via the watch")
        assert ids(res.instances()) == ["pod-a_dp0", "pod-a_dp1"]
        assert res.instances()[1] == inst("pod-a", 1)
        assert seen[-1] == ["pod-a_dp0", "pod-a_dp1"]
        await reg.publish([inst("pod-a", 1)])  # rank 0 turned unhealthy
        await wait_until(lambda: ids(res.instances()) == ["pod-a_dp1"], "rank 0 dropped")
        await reg.close()
        await res.close()

    asyncio.run(main())


def test_closing_the_registrar_revokes_its_lease(etcd: EtcdServer, prefix: str) -> None:
    async def main() -> None:
        reg = EtcdRegistrar([etcd.endpoint], "pod-a", prefix=prefix, lease_ttl_s=600)
        await reg.publish([inst("pod-a", 0)])
        res = EtcdResolver([etcd.endpoint], prefix=prefix)
        await res.start()
        assert ids(res.instances()) == ["pod-a_dp0"]  # the initial read
        await reg.close()  # far before the 600 s TTL: only a revoke removes the key
        await wait_until(lambda: res.instances() == [], "pod-a dropped via the watch")
        assert keys_under(etcd, prefix) == []
        await res.close()

    asyncio.run(main())


def test_a_registrar_that_stops_keeping_alive_expires(etcd: EtcdServer, prefix: str) -> None:
    async def main() -> None:
        res = EtcdResolver([etcd.endpoint], prefix=prefix)
        await res.start()
        reg = EtcdRegistrar([etcd.endpoint], "pod-a", prefix=prefix, lease_ttl_s=2)
        await reg.publish([inst("pod-a", 0)])
        await wait_until(lambda: len(res.instances()) == 1, "pod-a registered")
        lease = reg.lease
        await asyncio.sleep(2.5)  # past the TTL: the keep-alive (every TTL/3) holds it
        assert ids(res.instances()) == ["pod-a_dp0"] and reg.lease == lease
        await reg.publish([])  # nothing healthy: keep-alives stop, the lease runs out
        await wait_until(lambda: res.instances() == [], "pod-a expired with its lease")
        assert keys_under(etcd, prefix) == []
        await reg.publish([inst("pod-a", 0)])  # healthy again: a new lease
        await wait_until(lambda: len(res.instances()) == 1, "pod-a back")
        assert reg.lease != lease
        await reg.close()
        await res.close()

    asyncio.run(main())


def test_the_periodic_reread_drops_records_older_than_the_lease_ttl(
        etcd: EtcdServer, prefix: str) -> None:
    async def main() -> None:
        clock = [wall_clock_ms()]
        res = EtcdResolver([etcd.endpoint], prefix=prefix, lease_ttl_s=60,
                           refresh_interval_s=0.2, wall_ms=lambda: clock[0])
        reg = EtcdRegistrar([etcd.endpoint], "pod-a", prefix=prefix, lease_ttl_s=600)
        await reg.publish([inst("pod-a", 0)])
        await res.start()
        assert len(res.instances()) == 1
        # The sidecar keeps its lease but stops writing: no etcd event will ever come.
        clock[0] += 61_000
        await wait_until(lambda: res.instances() == [], "the re-read to drop the stale pod")
        assert len(keys_under(etcd, prefix)) == 1  # still in etcd: only ignored
        await reg.close()
        await res.close()

    asyncio.run(main())


def test_initial_read_skips_garbage_and_failover_past_a_dead_endpoint(
        etcd: EtcdServer, prefix: str) -> None:
    async def main() -> None:
        dead = f"127.0.0.1:{free_port()}"
        client = EtcdClient([etcd.endpoint])
        await client.put(prefix + "garbage", b"not a protobuf")
        await client.close()
        reg = EtcdRegistrar([dead, etcd.endpoint], "pod-b", prefix=prefix, dial_timeout_s=1)
        await reg.publish([inst("pod-b", 0)])
        res = EtcdResolver([dead, etcd.endpoint], prefix=prefix, dial_timeout_s=1)
        await res.start()
        assert ids(res.instances()) == ["pod-b_dp0"]
        await reg.close()
        await wait_until(lambda: res.instances() == [], "revoke seen via the watch")
        await res.close()

    asyncio.run(main())


def test_etcd_outage_keeps_the_last_set_and_recovers(tmp_path: Path) -> None:
    async def main(server: EtcdServer) -> None:
        reg = EtcdRegistrar([server.endpoint], "pod-a", lease_ttl_s=600, dial_timeout_s=1)
        await reg.publish([inst("pod-a", 0)])
        res = EtcdResolver([server.endpoint], dial_timeout_s=1)
        await res.start()
        server.stop()
        assert await res.refresh() is False
        assert ids(res.instances()) == ["pod-a_dp0"]
        with pytest.raises(EtcdError, match="no endpoint answered"):
            await reg.publish([inst("pod-a", 0)])
        server.start()  # same data: the key and its lease survived
        await reg.publish([inst("pod-a", 0), inst("pod-a", 1)])
        await wait_until(lambda: len(res.instances()) == 2, "the watch to resume")
        await reg.close()
        await wait_until(lambda: res.instances() == [], "revoke after recovery")
        await res.close()

    with etcd_server(tmp_path / "data") as server:
        asyncio.run(main(server))


def test_authentication(tmp_path: Path) -> None:
    async def main(server: EtcdServer) -> None:
        res = EtcdResolver([server.endpoint], username="root", password="pw")
        await res.start()
        reg = EtcdRegistrar([server.endpoint], "pod-a", username="root", password="pw")
        await reg.publish([inst("pod-a", 0)])
        await wait_until(lambda: len(res.instances()) == 1, "an authenticated registration")
        anonymous = EtcdClient([server.endpoint])
        with pytest.raises(EtcdError):
            await anonymous.range_prefix("llumnix/discovery/")
        await anonymous.close()
        await reg.close()
        await wait_until(lambda: res.instances() == [], "an authenticated revoke")
        await res.close()

    with etcd_server(tmp_path / "data") as server:
        server.call("/v3/auth/role/add", {"name": "root"})
        server.call("/v3/auth/user/add", {"name": "root", "password": "pw"})
        server.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        server.call("/v3/auth/enable", {})
        asyncio.run(main(server))
