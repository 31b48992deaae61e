"""SchedulerCore in full mode over an in-process CMS store: statuses decide, outages fail over."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from prescient.cms.store import CmsStoreError, MemoryStore
from prescient.config.scheduler import SchedulerSettings, load_scheduler_settings
from prescient.errors import ConfigError
from prescient.model import InferType, InstanceMetadata, InstanceStatus
from prescient.scheduler.core import SchedulerCore
from prescient.scheduler.wire import (
    NoInstanceAvailableError,
    ScheduleRequest,
    SchedulerUnavailableError,
)


class FlakyStore(MemoryStore):
    """A MemoryStore that can be switched off, as a Redis outage would."""

    down = False

    async def read_metadata(self) -> dict[str, InstanceMetadata]:
        if self.down:
            raise CmsStoreError("connection refused")
        return await super().read_metadata()

    async def read_statuses(self, ids: Sequence[str]) -> dict[str, InstanceStatus | None]:
        if self.down:
            raise CmsStoreError("connection refused")
        return await super().read_statuses(ids)


def full(*extra: str) -> SchedulerSettings:
    return load_scheduler_settings(["--cms-pull-status-interval-ms", "10", *extra], {})


def meta(iid: str, port: int, kind: InferType = InferType.NEUTRAL) -> InstanceMetadata:
    return InstanceMetadata(instance_id=iid, instance_type=kind, ip="10.0.0.9",
                            api_server_port=port, ip_kvt="10.0.1.9", kvt_port=port + 20000,
                            dp_rank=1, data_parallel_size=2)


def status(iid: str, waiting_tokens: int, update_id: int = 1, *,
           schedulable: bool = True) -> InstanceStatus:
    # a later update is a later timestamp even within one millisecond (else it is skipped)
    return InstanceStatus(instance_id=iid, timestamp_ms=int(time.time() * 1000) + update_id,
                          update_id=update_id, schedulable=schedulable,
                          num_uncomputed_tokens_all_waiting_prefills=waiting_tokens)


async def fill(store: MemoryStore, loads: dict[str, int], update_id: int = 1, **kw: bool) -> None:
    for k, (iid, load) in enumerate(sorted(loads.items())):
        await store.put_metadata(meta(iid, 8000 + k), None)
        await store.put_status(status(iid, load, update_id, **kw), None)


async def wait_until(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def test_the_least_loaded_status_wins_and_the_record_carries_endpoint_and_aux() -> None:
    async def main() -> None:
        store = MemoryStore()
        await fill(store, {"a": 3000, "b": 100, "c": 2000})
        core = SchedulerCore(full(), store=store)
        await core.start()  # the first metadata and status polls are done on return
        assert core.ready and [i.id for i in core.instances()] == ["a", "b", "c"]
        [inst] = await core.schedule(ScheduleRequest(id="r1", prompt_num_tokens=2500))
        assert inst.id == "b"
        assert (inst.endpoint.host, inst.endpoint.port, inst.aux_ip, inst.aux_port) == (
            "10.0.0.9", 8001, "10.0.1.9", 28001)
        assert (inst.dp_rank, inst.dp_size, inst.infer_type) == (1, 2, "neutral")
        # the local account counts r1 on b until b's status shows it: 100 + 2500 > 2000
        nxt = await core.schedule(ScheduleRequest(id="r2", prompt_num_tokens=10))
        assert nxt[0].id == "c"
        await core.close()
        await core.close()

    asyncio.run(main())


def test_pd_batch_places_a_prefill_and_a_decode_leg() -> None:
    async def main() -> None:
        store = MemoryStore()
        await store.put_metadata(meta("p", 8000, InferType.PREFILL), None)
        await store.put_metadata(meta("d", 8001, InferType.DECODE), None)
        for iid in ("p", "d"):
            await store.put_status(InstanceStatus(
                instance_id=iid, timestamp_ms=int(time.time() * 1000), update_id=1,
                num_total_gpu_tokens=10000), None)
        core = SchedulerCore(full(), store=store)
        await core.start()
        legs = await core.schedule(ScheduleRequest(id="r", prompt_num_tokens=10,
                                                   scheduling_mode="pd_batch"))
        assert [(i.id, i.infer_type) for i in legs] == [("p", "prefill"), ("d", "decode")]
        staged = await core.schedule(ScheduleRequest(
            id="s", prompt_num_tokens=10, scheduling_mode="pd_staged",
            scheduling_stage="decode"))
        assert [(i.id, i.infer_type) for i in staged] == [("d", "decode")]
        await core.close()

    asyncio.run(main())


def test_unschedulable_everywhere_is_no_instance() -> None:
    async def main() -> None:
        store = MemoryStore()
        await fill(store, {"a": 0, "b": 0}, schedulable=False)
        core = SchedulerCore(full(), store=store)
        await core.start()
        with pytest.raises(NoInstanceAvailableError):
            await core.schedule(ScheduleRequest(id="r", prompt_num_tokens=5))
        await fill(store, {"a": 0, "b": 0}, update_id=2)  # schedulable again
        await wait_until(lambda: all(
            s is not None and s.schedulable
            for s in (core.dispatcher.cms.status("a"), core.dispatcher.cms.status("b"))))
        assert await core.schedule(ScheduleRequest(id="r", prompt_num_tokens=5))
        await core.close()

    asyncio.run(main())


def test_an_empty_cms_is_unavailable_so_the_gateway_falls_back_instead_of_waiting() -> None:
    async def main() -> None:
        store = MemoryStore()  # answering, but no llumlet has (re-)registered yet
        core = SchedulerCore(full("--cms-pull-metadata-interval-ms", "10"), store=store)
        await core.start()
        assert core.ready
        with pytest.raises(SchedulerUnavailableError, match="no instances"):
            await core.schedule(ScheduleRequest(id="r1", prompt_num_tokens=5))
        await fill(store, {"a": 0})
        await wait_until(lambda: core.dispatcher.cms.status("a") is not None)
        assert (await core.schedule(ScheduleRequest(id="r2", prompt_num_tokens=5)))[0].id == "a"
        await core.close()

    asyncio.run(main())


def test_a_cms_outage_makes_the_scheduler_unavailable_until_it_answers_again() -> None:
    async def main() -> None:
        store = FlakyStore()
        await fill(store, {"a": 0})
        core = SchedulerCore(full(), store=store)
        await core.start()
        assert await core.schedule(ScheduleRequest(id="r1", prompt_num_tokens=5))
        store.down = True
        await wait_until(lambda: not core.ready)
        assert not core.cms_available
        with pytest.raises(SchedulerUnavailableError, match="cms not available"):
            await core.schedule(ScheduleRequest(id="r2", prompt_num_tokens=5))
        store.down = False
        await wait_until(lambda: core.ready)
        assert (await core.schedule(ScheduleRequest(id="r3", prompt_num_tokens=5)))[0].id == "a"
        await core.close()

    asyncio.run(main())


def test_a_core_that_starts_during_an_outage_is_not_ready() -> None:
    async def main() -> None:
        store = FlakyStore()
        store.down = True
        core = SchedulerCore(full(), store=store)
        await core.start()
        assert not core.ready and core.instances() == []
        with pytest.raises(SchedulerUnavailableError):
            await core.schedule(ScheduleRequest(id="r", prompt_num_tokens=5))
        await core.close()

    asyncio.run(main())


# TTFT: 10 ms + 0.1 ms per token; TPOT: 5 ms + 0.5 ms per request in the batch
TTFT = {"metadata": {}, "results": [{"tokens_num": n, "p50": 10 + 0.1 * n}
                                    for n in (100, 1000, 4000, 8000)]}
TPOT = {"metadata": {}, "results": [{"batch_size": b, "tokens_per_request": t, "p50": 5 + 0.5 * b}
                                    for b in (1, 8, 64) for t in (8, 512, 2048)]}


def test_the_slo_policy_loads_its_profiles_and_filters_on_predicted_ttft(tmp_path: Path) -> None:
    (tmp_path / "ttft.json").write_text(json.dumps(TTFT))
    (tmp_path / "tpot.json").write_text(json.dumps(TPOT))
    settings = full("--scheduling-policy", "slo", "--ttft-slo", "250",
                    "--ttft-profiling-data-path", str(tmp_path / "ttft.json"),
                    "--tpot-profiling-data-path", str(tmp_path / "tpot.json"))

    async def main() -> None:
        store = MemoryStore()
        for iid, waiting in (("a", 3000), ("b", 1000)):
            await store.put_metadata(InstanceMetadata(
                instance_id=iid, ip="h", api_server_port=1, max_num_batched_tokens=8000), None)
            await store.put_status(status(iid, waiting), None)
        core = SchedulerCore(settings, store=store)
        await core.start()
        # b: predicted TTFT about 10 + 0.1 x (1000 + 500) = 160 ms < 250; a: over the SLO
        assert (await core.schedule(ScheduleRequest(id="r1", prompt_num_tokens=500)))[0].id == "b"
        with pytest.raises(NoInstanceAvailableError):  # 2000 more on either misses the SLO
            await core.schedule(ScheduleRequest(id="r2", prompt_num_tokens=2000))
        await core.close()

    asyncio.run(main())

    with pytest.raises(ConfigError, match="cannot read"):
        SchedulerCore(load_scheduler_settings(
            ["--scheduling-policy", "slo", "--ttft-profiling-data-path", "/nonexistent.json",
             "--tpot-profiling-data-path", str(tmp_path / "tpot.json")], {}))
