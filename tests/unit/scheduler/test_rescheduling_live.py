"""The live rescheduler over an in-process CMS: each plan becomes the right gRPC `Migrate` call,
answered by a real gRPC llumlet server that records what it got."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from prescient.cms.store import MemoryStore
from prescient.config.scheduler import SchedulerSettings, load_scheduler_settings
from prescient.llumlet.proto import llumlet_server_pb2 as pb
from prescient.llumlet.rpc import LlumletRpcError, start_server
from prescient.model import InferType, InstanceMetadata, InstanceStatus
from prescient.scheduler.core import SchedulerCore
from prescient.scheduler.rescheduling import LiveRescheduler


class Recorder:
    """A llumlet that records `Migrate` calls and answers as told."""

    def __init__(self, answer: pb.MigrateResponse | LlumletRpcError) -> None:
        self.answer = answer
        self.calls: list[pb.MigrateRequest] = []

    async def migrate(self, request: pb.MigrateRequest) -> pb.MigrateResponse:
        self.calls.append(request)
        if isinstance(self.answer, LlumletRpcError):
            raise self.answer
        return self.answer

    def __getattr__(self, name: str) -> Any:  # the other methods are not called here
        async def unused(request: Any) -> Any:
            raise AssertionError(f"{name} called")
        return unused


def settings(*extra: str) -> SchedulerSettings:
    return load_scheduler_settings([
        "--enable-rescheduling", "--rescheduling-policies", "neutral_load",
        "--rescheduling-neutral-load-metric", "decode_batch_size",
        "--rescheduling-neutral-load-threshold", "0", *extra], {})


async def cluster(store: MemoryStore, ports: dict[str, int], batches: dict[str, int]) -> None:
    for iid, batch in batches.items():
        await store.put_metadata(InstanceMetadata(
            instance_id=iid, instance_type=InferType.NEUTRAL, ip="127.0.0.1",
            ip_kvs=f"10.9.0.{len(iid)}", api_server_port=9000, llumlet_port=ports.get(iid, 0),
            kvt_port=ports.get(iid, 0)), None)
        await store.put_status(InstanceStatus(
            instance_id=iid, timestamp_ms=int(time.time() * 1000), update_id=1,
            schedulable=True, scheduler_running_to_decode_requests_num=batch), None)


def run_round(answer: pb.MigrateResponse | LlumletRpcError, *extra: str,
              src_has_port: bool = True) -> tuple[list[tuple[Any, str]], list[pb.MigrateRequest]]:
    async def main() -> tuple[list[tuple[Any, str]], list[pb.MigrateRequest]]:
        recorder = Recorder(answer)
        server, port = await start_server(recorder, "127.0.0.1", 0)  # type: ignore[arg-type]
        store = MemoryStore()
        ports = {"busy": port, "idle": 7777} if src_has_port else {"idle": 7777}
        await cluster(store, ports, {"busy": 6, "idle": 0})
        s = settings(*extra)
        core = SchedulerCore(s, store=store)
        await core.start()
        rescheduler = LiveRescheduler(core, s)
        try:
            return await rescheduler.round(), recorder.calls
        finally:
            await rescheduler.close()
            await core.close()
            await server.stop(0)

    return asyncio.run(main())


def test_a_plan_becomes_a_migrate_call_to_the_source_naming_the_destination() -> None:
    outcomes, calls = run_round(pb.MigrateResponse(success=True))
    [call] = calls
    assert (call.src_engine_id, call.dst_engine_id) == ("busy", "idle")
    assert (call.dst_engine_ip, call.dst_engine_port) == ("10.9.0.4", 7777)  # ip_kvs, kvt_port
    # the seed defaults: TOKEN, SR, 1024, carried in the oneof field the type names
    assert (call.migration_type, call.migration_req_policy) == ("TOKEN", "SR")
    assert call.WhichOneof("migration_value") == "num_tokens" and call.num_tokens == 1024
    assert call.trigger_policy == "neutral_load"
    assert [o for _, o in outcomes] == ["migrating"]


def test_num_req_and_ratio_rules_fill_their_own_oneof_field() -> None:
    _, [call] = run_round(pb.MigrateResponse(success=True), "--rescheduling-req-select-rule",
                          "NUM_REQ", "--rescheduling-req-select-value", "2")
    assert call.WhichOneof("migration_value") == "num_reqs" and call.num_reqs == 2
    _, [call] = run_round(pb.MigrateResponse(success=True), "--rescheduling-req-select-rule",
                          "RATIO", "--rescheduling-req-select-value", "0.25")
    assert call.WhichOneof("migration_value") == "kv_cache_usage_ratio"
    assert abs(call.kv_cache_usage_ratio - 0.25) < 1e-6


def test_outcomes_say_what_became_of_each_plan() -> None:
    assert [o for _, o in run_round(pb.MigrateResponse(success=False))[0]] == ["nothing"]
    busy = LlumletRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free migrate-out slot")
    assert [o for _, o in run_round(busy)[0]] == ["refused"]
    down = LlumletRpcError(grpc.StatusCode.INTERNAL, "boom")
    assert [o for _, o in run_round(down)[0]] == ["failed"]
    outcomes, calls = run_round(pb.MigrateResponse(success=True), src_has_port=False)
    assert [o for _, o in outcomes] == ["unsupported"] and calls == []  # a stock vLLM source


def test_balanced_instances_get_no_plan() -> None:
    outcomes, calls = run_round(pb.MigrateResponse(success=True),
                                "--rescheduling-load-balance-threshold", "7")
    assert outcomes == [] and calls == []  # the gap (6) is under the threshold
