"""MicroVmRuntime: one container in its own VM, through the OCI lifecycle and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from magikrun.errors import ContainerNotFound, InvalidState
from magikrun.platform import Paths
from magikrun.runtime import ContainerStatus, RuntimeRegistry
from magikrun.runtime._microvm import MicroVmRuntime

from ..runtime._bundles import native_bundle
from .conftest import needs_vm
from .test_microvm_pod import _processes

pytestmark = [pytest.mark.slow, needs_vm]


def _nothing_left(paths: Paths, cid: str) -> None:
    assert not _processes(paths)
    assert not (paths.containers / cid).exists()
    vms = paths.run / "vms"
    assert not vms.is_dir() or not any(vms.iterdir())


async def test_lifecycle_create_start_state_kill_delete(paths: Paths, tmp_path: Path) -> None:
    cid = f"vmc{os.getpid()}"
    bundle = native_bundle(
        paths, tmp_path / "b", ["sh", "-c", "echo started; trap 'exit 42' TERM; "
                                "while true; do sleep 1; done"], name=cid
    )  # fmt: skip
    runtime = RuntimeRegistry(paths).backend("vm")
    assert isinstance(runtime, MicroVmRuntime) and runtime.is_available()
    created = await runtime.create(cid, bundle)
    try:
        assert created.status is ContainerStatus.CREATED
        assert created.pid is not None and created.pid in await runtime.ps(cid)
        with pytest.raises(InvalidState):
            await runtime.delete(cid)
        running = await runtime.start(cid)
        assert running.status is ContainerStatus.RUNNING
        with pytest.raises(InvalidState):
            await runtime.start(cid)
        out = await runtime.exec(cid, ["sh", "-c", "echo in-vm; exit 3"])
        assert (out.exit_code, out.stdout) == (3, b"in-vm\n")
        await runtime.kill(cid, "TERM")
        assert await runtime.wait(cid) == 42
        state = await runtime.state(cid)
        assert state.status is ContainerStatus.STOPPED and state.exit_code == 42
        log = runtime.store.log_path(cid).read_text()
        assert " stdout F started" in log
    finally:
        await runtime.delete(cid, force=True)
    with pytest.raises(ContainerNotFound):
        await runtime.state(cid)
    _nothing_left(paths, cid)


async def test_kill_before_start_and_cli_run(paths: Paths, tmp_path: Path) -> None:
    cid = f"vmk{os.getpid()}"
    bundle = native_bundle(paths, tmp_path / "b", ["sh", "-c", "exit 0"], name=cid)
    runtime = MicroVmRuntime(paths)
    await runtime.create(cid, bundle)
    await runtime.kill(cid, "KILL")
    assert await runtime.wait(cid) == 137
    await runtime.delete(cid)
    _nothing_left(paths, cid)

    cli = f"vmr{os.getpid()}"
    bundle = native_bundle(paths, tmp_path / "r", ["sh", "-c", "echo via-cli; exit 7"], name=cli)
    env = {**os.environ, "MAGIKRUN_ROOT": str(paths.data)}
    magikrun = str(Path(sys.executable).parent / "magikrun")

    def cli_run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([magikrun, *args], capture_output=True, env=env, timeout=300)

    started = cli_run("run", "--runtime", "microvm", "--detach", "--bundle", str(bundle), cli)
    assert started.returncode == 0, started.stderr
    assert await MicroVmRuntime(paths).wait(cli) == 7
    state = cli_run("state", cli)
    assert json.loads(state.stdout)["status"] == "stopped", state.stderr
    assert cli_run("delete", cli).returncode == 0
    _nothing_left(paths, cli)
