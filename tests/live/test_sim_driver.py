"""`RealtimeEngine`: the pure engine stepped on the event loop's clock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from prescient.engine import AnalyticStepTime, EngineConfig, SimEngine
from prescient.model import InstanceStatus, Request
from prescient.simengine.driver import RealtimeEngine

MODEL = AnalyticStepTime(c0=5.6, c_tok=0.02, c_attn=1e-6, c_kv=5e-5, c_seq=0.006)


def engine(**kw: object) -> SimEngine:
    return SimEngine("sim-test", EngineConfig(num_gpu_blocks=500, **kw), MODEL)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(driver: RealtimeEngine) -> AsyncIterator[RealtimeEngine]:
    task = asyncio.create_task(driver.run())
    try:
        yield driver
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


def test_every_request_streams_exactly_its_tokens_and_the_engine_ends_idle() -> None:
    statuses: list[InstanceStatus] = []

    async def main() -> None:
        driver = RealtimeEngine(engine(max_num_seqs=4), time_scale=50.0,
                                on_status=statuses.append)
        async with running(driver):
            streams = [driver.submit(Request(request_id=f"r{i}", prompt_len=50 + i,
                                             output_len=5 + i)) for i in range(10)]

            async def drain(stream: object) -> list[int]:
                ids: list[int] = []
                async for batch in stream:  # type: ignore[attr-defined]
                    ids += batch
                return ids

            outputs = await asyncio.gather(*(drain(s) for s in streams))
            for i, (stream, ids) in enumerate(zip(streams, outputs, strict=True)):
                assert len(ids) == 5 + i
                assert stream.finish_reason == "length"
                assert stream.first_token_time is not None
                assert stream.arrival_time <= stream.first_token_time <= stream.finish_time
            await wait_for(lambda: statuses and statuses[-1].num_running_requests == 0)
            assert driver.engine.pool.num_free == driver.engine.pool.num_blocks
        # four at a time: the others were seen waiting, under the ids they were submitted with
        waiting = {rid for s in statuses for rid in s.waiting_requests}
        assert {"r4", "r9"} <= waiting
        assert max(s.num_running_requests for s in statuses) == 4
        assert statuses[-1].num_waiting_requests == 0

    asyncio.run(main())


def test_output_ids_are_seeded_by_request_id() -> None:
    async def main() -> list[list[int]]:
        driver = RealtimeEngine(engine(), time_scale=50.0)
        outs = []
        async with running(driver):
            for rid in ("same", "same", "other"):
                ids: list[int] = []
                async for batch in driver.submit(Request(request_id=rid, prompt_len=10,
                                                         output_len=12)):
                    ids += batch
                outs.append(ids)
        return outs

    a, b, c = asyncio.run(main())
    assert a == b != c


def test_abort_ends_the_stream_and_frees_the_engine_between_steps() -> None:
    async def main() -> None:
        driver = RealtimeEngine(engine(), time_scale=5.0)
        async with running(driver):
            stream = driver.submit(Request(request_id="long", prompt_len=20, output_len=5000))
            got = await stream.__anext__()
            assert got
            assert driver.abort("long")
            assert not driver.abort("long")
            assert [b async for b in stream] == []
            assert stream.finish_reason == "abort"
            await wait_for(lambda: not driver.engine.has_work)
            assert driver.snapshot().num_running_requests == 0
            assert driver.engine.pool.num_free == driver.engine.pool.num_blocks
            assert driver.num_live == 0

    asyncio.run(main())


def test_refusals_raise_value_error_with_the_engine_reason() -> None:
    async def main() -> None:
        driver = RealtimeEngine(engine(max_model_len=100), time_scale=50.0)
        with pytest.raises(ValueError, match="max_model_len"):
            driver.submit(Request(request_id="big", prompt_len=90, output_len=20))
        small = RealtimeEngine(SimEngine("s", EngineConfig(num_gpu_blocks=4), MODEL))
        with pytest.raises(ValueError, match="KV cache"):
            small.submit(Request(request_id="big", prompt_len=90, output_len=20))

    asyncio.run(main())


def test_stopping_the_driver_ends_open_streams_with_abort() -> None:
    async def main() -> None:
        driver = RealtimeEngine(engine(), time_scale=1.0)
        task = asyncio.create_task(driver.run())
        stream = driver.submit(Request(request_id="x", prompt_len=10, output_len=5000))
        await stream.__anext__()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert [b async for b in stream] == []
        assert stream.finish_reason == "abort"

    asyncio.run(main())


def test_an_idle_status_follows_the_last_request() -> None:
    statuses: list[InstanceStatus] = []

    async def main() -> None:
        driver = RealtimeEngine(engine(), time_scale=50.0, on_status=statuses.append)
        async with running(driver):
            async for _ in driver.submit(Request(request_id="a", prompt_len=10, output_len=3)):
                pass
            await wait_for(lambda: statuses[-1].num_running_requests == 0)
        updates = [s.update_id for s in statuses]
        assert updates == sorted(updates) and len(set(updates)) == len(updates)
        assert statuses[0].num_running_requests == 1  # pushed after the first schedule
        assert statuses[0].recent_waiting_requests == ("a",)  # the id as submitted

    asyncio.run(main())
