"""Rollback alone: reverse order, errors never hiding the original, cancellation shielded."""

from __future__ import annotations

import asyncio

import pytest

from magikrun.errors import BackendFailed, RollbackFailed
from magikrun.pod import Rollback


async def test_undoes_in_reverse_on_error_and_nothing_on_success() -> None:
    order: list[str] = []

    def undo(label: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            order.append(label)

        return run

    with pytest.raises(BackendFailed, match="boom"):
        async with Rollback() as rollback:
            for label in ("a", "b", "c"):
                rollback.push(label, undo(label))
            raise BackendFailed("boom")
    assert order == ["c", "b", "a"]
    assert rollback.undone == ["c", "b", "a"]
    order.clear()
    async with Rollback() as rollback:
        rollback.push("a", undo("a"))
        rollback.pop_all()
    assert order == []


async def test_cleanup_errors_are_carried_with_the_original() -> None:
    async def fails() -> None:
        raise OSError("disk gone")

    async def fine() -> None:
        pass

    original = BackendFailed("step failed")
    with pytest.raises(RollbackFailed) as caught:
        async with Rollback() as rollback:
            rollback.push("ok", fine)
            rollback.push("bad", fails)
            raise original
    assert caught.value.original is original
    assert caught.value.__cause__ is original
    assert [str(e) for e in caught.value.cleanup_errors] == ["disk gone"]
    assert caught.value.undone == ("ok",)
    assert "step failed" in str(caught.value) and "disk gone" in str(caught.value)


async def test_wrap_turns_the_error_into_the_callers_kind() -> None:
    def wrap(exc: Exception, undone: list[str]) -> Exception:
        return ValueError(f"wrapped {exc} after {undone}")

    async def fine() -> None:
        pass

    with pytest.raises(ValueError, match=r"wrapped x after \['a'\]"):
        async with Rollback(wrap=wrap) as rollback:
            rollback.push("a", fine)
            raise BackendFailed("x")


async def test_unwind_survives_a_second_cancel_and_is_time_bounded() -> None:
    finished: list[str] = []
    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append("slow")

    async def hangs() -> None:
        await asyncio.sleep(3600)

    async def body() -> None:
        async with Rollback(timeout=1.0) as rollback:
            rollback.push("hangs", hangs)
            rollback.push("slow", slow)
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(body())
    await asyncio.sleep(0.05)
    task.cancel()
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError) as caught:
        await task
    assert finished == ["slow"]
    assert any("undoing rollback failed" in note for note in caught.value.__notes__)


async def test_a_multiline_error_keeps_its_detail_after_the_cleanup_failure() -> None:
    async def fails() -> None:
        raise OSError("disk gone")

    with pytest.raises(RollbackFailed) as caught:
        async with Rollback() as rollback:
            rollback.push("bad", fails)
            raise BackendFailed("init failed\nits last output:\n  | boom")
    assert caught.value.message == (
        "init failed; and undoing it failed at bad (disk gone)\nits last output:\n  | boom"
    )
