"""finish_in_thread: one short-lived thread per call, waited for even when cancelled."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from magikrun._threads import finish_in_thread


def tasks() -> int:
    return len(os.listdir("/proc/self/task"))


async def test_returns_the_result_and_leaves_no_thread() -> None:
    before = tasks()
    names: list[str] = []

    def work(a: int, *, b: int) -> int:
        names.append(threading.current_thread().name)
        return a + b

    assert await finish_in_thread(work, 2, b=3) == 5
    assert await finish_in_thread(work, 4, b=5) == 9
    assert names == ["magikrun-blocking", "magikrun-blocking"]
    assert tasks() == before


async def test_raises_the_exception_and_leaves_no_thread() -> None:
    before = tasks()

    def fail() -> None:
        raise ValueError("broken on purpose")

    with pytest.raises(ValueError, match="broken on purpose"):
        await finish_in_thread(fail)
    assert tasks() == before


@pytest.mark.parametrize("fails", [False, True])
async def test_cancel_waits_for_the_thread(fails: bool) -> None:
    """The cancelled caller returns only once the call ended; its failure is not logged."""
    before = tasks()
    entered = threading.Event()
    release = threading.Event()
    ended: list[bool] = []
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))

    def slow() -> str:
        entered.set()
        release.wait(60)
        ended.append(True)
        if fails:
            raise OSError("failed after the caller gave up")
        return "late"

    caller = asyncio.create_task(finish_in_thread(slow))
    while not entered.is_set():
        await asyncio.sleep(0.001)
    caller.cancel()
    await asyncio.sleep(0.05)
    assert not caller.done()  # still waiting for the thread, despite the cancel
    caller.cancel()  # a second cancel does not cut the wait short either
    await asyncio.sleep(0.01)
    assert not caller.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert ended == [True]
    assert tasks() == before
    assert unhandled == []


async def test_concurrent_calls_each_get_a_thread_and_all_end() -> None:
    before = tasks()
    barrier = threading.Barrier(3, timeout=60)

    def meet(i: int) -> int:
        barrier.wait()  # only possible if the three run at the same time
        return i

    assert await asyncio.gather(*(finish_in_thread(meet, i) for i in range(3))) == [0, 1, 2]
    assert tasks() == before
