"""NativeRuntime specifics: hostile bundles, every signal, exec, fds, recovery, crun errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from magikrun.errors import CreateFailed, InvalidBundle, InvalidState
from magikrun.platform import Paths
from magikrun.runtime import ContainerStatus, NativeRuntime
from tests.runtime._bundles import native_bundle

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="native containers need root")


def _name() -> str:
    return f"n-{uuid.uuid4().hex[:12]}"


def _nothing_left(paths: Paths) -> None:
    containers = [p.name for p in paths.containers.iterdir()] if paths.containers.exists() else []
    assert [n for n in containers if n != ".lock"] == []
    assert not paths.oci_root.exists() or os.listdir(paths.oci_root) == []


@pytest.fixture
def rt(paths: Paths) -> NativeRuntime:
    return NativeRuntime(paths)


def _bundle(paths: Paths, tmp: Path, argv: list[str], **kw: Any) -> Path:
    return native_bundle(paths, tmp / f"b-{uuid.uuid4().hex[:8]}", argv, name=_name(), **kw)


def _set(path: str, value: Any) -> Any:
    def edit(spec: dict[str, Any]) -> None:
        node = spec
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value

    return edit


# ------------------------------------------------------------------------ hostile config.json


def _escape_link(bundle: Path) -> None:
    (bundle / "rootfs" / "escape").symlink_to("../../../../../../etc")


@pytest.mark.parametrize(
    ("edit", "prepare", "message"),
    [
        (_set("process.cwd", "/.."), None, "leaves the container's root filesystem"),
        (_set("process.cwd", "/tmp/../../etc"), None, "leaves the container's root"),
        (_set("process.cwd", "/escape"), _escape_link, "leaves the container's root"),
        (_set("process.cwd", "tmp"), None, "must be an absolute path"),
        (_set("process.cwd", "/proc/self/fd/7"), None, "points into /proc"),
        (_set("process.capabilities.bounding", ["CAP_FLY"]), None, "unknown capabilities"),
        (
            _set("process.rlimits", [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}]),
            None,
            "unknown rlimit",
        ),
        (
            _set("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}]),
            None,
            "soft 10 is above hard 5",
        ),
        (
            _set("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": -1, "hard": "x"}]),
            None,
            "non-negative integer",
        ),
        (_set("process.args", []), None, "process.args"),
        (_set("root.path", "missing"), None, "is not a directory"),
    ],
)
async def test_hostile_config_refused_before_crun(
    rt: NativeRuntime, paths: Paths, short_tmp: Path, edit: Any, prepare: Any, message: str
) -> None:
    bundle = _bundle(paths, short_tmp, ["/bin/true"], edit=edit)
    if prepare is not None:
        prepare(bundle)
    with pytest.raises(InvalidBundle, match=message) as err:
        await rt.create(f"h-{uuid.uuid4().hex[:8]}", bundle)
    assert err.value.hint
    _nothing_left(paths)


async def test_rlimit_above_host_hard_limit(rt: NativeRuntime, paths: Paths, short_tmp: Path):
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    status = Path("/proc/self/status").read_text()
    cap_eff = int(next(x for x in status.splitlines() if x.startswith("CapEff")).split()[1], 16)
    if hard == resource.RLIM_INFINITY or cap_eff >> 24 & 1:
        pytest.skip("this process may raise RLIMIT_NOFILE (CAP_SYS_RESOURCE or no hard limit)")
    limits = [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": hard + 1}]
    bundle = _bundle(paths, short_tmp, ["/bin/true"], edit=_set("process.rlimits", limits))
    with pytest.raises(InvalidBundle, match=f"above this host's hard limit {hard}"):
        await rt.create(_name(), bundle)
    _nothing_left(paths)


async def test_missing_config(rt: NativeRuntime, paths: Paths, short_tmp: Path):
    with pytest.raises(InvalidBundle, match=r"has no config\.json"):
        await rt.create(_name(), short_tmp)
    _nothing_left(paths)


async def test_crun_failure_is_create_failed_and_cleaned(
    rt: NativeRuntime, paths: Paths, short_tmp: Path
):
    bundle = _bundle(paths, short_tmp, ["/no/such/program"])
    with pytest.raises(CreateFailed, match="/no/such/program") as err:
        await rt.create(_name(), bundle)
    assert "crun create" in err.value.message
    _nothing_left(paths)


# ----------------------------------------------------------------------------------- signals

_TERMINATING = [
    s
    for s in signal.Signals
    if s
    not in (
        signal.SIGCHLD,
        signal.SIGCONT,
        signal.SIGURG,
        signal.SIGWINCH,
        signal.SIGSTOP,
        signal.SIGTSTP,
        signal.SIGTTIN,
        signal.SIGTTOU,
    )
] + [signal.SIGRTMIN + 1, signal.SIGRTMAX]


def _no_pid_namespace(spec: dict[str, Any]) -> None:
    """Outside a pid namespace the process is no init: default dispositions apply."""
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
    spec["process"]["rlimits"] = [{"type": "RLIMIT_CORE", "soft": 0, "hard": 0}]


@pytest.mark.parametrize("sig", _TERMINATING, ids=lambda s: str(int(s)))
async def test_kill_every_signal(rt: NativeRuntime, paths: Paths, short_tmp: Path, sig: int):
    bundle = _bundle(paths, short_tmp, ["/bin/sleep", "1000"], edit=_no_pid_namespace)
    cid = _name()
    await rt.create(cid, bundle)
    await rt.start(cid)
    await rt.kill(cid, int(sig))
    assert await rt.wait(cid) == 128 + int(sig)
    await rt.delete(cid)
    _nothing_left(paths)


@pytest.mark.parametrize("spelling", ["KILL", "SIGKILL", "kill", "9"])
async def test_kill_spellings_in_pid_namespace(
    rt: NativeRuntime, paths: Paths, short_tmp: Path, spelling: str
):
    cid = _name()
    await rt.create(cid, _bundle(paths, short_tmp, ["/bin/sleep", "1000"]))
    await rt.start(cid)
    await rt.kill(cid, spelling)
    assert await rt.wait(cid) == 137


# --------------------------------------------------------------------------------- exec, fds


async def test_exec(rt: NativeRuntime, paths: Paths, short_tmp: Path):
    cid = _name()
    await rt.create(cid, _bundle(paths, short_tmp, ["/bin/sleep", "1000"]))
    with pytest.raises(InvalidState, match="created"):
        await rt.exec(cid, ["/bin/true"])
    await rt.start(cid)
    try:
        result = await rt.exec(
            cid,
            ["/bin/sh", "-c", 'echo "$GREETING $(pwd)"; echo oops >&2; exit 9'],
            env={"GREETING": "hi"},
            cwd="/tmp",
        )
        assert (result.exit_code, result.stdout, result.stderr) == (9, b"hi /tmp\n", b"oops\n")
        missing = await rt.exec(cid, ["/no/such"])
        assert missing.exit_code != 0
        assert len(await rt.ps(cid)) == 1
    finally:
        await rt.delete(cid, force=True)
    _nothing_left(paths)


async def test_no_stray_fds_in_container(rt: NativeRuntime, paths: Paths, short_tmp: Path):
    leak = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leak, True)
    try:
        cid = _name()
        await rt.create(cid, _bundle(paths, short_tmp, ["/bin/ls", "/proc/self/fd"]))
        await rt.start(cid)
        assert await rt.wait(cid) == 0
        lines = rt.store.log_path(cid).read_text().splitlines()
        fds = sorted(int(line.split(" ", 3)[3]) for line in lines)
        assert fds == [0, 1, 2, 3]  # stdio and ls's own directory fd
        await rt.delete(cid)
    finally:
        os.close(leak)


# --------------------------------------------------------------------------------- recovery

_CREATOR = textwrap.dedent(
    """
    import asyncio, sys
    from magikrun.platform import Paths
    from magikrun.runtime import NativeRuntime

    async def main():
        rt = NativeRuntime(Paths.resolve(sys.argv[1]))
        await rt.create(sys.argv[2], sys.argv[3])
        await rt.start(sys.argv[2])

    asyncio.run(main())
    """
)


async def test_new_process_recovers_state_and_exit_code(paths: Paths, short_tmp: Path):
    argv = ["/bin/sh", "-c", "read x < /go; echo done; exit 7"]
    bundle = _bundle(paths, short_tmp, argv)
    fifo = bundle / "rootfs" / "go"
    cid = _name()
    os.mkfifo(fifo)
    root = str(paths.data)
    creator = subprocess.run(
        [sys.executable, "-c", _CREATOR, root, cid, str(bundle)], capture_output=True, timeout=60
    )
    assert creator.returncode == 0, creator.stderr.decode()
    rt = NativeRuntime(Paths.resolve(root))
    assert (await rt.state(cid)).status is ContainerStatus.RUNNING
    with open(fifo, "w") as f:
        f.write("go\n")
    assert await rt.wait(cid) == 7
    assert "stdout F done" in rt.store.log_path(cid).read_text()
    await rt.delete(cid)
    _nothing_left(paths)


async def test_record_survives_monitor_loss(rt: NativeRuntime, paths: Paths, short_tmp: Path):
    cid = _name()
    await rt.create(cid, _bundle(paths, short_tmp, ["/bin/sleep", "1000"]))
    await rt.start(cid)
    record = rt.store.load(cid)
    assert record.monitor_pid is not None
    os.kill(record.monitor_pid, signal.SIGKILL)
    assert (await rt.state(cid)).status is ContainerStatus.RUNNING
    await rt.delete(cid, force=True)
    _nothing_left(paths)


async def test_runc_selected_explicitly(paths: Paths, short_tmp: Path):
    rt = NativeRuntime(paths, oci_binary="runc")
    cid = _name()
    await rt.create(cid, _bundle(paths, short_tmp, ["/bin/sh", "-c", "exit 4"]))
    assert rt.store.load(cid).extra["oci_binary"].endswith("runc")
    await rt.start(cid)
    assert await rt.wait(cid) == 4
    await rt.delete(cid)
    _nothing_left(paths)


async def test_console_socket_receives_the_pty(rt: NativeRuntime, paths: Paths, short_tmp: Path):
    import asyncio
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(short_tmp / "console.sock"))
    server.listen(1)

    def receive_pty() -> int:
        conn, _ = server.accept()
        with conn:
            _msg, fds, _flags, _addr = socket.recv_fds(conn, 1024, 1)
        return fds[0]

    def read_until_eof(fd: int) -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO once the last process holding the tty exits
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    bundle = _bundle(
        paths,
        short_tmp,
        ["/bin/sh", "-c", "[ -t 1 ] && echo on-a-tty"],
        edit=_set("process.terminal", True),
    )
    cid = _name()
    try:
        receiving = asyncio.ensure_future(asyncio.to_thread(receive_pty))
        await rt.create(cid, bundle, console_socket=short_tmp / "console.sock")
        master = await receiving
        await rt.start(cid)
        output = await asyncio.to_thread(read_until_eof, master)
        os.close(master)
        assert await rt.wait(cid) == 0
        assert b"on-a-tty" in output
    finally:
        server.close()
        await rt.delete(cid, force=True)
    _nothing_left(paths)
