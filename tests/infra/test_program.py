"""The infra program itself, run as the infra container runs it (a real process and socket):
bounded queues with reported overflow, counted ``on_event`` errors, unknown extensions,
``on_stop`` within the grace period."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from magikrun.errors import InfraExtensionFailed
from magikrun.infra import (
    ContainerCreated,
    ContainerExited,
    ContainerStarted,
    InfraLink,
    PodStopping,
)
from magikrun.infra._host import (
    EXTENSIONS_ANNOTATION,
    INFRA_PATH_ENV,
    resolve_extensions,
    write_pod_config,
)
from magikrun.platform._limits import INFRA_EVENT_QUEUE
from tests.infra._kit import free_port
from tests.infra.extpkg.dist import install

Program = Callable[..., Awaitable[tuple[asyncio.subprocess.Process, Path]]]


@pytest.fixture
async def program(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Program]:
    """Starts ``python -I -m magikrun.infra POD DIR`` with the test distribution on its path."""
    started: list[asyncio.subprocess.Process] = []
    ext = install(short_tmp / "ext")
    monkeypatch.setenv(INFRA_PATH_ENV, str(ext))

    async def start(
        extensions: list[str],
        config: dict[str, str] | None = None,
        grace: float = 30.0,
        targets: dict[str, str] | None = None,
    ) -> Any:
        directory = short_tmp / "infra"
        directory.mkdir(mode=0o700)
        annotations = {f"magikrun.io/infra-config.{k}": v for k, v in (config or {}).items()}
        annotations[EXTENSIONS_ANNOTATION] = ",".join(extensions)
        write_pod_config(
            directory,
            name="p",
            namespace="default",
            uid="u",
            labels={},
            annotations=annotations,
            pod_ip=None,
            placement="native",
            grace=grace,
            extensions=resolve_extensions("default_p", annotations),
            path=[str(ext)],
        )
        if targets:  # what the host resolved no longer imports (uninstalled, broken)
            document = json.loads((directory / "pod.json").read_text())
            document["targets"].update(targets)
            (directory / "pod.json").write_text(json.dumps(document))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-m",
            "magikrun.infra",
            "default_p",
            str(directory),
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(proc)
        return proc, directory

    yield start
    for proc in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _stop(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    err = await proc.stderr.read()
    return await proc.wait(), err.decode()


def _recorded(directory: Path, name: str) -> list[dict[str, Any]]:
    path = directory / "state" / name / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_slow_extension_overflow_is_counted_and_reported(program: Program) -> None:
    proc, directory = await program(["slow"], {"slow": '{"delay": 0.005}'})
    link = await InfraLink.connect_unix(directory, on_port=None, pod_id="default_p")
    await link.wait_ready()
    sent = INFRA_EVENT_QUEUE * 3
    for i in range(sent):
        await link.send(ContainerCreated(name=f"c{i}"))
    await link.aclose()
    code, err = await _stop(proc)  # the stop drains what was queued (within grace)
    assert code == 0
    events = _recorded(directory, "slow")
    created = [e for e in events if e["kind"] == "ContainerCreated"]
    dropped = sum(e["count"] for e in events if e["kind"] == "EventsDropped")
    assert dropped > 0
    assert len(created) + dropped == sent  # every event was handled or reported as dropped
    assert "extension slow is slow: event ContainerCreated dropped" in err
    assert (directory / "state" / "slow" / "stopped").exists()


async def test_on_event_errors_are_counted_not_fatal(program: Program) -> None:
    proc, directory = await program(["flaky"])
    link = await InfraLink.connect_unix(directory, on_port=None, pod_id="default_p")
    await link.wait_ready()
    for event in (
        ContainerCreated(name="a"),
        ContainerStarted(name="a", pid=7),
        ContainerStarted(name="b", pid=8),
        ContainerExited(name="a", exit_code=3, reason="Error"),
    ):
        await link.send(event)
    await link.aclose()
    code, err = await _stop(proc)
    assert code == 0
    kinds = [(e["kind"], e["name"]) for e in _recorded(directory, "flaky")]
    assert kinds == [("ContainerCreated", "a"), ("ContainerExited", "a")]
    assert "extension flaky failed on ContainerStarted (2 errors so far)" in err
    assert "ValueError: cannot handle b" in err


def test_unknown_extension_is_refused_before_the_program_starts() -> None:
    with pytest.raises(InfraExtensionFailed) as caught:
        resolve_extensions("default_p", {EXTENSIONS_ANNOTATION: "health,nope"})
    assert caught.value.message.startswith(
        "infra extension 'nope' of pod default_p failed to start: "
        "no infra extension named 'nope' (installed: "
    )
    assert "health" in caught.value.message.rpartition("installed: ")[2]
    assert caught.value.subject["extension"] == "nope"


async def test_extension_that_no_longer_imports_fails_the_handshake(program: Program) -> None:
    proc, directory = await program(
        ["recorder", "flaky"], targets={"flaky": "magikrun_uninstalled_ext:Gone"}
    )
    link = await InfraLink.connect_unix(directory, on_port=None, pod_id="default_p")
    with pytest.raises(
        InfraExtensionFailed, match=r"'flaky'.*No module named 'magikrun_uninstalled_ext'"
    ) as e:
        await link.wait_ready()
    assert e.value.subject["extension"] == "flaky"
    await link.aclose()
    code, _ = await _stop(proc)
    assert code == 1
    assert (directory / "state" / "recorder" / "stopped").exists()  # the started one stopped


async def test_port_request_without_a_forwarder_is_refused(program: Program) -> None:
    config = json.dumps({"port": free_port(), "hostPort": 18081})
    proc, directory = await program(["health"], {"health": config})
    link = await InfraLink.connect_unix(directory, on_port=None, pod_id="default_p")
    with pytest.raises(InfraExtensionFailed, match=r"'health'.*refused: this placement offers"):
        await link.wait_ready()
    await link.aclose()
    code, _ = await _stop(proc)
    assert code == 1


async def _lingering(
    program: Program, stop: float, grace: float, stopping: float | None = None
) -> tuple[Path, str]:
    """Run ``lingering`` (``stop`` seconds in ``on_stop``) with the pod's ``grace``, tell it
    ``PodStopping(stopping)`` when given, stop it; its state dir and the program's log."""
    proc, directory = await program(["lingering"], {"lingering": f'{{"stop": {stop}}}'}, grace)
    link = await InfraLink.connect_unix(directory, on_port=None, pod_id="default_p")
    await link.wait_ready()
    if stopping is not None:
        await link.send(PodStopping(grace=stopping))
    await link.aclose()
    code, err = await _stop(proc)
    assert code == 0
    return directory / "state" / "lingering", err


async def test_on_stop_gets_the_grace_period(program: Program) -> None:
    state, err = await _lingering(program, stop=1.5, grace=10.0)
    assert (state / "stopped").exists()  # 1.5 s is over the 1 s floor, within the grace
    assert not (state / "cut").exists()
    assert "failed to stop" not in err


async def test_on_stop_is_cut_at_the_end_of_the_grace_period(program: Program) -> None:
    state, err = await _lingering(program, stop=600, grace=1.5)
    assert (state / "cut").exists() and not (state / "stopped").exists()
    assert "extension lingering failed to stop" in err


async def test_on_stop_gets_the_grace_of_the_stop(program: Program) -> None:
    state, _ = await _lingering(program, stop=1.5, grace=0.5, stopping=10.0)  # stop_pod's
    assert (state / "stopped").exists() and not (state / "cut").exists()
