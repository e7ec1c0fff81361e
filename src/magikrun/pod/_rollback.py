"""The one place pods undo what they made: a labelled ``AsyncExitStack``.

```python
async with Rollback(step_of=lambda: current_step) as rollback:
    netns = make_netns()
    rollback.push("netns", lambda: remove_netns(netns))
    ...
    rollback.pop_all()          # success: the pod record owns everything now
```

On any exception, cancellation included, the undos run in reverse order as a task of
their own that the caller awaits shielded and time-bounded, so a second cancel cannot
cut the cleanup short. Cleanup errors never hide the original: they are attached to
it as notes, or, when cleanup failed, the original is raised inside ``RollbackFailed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

from ..errors import MagikrunError, RollbackFailed
from ..platform._limits import POD_ROLLBACK_TIMEOUT

__all__ = ["Rollback", "Undo"]

log = logging.getLogger("magikrun.pod")

Undo = Callable[[], Awaitable[None]]


class Rollback:
    """Collects undo steps; unwinds them when the block fails.

    Parameters:
        timeout: seconds the whole unwind may take; what is left after is reported.
        wrap: turns the original error into the one to raise (after a clean unwind),
            given the list of undone step labels; e.g. into ``PodStartFailed``.
    """

    def __init__(
        self,
        *,
        timeout: float = POD_ROLLBACK_TIMEOUT,
        wrap: Callable[[Exception, list[str]], Exception] | None = None,
    ) -> None:
        self.timeout = timeout
        self.wrap = wrap
        self.undone: list[str] = []
        self.errors: list[tuple[str, BaseException]] = []
        self._stack = contextlib.AsyncExitStack()

    def push(self, label: str, undo: Undo) -> None:
        """Register ``undo`` for the step that just succeeded."""

        async def run() -> None:
            try:
                await undo()
            except Exception as exc:  # noqa: BLE001 - collected, reported with the original
                log.warning("undo of %s failed: %s", label, exc)
                self.errors.append((label, exc))
            else:
                self.undone.append(label)

        self._stack.push_async_callback(run)

    def pop_all(self) -> None:
        """Success: forget the undos (the pod record owns the resources now)."""
        self._stack.pop_all()

    async def unwind(self) -> None:
        """Run every pending undo in reverse, shielded from cancellation and time-bounded."""
        task = asyncio.ensure_future(self._unwind_bounded())
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    async def _unwind_bounded(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._stack.aclose()
        except TimeoutError:
            self.errors.append(("rollback", TimeoutError(f"not done after {self.timeout} s")))

    async def __aenter__(self) -> Rollback:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            return False
        await self.unwind()
        if not isinstance(exc, Exception):
            for label, error in self.errors:
                exc.add_note(f"undoing {label} failed: {error}")
            return False
        if self.errors:
            first, newline, rest = str(exc).partition("\n")
            raise RollbackFailed(
                f"{first}; and undoing it failed at "
                + ", ".join(f"{label} ({error})" for label, error in self.errors)
                + f"{newline}{rest}",
                original=exc,
                cleanup_errors=tuple(error for _, error in self.errors),
                undone=tuple(self.undone),
            ) from exc
        if self.wrap is not None:
            wrapped = self.wrap(exc, self.undone)
            if wrapped is not exc:
                raise wrapped from exc
        return False


def describe(exc: BaseException) -> str:
    """An error's message without its class name for MagikrunErrors, with it otherwise."""
    if isinstance(exc, MagikrunError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
