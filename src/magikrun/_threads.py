"""Blocking work in a worker thread, for async code that must not abandon it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["finish_in_thread"]

_T = TypeVar("_T")


async def finish_in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(*args)`` in the loop's default executor; when cancelled, wait for the thread
    to end before re-raising, so that cleanup never races a thread still writing (or a
    file closed under it). A failure of the abandoned call is retrieved (not logged)."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if not future.cancelled():
            future.exception()
        raise
