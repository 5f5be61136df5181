"""Per-delivery deadlines on one loop timer (webhook.deadlines): what asyncio.timeout did, told apart the same way."""

from __future__ import annotations

import asyncio

from whatrack.webhook.deadlines import Deadlines


async def _run(deadlines: Deadlines, seconds: float, work: float) -> str:
    task = asyncio.current_task()
    assert task is not None
    deadlines.start(task, seconds)
    try:
        await asyncio.sleep(work)
    except asyncio.CancelledError:
        if not deadlines.expired(task):
            raise
        return "timed out"
    finally:
        deadlines.finish(task)
    await asyncio.sleep(0)  # no cancellation left behind for the task's next await
    return "done"


async def test_only_the_deliveries_past_their_deadline_are_cancelled() -> None:
    d = Deadlines()
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(_run(d, 0.1, 1.0), _run(d, 0.1, 0.01), _run(d, 0.3, 0.2), _run(d, 0.2, 5.0))
    assert results == ["timed out", "done", "done", "timed out"]
    assert loop.time() - started < 1.0  # the 5 s one was cancelled at its deadline, not after its work


async def test_a_deadline_that_passed_after_the_work_finished_cancels_nothing() -> None:
    d = Deadlines()
    assert await _run(d, 0.05, 0.0) == "done"
    await asyncio.sleep(0.1)  # the timer fires on an empty table
    assert await _run(d, 0.05, 0.0) == "done"  # and the next delivery arms it again
    assert await _run(d, 0.05, 1.0) == "timed out"


async def test_another_cancellation_is_not_a_timeout() -> None:
    d = Deadlines()
    task = asyncio.create_task(_run(d, 10.0, 10.0))
    await asyncio.sleep(0.01)
    task.cancel()  # shutdown, or the client went away
    await asyncio.wait([task])
    assert task.cancelled()


async def test_a_cancellation_on_top_of_the_deadline_still_goes_through() -> None:
    d = Deadlines()
    gate = asyncio.Event()
    seen: list[str] = []

    async def stubborn() -> None:
        task = asyncio.current_task()
        assert task is not None
        d.start(task, 0.05)
        try:
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            task.cancel()  # a second cancellation, from elsewhere, before the deadline's is handled
            seen.append("expired" if d.expired(task) else "re-raised")
            gate.set()
            raise
        finally:
            d.finish(task)

    task = asyncio.create_task(stubborn())
    await gate.wait()
    await asyncio.wait([task])
    assert seen == ["re-raised"] and task.cancelled()


async def test_a_shorter_timeout_re_arms_the_timer() -> None:
    d = Deadlines()
    long = asyncio.create_task(_run(d, 30.0, 0.5))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _run(d, 0.05, 5.0) == "timed out"
    assert loop.time() - started < 0.4  # not at the 30 s deadline armed first
    assert await long == "done"
