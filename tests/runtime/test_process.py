"""The child-process helper: no fd leaks, real exit codes, children gone on failure."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from magikrun import _process
from magikrun.errors import MagikrunTimeout


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def test_exit_status_and_output():
    done = await _process.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
    killed = await _process.run(["/bin/sh", "-c", "kill -TERM $$"])
    assert killed.returncode == 128 + 15


async def test_input_and_only_passed_fds():
    leak = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leak, True)
    keep_r, keep_w = os.pipe()
    try:
        done = await _process.run(["/bin/ls", "/proc/self/fd"], pass_fds=[keep_w])
        fds = sorted(int(x) for x in done.stdout.split())
        assert leak not in fds and keep_w in fds
        echoed = await _process.run(["/bin/cat"], input=b"abc")
        assert echoed.stdout == b"abc"
    finally:
        for fd in (leak, keep_r, keep_w):
            os.close(fd)


async def test_timeout_stops_child_and_waits(short_tmp: Path):
    pid_file = short_tmp / "pid"
    script = f"echo $$ > {pid_file}; trap '' TERM; sleep 30"
    with pytest.raises(MagikrunTimeout, match=r"did not finish within 0\.5 s"):
        await _process.run(["/bin/sh", "-c", script], timeout=0.5, grace=0.2)
    assert _gone(int(pid_file.read_text()))


async def test_cancellation_stops_child_and_waits(short_tmp: Path):
    pid_file = short_tmp / "pid"
    task = asyncio.ensure_future(
        _process.run(
            [
                sys.executable,
                "-c",
                f"import os,time; open('{pid_file}','w').write(str(os.getpid())); time.sleep(30)",
            ]
        )
    )
    while not pid_file.exists() or not pid_file.read_text():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _gone(int(pid_file.read_text()))
