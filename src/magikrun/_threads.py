"""Blocking work in a worker thread, for async code that must not abandon it.

Each call gets its own short-lived thread, not a pooled one, and returns only once
that thread is gone from the kernel: a pool's idle threads would keep the process
multi-threaded, and only a single-threaded process may fork its warm interpreter
(see :func:`magikrun._process.forkable`), which is what makes container monitors cheap.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["finish_in_thread"]

_T = TypeVar("_T")

_REAP_SPINS = 10
"""Looks at a delivered worker thread, one per loop iteration, before pausing between looks:
its teardown is usually a few microseconds, unless the machine is busy."""
_REAP_PAUSE = 0.001
"""Pause between later looks."""


def _work(
    loop: asyncio.AbstractEventLoop,
    outcome: asyncio.Future[_T],
    fn: Callable[..., _T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, which raises it
        loop.call_soon_threadsafe(outcome.set_exception, exc)
    else:
        loop.call_soon_threadsafe(outcome.set_result, result)


async def finish_in_thread(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run ``fn(*args, **kwargs)`` in a new thread and return (or raise) what it did.

    When cancelled, waits for the thread to end before re-raising, so that cleanup
    never races a thread still writing (or a file closed under it); a failure of the
    abandoned call is retrieved (not logged). Either way it returns only after the
    thread has left the kernel, so a caller that was single-threaded is so again.
    """
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[_T] = loop.create_future()
    thread = threading.Thread(
        target=_work, args=(loop, outcome, fn, args, kwargs), name="magikrun-blocking"
    )
    thread.start()
    task = f"/proc/self/task/{thread.native_id}"
    cancelled: asyncio.CancelledError | None = None
    looks = 0
    while True:
        try:
            if not outcome.done():
                await asyncio.wait([outcome])
            elif os.path.exists(task):  # delivered; only its own teardown is left
                looks += 1
                await asyncio.sleep(0 if looks < _REAP_SPINS else _REAP_PAUSE)
            else:
                break
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
    if cancelled is not None:
        outcome.exception()
        raise cancelled
    return outcome.result()
