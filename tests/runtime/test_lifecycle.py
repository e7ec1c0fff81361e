"""OCI lifecycle conformance, run against every backend in conftest.BACKENDS.

Each rule is tested both ways: the verb works in the status that allows it, and
in a status that does not it raises InvalidState and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from magikrun.errors import (
    ContainerExists,
    ContainerLimitReached,
    ContainerNotFound,
    InvalidContainerId,
    InvalidState,
)
from magikrun.platform import Paths
from magikrun.runtime import ContainerStatus, OciRuntime, RuntimeRegistry

MakeBundle = Callable[..., Path]


async def _status(runtime: OciRuntime, cid: str) -> ContainerStatus:
    return (await runtime.state(cid)).status


async def _running(runtime: OciRuntime, bundle: MakeBundle, cid: str) -> None:
    await runtime.create(cid, bundle("sleep"))
    await runtime.start(cid)


def _leftovers(paths: Paths) -> list[str]:
    root = paths.containers
    return sorted(p.name for p in root.iterdir() if p.name != ".lock") if root.exists() else []


async def test_create_gives_created_with_pid(runtime: OciRuntime, bundle: MakeBundle, cid: str):
    state = await runtime.create(cid, bundle("exit", 0))
    try:
        assert state.status is ContainerStatus.CREATED
        assert state.pid is not None and os.path.exists(f"/proc/{state.pid}")
        assert (await runtime.state(cid)).pid == state.pid
    finally:
        await runtime.delete(cid, force=True)


async def test_state_document_schema(runtime: OciRuntime, bundle: MakeBundle, cid: str):
    path = bundle("exit", 0)
    await runtime.create(cid, path)
    try:
        doc = (await runtime.state(cid)).to_oci()
        assert list(doc)[:5] == ["ociVersion", "id", "status", "pid", "bundle"]
        assert doc["ociVersion"] == "1.0.2"
        assert doc["id"] == cid
        assert doc["status"] == "created"
        assert isinstance(doc["pid"], int) and doc["pid"] > 0
        assert doc["bundle"] == str(path.absolute())
        assert isinstance(doc["annotations"], dict)
        assert doc["created"].endswith("Z")
        json.dumps(doc)
        await runtime.start(cid)
        assert await runtime.wait(cid) == 0
        stopped = (await runtime.state(cid)).to_oci()
        assert stopped["status"] == "stopped" and stopped["exitCode"] == 0
        assert "pid" not in stopped
    finally:
        await runtime.delete(cid, force=True)


async def test_pid_file(runtime: OciRuntime, bundle: MakeBundle, cid: str, short_tmp: Path):
    pid_file = short_tmp / "container.pid"
    state = await runtime.create(cid, bundle("exit", 0), pid_file=pid_file)
    try:
        assert int(pid_file.read_text()) == state.pid
    finally:
        await runtime.delete(cid, force=True)


@pytest.mark.parametrize("code", [0, 1, 3, 42, 255])
async def test_exit_codes(runtime: OciRuntime, bundle: MakeBundle, cid: str, code: int):
    await runtime.create(cid, bundle("exit", code))
    await runtime.start(cid)
    assert await runtime.wait(cid) == code
    state = await runtime.state(cid)
    assert state.status is ContainerStatus.STOPPED and state.exit_code == code
    await runtime.delete(cid)


async def test_start_created_runs(runtime: OciRuntime, bundle: MakeBundle, cid: str):
    await _running(runtime, bundle, cid)
    try:
        assert await _status(runtime, cid) is ContainerStatus.RUNNING
    finally:
        await runtime.delete(cid, force=True)


async def test_start_twice_fails_and_changes_nothing(
    runtime: OciRuntime, bundle: MakeBundle, cid: str
):
    await _running(runtime, bundle, cid)
    try:
        with pytest.raises(InvalidState) as err:
            await runtime.start(cid)
        assert (err.value.id, err.value.status, err.value.verb) == (cid, "running", "start")
        assert await _status(runtime, cid) is ContainerStatus.RUNNING
    finally:
        await runtime.delete(cid, force=True)


async def test_start_stopped_fails(runtime: OciRuntime, bundle: MakeBundle, cid: str):
    await runtime.create(cid, bundle("exit", 5))
    await runtime.start(cid)
    await runtime.wait(cid)
    with pytest.raises(InvalidState, match="stopped"):
        await runtime.start(cid)
    assert (await runtime.state(cid)).exit_code == 5
    await runtime.delete(cid)


@pytest.mark.parametrize("sig", ["TERM", "SIGINT", "1", signal.SIGUSR1])
async def test_kill_running(runtime: OciRuntime, bundle: MakeBundle, cid: str, sig: str | int):
    await _running(runtime, bundle, cid)
    number = (
        signal.Signals[sig if str(sig).startswith("SIG") else f"SIG{sig}"].value
        if (isinstance(sig, str) and not sig.isdigit())
        else int(sig)
    )
    await runtime.kill(cid, sig)
    assert await runtime.wait(cid) == 128 + number
    await runtime.delete(cid)


async def test_kill_created_is_allowed(runtime: OciRuntime, bundle: MakeBundle, cid: str):
    await runtime.create(cid, bundle("sleep"))
    await runtime.kill(cid, "KILL")
    assert await runtime.wait(cid) == 137
    assert await _status(runtime, cid) is ContainerStatus.STOPPED
    await runtime.delete(cid)


async def test_kill_stopped_fails(runtime: OciRuntime, bundle: MakeBundle, cid: str):
    await runtime.create(cid, bundle("exit", 0))
    await runtime.start(cid)
    await runtime.wait(cid)
    with pytest.raises(InvalidState) as err:
        await runtime.kill(cid, "KILL")
    assert (err.value.status, err.value.verb) == ("stopped", "kill")
    assert (await runtime.state(cid)).exit_code == 0
    await runtime.delete(cid)


@pytest.mark.parametrize("started", [False, True], ids=["created", "running"])
async def test_delete_without_force_refused(
    runtime: OciRuntime, bundle: MakeBundle, cid: str, started: bool
):
    await runtime.create(cid, bundle("sleep"))
    if started:
        await runtime.start(cid)
    before = await runtime.state(cid)
    with pytest.raises(InvalidState) as err:
        await runtime.delete(cid)
    assert err.value.verb == "delete"
    after = await runtime.state(cid)
    assert (after.status, after.pid) == (before.status, before.pid)
    await runtime.delete(cid, force=True)


@pytest.mark.parametrize("started", [False, True], ids=["created", "running"])
async def test_delete_force_leaves_nothing(
    runtime: OciRuntime, bundle: MakeBundle, cid: str, paths: Paths, started: bool
):
    state = await runtime.create(cid, bundle("sleep"))
    if started:
        await runtime.start(cid)
    await runtime.delete(cid, force=True)
    assert _leftovers(paths) == []
    assert state.pid is not None and not os.path.exists(f"/proc/{state.pid}/exe")
    with pytest.raises(ContainerNotFound):
        await runtime.state(cid)


async def test_delete_stopped(runtime: OciRuntime, bundle: MakeBundle, cid: str, paths: Paths):
    await runtime.create(cid, bundle("exit", 0))
    await runtime.start(cid)
    await runtime.wait(cid)
    await runtime.delete(cid)
    assert _leftovers(paths) == []


async def test_duplicate_id_rejected(
    runtime: OciRuntime, bundle: MakeBundle, cid: str, paths: Paths
):
    first = await runtime.create(cid, bundle("exit", 0))
    try:
        with pytest.raises(ContainerExists):
            await runtime.create(cid, bundle("exit", 1))
        again = await runtime.state(cid)
        assert (again.status, again.pid, again.bundle) == (first.status, first.pid, first.bundle)
    finally:
        await runtime.delete(cid, force=True)
    assert _leftovers(paths) == []


@pytest.mark.parametrize("verb", ["state", "start", "kill", "delete", "wait"])
async def test_unknown_id(runtime: OciRuntime, verb: str):
    call = {
        "state": lambda: runtime.state("nope"),
        "start": lambda: runtime.start("nope"),
        "kill": lambda: runtime.kill("nope", "TERM"),
        "delete": lambda: runtime.delete("nope"),
        "wait": lambda: runtime.wait("nope"),
    }[verb]
    with pytest.raises(ContainerNotFound, match="nope"):
        await call()


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "../x", "x" * 129, "sp ace", "é"])
async def test_invalid_id_touches_nothing(
    runtime: OciRuntime, bundle: MakeBundle, paths: Paths, bad: str
):
    with pytest.raises(InvalidContainerId):
        await runtime.create(bad, bundle("exit", 0))
    assert _leftovers(paths) == []
    assert not paths.oci_root.exists() or os.listdir(paths.oci_root) == []


async def test_container_limit(backend: Any, paths: Paths, bundle: MakeBundle):
    registry = RuntimeRegistry(paths, max_containers=2)
    runtime = backend.make_runtime(paths)
    runtime.store = registry.store  # type: ignore[attr-defined]
    ids = [f"lim-{n}-{os.getpid()}" for n in range(3)]
    await runtime.create(ids[0], bundle("exit", 0))
    await runtime.create(ids[1], bundle("exit", 0))
    try:
        with pytest.raises(ContainerLimitReached) as err:
            await runtime.create(ids[2], bundle("exit", 0))
        assert err.value.limit == 2
        assert sorted(_leftovers(paths)) == sorted(ids[:2])
    finally:
        for id in ids[:2]:
            await runtime.delete(id, force=True)
    assert _leftovers(paths) == []


async def test_logs_in_cri_format(runtime: OciRuntime, bundle: MakeBundle, cid: str):
    await runtime.create(cid, bundle("hello"))
    await runtime.start(cid)
    assert await runtime.wait(cid) == 0
    log = runtime.store.log_path(cid).read_text()  # type: ignore[attr-defined]
    stamp, stream, tag, text = log.splitlines()[0].split(" ", 3)
    assert stream == "stdout" and tag == "F" and text == "hello"
    assert stamp.endswith("Z") and len(stamp.split(".")[1]) == 10
    await runtime.delete(cid)


async def test_wait_concurrently(runtime: OciRuntime, bundle: MakeBundle, cid: str):
    await _running(runtime, bundle, cid)
    waiters = [asyncio.ensure_future(runtime.wait(cid)) for _ in range(3)]
    await runtime.kill(cid, "KILL")
    assert await asyncio.gather(*waiters) == [137, 137, 137]
    await runtime.delete(cid)
