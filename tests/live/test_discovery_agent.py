"""`prescient discovery-agent` end to end: real engines' /health, real Redis and etcd, real
processes for the shutdown paths (SIGTERM withdraws the pod, SIGKILL leaves it to the TTL)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from prescient.discovery.agent import DiscoveryAgent, engine_targets
from prescient.discovery.base import DiscoveredInstance
from prescient.discovery.etcd import EtcdResolver
from prescient.discovery.redis import RedisRegistrar, RedisResolver
from prescient.discovery.settings import load_agent_settings

from .discovery_helpers import HealthEngine, wait_until
from .etcd_harness import ETCD_BINARY, MISSING_REASON, EtcdServer, etcd_server
from .harness import RedisTarget, shared_redis


def ids(instances: Sequence[DiscoveredInstance]) -> list[str]:
    return [i.instance_id for i in instances]


def redis_flags(target: RedisTarget) -> list[str]:
    # The agent has no database flag (nor has upstream's sidecar): a CLI agent writes to db 0
    # of the shared Redis, which other tests may use too, so pod names are unique and the
    # assertions look only at their own pod.
    return ["--llm-backend-discovery", "redis", "--discovery-redis-host", target.host,
            "--discovery-redis-port", str(target.port)]


def test_only_healthy_engines_are_registered_and_an_unhealthy_one_ages_out() -> None:
    async def main(target: RedisTarget) -> None:
        healthy, sick = HealthEngine(True), HealthEngine(False)
        await healthy.start()
        await sick.start()
        pod = f"agent-{os.getpid()}-a"
        settings = load_agent_settings(
            ["--pod-name", pod, "--engine-endpoints", f"{sick.endpoint},{healthy.endpoint}",
             "--heartbeat-interval-s", "0.1", "--model", "m", *redis_flags(target)], {})
        registrar = RedisRegistrar(target.host, target.port, pod, db=target.db)
        agent = DiscoveryAgent(registrar, engine_targets(settings), health_timeout_s=2,
                               heartbeat_interval_s=settings.heartbeat_interval_s)
        res = RedisResolver(target.host, target.port, db=target.db, refresh_interval_s=0.05,
                            status_ttl_s=1.0)
        await res.start()
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))
        try:
            await wait_until(lambda: len(res.instances()) == 1, "the healthy engine registered")
            [registered] = res.instances()
            assert (registered.instance_id, registered.port) == (f"{pod}_dp1", healthy.port)
            assert (registered.dp_rank, registered.dp_size, registered.model) == (1, 2, "m")
            assert sick.checks > 0  # it was asked, and refused
            healthy.healthy = False  # now nothing is healthy: the agent writes nothing
            await wait_until(lambda: res.instances() == [], "the stale record to expire")
            assert target.cli("EXISTS", f"llumnix:discovery:{pod}") == "0"  # deleted on expiry
            sick.healthy = True  # rank 0 recovers
            await wait_until(lambda: ids(res.instances()) == [f"{pod}_dp0"], "rank 0 back")
        finally:
            stop.set()
            await running
            await agent.close()
            await res.close()
            await healthy.stop()
            await sick.stop()

    with shared_redis() as target:
        asyncio.run(main(target))


async def start_agent(flags: list[str], log: Path) -> asyncio.subprocess.Process:
    """The agent as its own process (`python -m prescient.discovery`, i.e. the subcommand)."""
    with open(log, "wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "prescient.discovery", *flags, stdout=out,
            stderr=asyncio.subprocess.STDOUT)


def test_cli_agent_on_redis_withdraws_its_pod_on_sigterm(tmp_path: Path) -> None:
    async def main(target: RedisTarget) -> None:
        engine = HealthEngine()
        await engine.start()
        pod = f"agent-{os.getpid()}-b"
        res = RedisResolver(target.host, target.port, refresh_interval_s=0.05)
        await res.start()
        proc = await start_agent(["--pod-name", pod, "--engine-endpoints", engine.endpoint,
                                  "--heartbeat-interval-s", "0.2", *redis_flags(target)],
                                 tmp_path / "agent.log")
        try:
            await wait_until(lambda: f"{pod}_dp0" in ids(res.instances()),
                             "the agent's registration", timeout_s=30)
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            # Gone before any TTL could remove it (status TTL 60 s): the agent deleted it.
            assert target.cli("-n", "0", "EXISTS", f"llumnix:discovery:{pod}") == "0"
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            target.cli("-n", "0", "DEL", f"llumnix:discovery:{pod}")
            await res.close()
            await engine.stop()

    with shared_redis() as target:
        asyncio.run(main(target))
    assert "registering in redis" in (tmp_path / "agent.log").read_text()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    if ETCD_BINARY is None:
        pytest.skip(MISSING_REASON)
    with etcd_server(tmp_path / "etcd") as server:
        yield server


def test_cli_agent_on_etcd_sigterm_revokes_and_sigkill_expires(
        etcd: EtcdServer, tmp_path: Path) -> None:
    async def main() -> None:
        engine = HealthEngine()
        await engine.start()
        res = EtcdResolver([etcd.endpoint])  # watch only: no periodic re-read in this test
        await res.start()

        def flags(pod: str, ttl: int) -> list[str]:
            return ["--pod-name", pod, "--engine-endpoints", engine.endpoint,
                    "--heartbeat-interval-s", "0.2", "--llm-backend-discovery", "etcd",
                    "--discovery-etcd-endpoints", etcd.endpoint,
                    "--discovery-etcd-lease-ttl", str(ttl)]

        procs = []
        try:
            # SIGTERM: the lease (600 s) is revoked, the watch sees the delete.
            procs.append(await start_agent(flags("clean", 600), tmp_path / "clean.log"))
            await wait_until(lambda: ids(res.instances()) == ["clean_dp0"], "clean registered",
                             timeout_s=30)
            procs[-1].send_signal(signal.SIGTERM)
            assert await procs[-1].wait() == 0
            await wait_until(lambda: res.instances() == [], "the revoke")
            # SIGKILL: nobody revokes; the 2 s lease runs out without keep-alives.
            procs.append(await start_agent(flags("killed", 2), tmp_path / "killed.log"))
            await wait_until(lambda: ids(res.instances()) == ["killed_dp0"],
                             "killed registered", timeout_s=30)
            procs[-1].kill()
            await procs[-1].wait()
            await wait_until(lambda: res.instances() == [], "the lease to expire")
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await res.close()
            await engine.stop()

    asyncio.run(main())
