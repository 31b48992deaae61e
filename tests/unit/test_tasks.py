"""`cancel_and_wait` ends a task even when something inside swallows its cancellation."""

from __future__ import annotations

import asyncio

from prescient.tasks import cancel_and_wait


def test_a_task_that_swallows_a_cancellation_still_ends() -> None:
    async def main() -> int:
        swallowed = 0

        async def stubborn() -> None:
            nonlocal swallowed
            while True:
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    swallowed += 1  # as a library retrying a reconnect might
                    if swallowed == 3:
                        raise

        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0.02)
        await asyncio.wait_for(cancel_and_wait(task), 10)
        assert task.done()
        return swallowed

    assert asyncio.run(main()) == 3


def test_a_finished_or_failed_task_is_left_as_it_is() -> None:
    async def main() -> None:
        async def fail() -> None:
            raise ValueError("boom")

        task = asyncio.create_task(fail())
        await asyncio.sleep(0)
        await cancel_and_wait(task)  # its error is consumed, not raised here
        assert isinstance(task.exception(), ValueError)

    asyncio.run(main())
