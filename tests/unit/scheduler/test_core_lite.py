"""SchedulerCore in lite mode: discovery's instances, router-local counts, reports, releases."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from prescient.config.scheduler import SchedulerSettings, load_scheduler_settings
from prescient.discovery.base import DiscoveredInstance, Listener, StaticResolver
from prescient.errors import ConfigError
from prescient.scheduler.core import InvalidScheduleRequestError, SchedulerCore
from prescient.scheduler.wire import (
    NoInstanceAvailableError,
    ReportItem,
    ScheduleRequest,
    SchedulerUnavailableError,
)

ENDPOINTS = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")


def lite(metric: str = "num_requests", *extra: str) -> SchedulerSettings:
    return load_scheduler_settings(
        ["--enable-full-mode-scheduling=false", "--llm-backend-discovery", "endpoints",
         "--llm-backend-endpoints", ",".join(ENDPOINTS), "--dispatch-neutral-load-metric",
         metric, *extra], {})


def req(rid: str, tokens: int = 10, **kw: object) -> ScheduleRequest:
    return ScheduleRequest(id=rid, prompt_num_tokens=tokens, **kw)  # type: ignore[arg-type]


async def started(settings: SchedulerSettings, **kw: object) -> SchedulerCore:
    core = SchedulerCore(settings, **kw)  # type: ignore[arg-type]
    await core.start()
    return core


async def picks(core: SchedulerCore, ids: Sequence[str], tokens: int = 10) -> list[str]:
    return [(await core.schedule(req(rid, tokens)))[0].id for rid in ids]


def test_num_requests_spreads_requests_and_release_frees_them() -> None:
    async def main() -> None:
        core = await started(lite())
        assert core.ready and core.cms_available
        got = await picks(core, [f"r{k}" for k in range(6)])
        assert sorted(got) == sorted([*ENDPOINTS, *ENDPOINTS])
        for rid in ("r0", "r3"):  # both on the first instance picked
            await core.release(req(rid))
        assert got[0] == got[3]
        assert await picks(core, ["n1", "n2"]) == [got[0], got[0]]
        await core.close()

    asyncio.run(main())


def test_reports_raise_token_counts_and_steer_the_next_pick() -> None:
    async def main() -> None:
        core = await started(lite("num_tokens"))
        first = await picks(core, ["a", "b", "c"], tokens=100)
        assert sorted(first) == sorted(ENDPOINTS)
        await core.report([ReportItem(id="a", instance_id=first[0], num_tokens=5000),
                           ReportItem(id="b", instance_id=first[1], num_tokens=3000),
                           ReportItem(id="x", instance_id="nowhere:1", num_tokens=9),
                           ReportItem(kind="prefill_done", id="c", instance_id=first[2])])
        assert await picks(core, ["d"], tokens=100) == [first[2]]
        await core.report([ReportItem(id="a", instance_id=first[0], num_tokens=10)])  # lower
        assert await picks(core, ["e"], tokens=2700) == [first[2]]  # 200+2700 < 3000 < 5000
        await core.close()

    asyncio.run(main())


def test_the_answer_names_the_instance_as_the_wire_wants_it() -> None:
    async def main() -> None:
        resolver = StaticResolver(["h1:7001"])
        core = await started(lite(), resolver=resolver)
        [inst] = await core.schedule(req("r1"))
        assert (inst.id, inst.endpoint.host, inst.endpoint.port, inst.infer_type) == (
            "h1:7001", "h1", 7001, "neutral")
        assert (inst.dp_rank, inst.dp_size, inst.version) == (0, 1, 0)
        assert core.instances() == [inst]
        # records are built once per instance, not per decision
        assert (await core.schedule(req("r2")))[0] is inst
        await core.close()

    asyncio.run(main())


class ListResolver:
    """A resolver whose set the test changes, as a Redis or etcd resolver would."""

    def __init__(self, instances: list[DiscoveredInstance]) -> None:
        self._instances, self._listeners = instances, list[Listener]()
        self.closed = False

    async def start(self) -> None:
        return None

    def instances(self) -> list[DiscoveredInstance]:
        return list(self._instances)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
        listener(self.instances())

    def change(self, instances: list[DiscoveredInstance]) -> None:
        self._instances = instances
        for listener in self._listeners:
            listener(self.instances())

    async def close(self) -> None:
        self.closed = True


def test_discovery_changes_the_instance_set_and_models_travel() -> None:
    a = DiscoveredInstance(instance_id="pod-a_dp0", host="10.1.0.1", port=8000, model="m",
                           kv_transfer_ip="10.1.0.1", kv_transfer_port=28000)
    b = DiscoveredInstance(instance_id="pod-b_dp0", host="10.1.0.2", port=8000, model="m")

    async def main() -> None:
        resolver = ListResolver([a])
        core = await started(lite(), resolver=resolver)
        [inst] = await core.schedule(req("r1"))
        assert (inst.id, inst.model, inst.aux_ip, inst.aux_port) == ("pod-a_dp0", "m",
                                                                     "10.1.0.1", 28000)
        resolver.change([b])
        assert [i.id for i in core.instances()] == ["pod-b_dp0"]
        assert (await core.schedule(req("r2")))[0].id == "pod-b_dp0"
        resolver.change([])
        with pytest.raises(NoInstanceAvailableError):
            await core.schedule(req("r3"))
        await core.close()
        assert not resolver.closed  # the caller's resolver stays the caller's

    asyncio.run(main())


def test_bad_requests_are_value_errors_naming_the_field() -> None:
    async def main() -> None:
        core = await started(lite())
        bad = [
            (req("r", 0), "prompt_num_tokens"),
            (ScheduleRequest(id="r", prompt_token_ids=[]), "prompt_num_tokens"),
            (req("r", 3, prompt_token_ids=[1, 2]), r"len\(prompt_token_ids\)"),
            (req("", 3), "id"),
            (req("r", 3, scheduling_mode="pd_staged"), "scheduling_stage"),
        ]
        for request, field in bad:
            with pytest.raises(InvalidScheduleRequestError, match=field) as info:
                await core.schedule(request)
            assert isinstance(info.value, ValueError)
        # the length may come from the ids alone
        assert await core.schedule(ScheduleRequest(id="ok", prompt_token_ids=[5, 6, 7]))
        await core.close()

    asyncio.run(main())


def test_a_duplicate_id_is_scheduled_and_one_release_frees_it_everywhere() -> None:
    async def main() -> None:
        core = await started(lite())
        first = await picks(core, ["dup", "dup"])
        assert first[0] != first[1]  # the second add on the first instance would be ignored
        await core.release(req("dup"))
        lite_state = core.dispatcher.lite
        assert lite_state is not None
        assert [lite_state.num_requests(i) for i in ENDPOINTS] == [0, 0, 0]
        await core.close()

    asyncio.run(main())


def test_not_started_or_closed_is_unavailable_and_empty_is_no_instance() -> None:
    async def main() -> None:
        core = SchedulerCore(lite())
        assert not core.ready
        with pytest.raises(SchedulerUnavailableError):
            await core.schedule(req("r"))
        await core.start()
        await core.close()
        with pytest.raises(SchedulerUnavailableError):
            await core.schedule(req("r"))
        empty = await started(lite(), resolver=StaticResolver([]))
        with pytest.raises(NoInstanceAvailableError):
            await empty.schedule(req("r"))
        await empty.close()

    asyncio.run(main())


def test_policies_lite_mode_cannot_run_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="flood"):
        SchedulerCore(lite("num_requests", "--scheduling-policy", "flood"))
    with pytest.raises(ConfigError, match="profiling-data-path"):
        SchedulerCore(lite("num_requests", "--scheduling-policy", "slo"))
    with pytest.raises(ConfigError, match="--llm-backend-endpoints"):
        asyncio.run(SchedulerCore(load_scheduler_settings(
            ["--enable-full-mode-scheduling=false", "--llm-backend-discovery", "endpoints"],
            {})).start())
