"""The monitor on its own: generic argv, readiness over a fd, CRI records, exit codes."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from pathlib import Path

from magikrun import _process
from magikrun.runtime._monitor import EXIT_FILE, LOG_FILE, MonitorSpec, read_exit

_READY = "import os; os.write(int(os.environ['MAGIKRUN_READY_FD']), b'ok\\n'); "


def _spec(directory: Path, body: str) -> MonitorSpec:
    code = _READY + body
    return MonitorSpec(argv=[sys.executable, "-c", code], directory=str(directory), ready="fd")


async def _finish(report: _process.MonitorReport) -> None:
    await _process.wait_exit(report.monitor_pid)


def _records(directory: Path) -> list[tuple[str, str, str, str]]:
    lines = (directory / LOG_FILE).read_bytes().decode().splitlines()
    return [tuple(line.split(" ", 3)) for line in lines]  # type: ignore[misc]


async def test_cri_records_full_and_partial(short_tmp: Path):
    body = (
        textwrap.dedent(
            """
        import sys
        sys.stdout.write('a' * 40000 + '\\n'); sys.stdout.flush()
        sys.stderr.write('one\\ntwo\\n'); sys.stderr.flush()
        sys.stdout.write('tail without newline')
        """
        )
        .replace("\n", "; ")
        .strip("; ")
    )
    report = await _process.start_monitor(_spec(short_tmp, body))
    assert report.ok and report.pid and report.monitor_pid
    await _finish(report)
    records = _records(short_tmp)
    out = [r for r in records if r[1] == "stdout"]
    assert [r[2] for r in out] == ["P", "P", "F", "F"]
    assert "".join(r[3] for r in out[:3]) == "a" * 40000
    assert out[3][3] == "tail without newline"
    assert [r[3] for r in records if r[1] == "stderr"] == ["one", "two"]
    assert read_exit(str(short_tmp))["exitCode"] == 0  # type: ignore[index]


async def test_signal_exit_code_is_128_plus_n(short_tmp: Path):
    report = await _process.start_monitor(_spec(short_tmp, "import os; os.kill(os.getpid(), 10)"))
    await _finish(report)
    assert read_exit(str(short_tmp))["exitCode"] == 138  # type: ignore[index]


async def test_not_ready_is_a_failure_with_stderr(short_tmp: Path):
    spec = MonitorSpec(
        argv=[sys.executable, "-c", "import sys; sys.exit('cannot load module')"],
        directory=str(short_tmp),
        ready="fd",
    )
    report = await _process.start_monitor(spec)
    assert not report.ok
    assert "cannot load module" in report.stderr
    assert not (short_tmp / EXIT_FILE).exists()


async def test_ready_exit_mode_failure(short_tmp: Path):
    spec = MonitorSpec(
        argv=["/bin/sh", "-c", "echo 'no such bundle' >&2; exit 2"],
        directory=str(short_tmp),
        pid_file=str(short_tmp / "pid"),
    )
    report = await _process.start_monitor(spec)
    assert (report.ok, report.status) == (False, 2)
    assert "no such bundle" in report.stderr


async def test_monitor_started_without_fork_when_threads_run(short_tmp: Path):
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        report = await _process.start_monitor(_spec(short_tmp, "print('from exec path')"))
    finally:
        stop.set()
        thread.join()
    assert report.ok
    await _finish(report)
    assert _records(short_tmp)[0][3] == "from exec path"
    assert os.path.exists(short_tmp / EXIT_FILE)


async def test_failed_ready_line_ends_process_and_monitor(short_tmp: Path):
    token = f"never-ready-{os.getpid()}-{id(short_tmp)}"
    code = (
        "import os, time; "
        "os.write(int(os.environ['MAGIKRUN_READY_FD']), b'cannot link\\n'); "
        f"time.sleep(1000)  # {token}"
    )
    spec = MonitorSpec(argv=[sys.executable, "-c", code], directory=str(short_tmp), ready="fd")
    report = await _process.start_monitor(spec)
    assert (report.ok, report.reason) == (False, "cannot link")
    # The monitor kills the process that never became ready and ends, recording no exit.
    await asyncio.wait_for(_process.wait_exit(report.monitor_pid), 60)
    assert not (short_tmp / EXIT_FILE).exists()
    assert not [
        pid for pid in os.listdir("/proc") if pid.isdigit() and token.encode() in _cmdline(pid)
    ]


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
