"""The runc-compatible command line, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from magikrun.platform import Paths
from tests.runtime._bundles import native_bundle

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="native containers need root")


def _mk(
    paths: Paths, *args: str, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "magikrun", "--root", str(paths.data), *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kw,  # type: ignore[call-overload]
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def _bundle(paths: Paths, tmp: Path, argv: list[str]) -> Path:
    return native_bundle(
        paths, tmp / uuid.uuid4().hex[:8], argv, name=f"cli-{uuid.uuid4().hex[:12]}"
    )


def _cid() -> str:
    return f"cli-{uuid.uuid4().hex[:12]}"


def _nothing_left(paths: Paths) -> None:
    names = [p.name for p in paths.containers.iterdir()] if paths.containers.exists() else []
    assert [n for n in names if n != ".lock"] == []


def test_run_foreground_stdio_and_exit_code(paths: Paths, short_tmp: Path):
    bundle = _bundle(paths, short_tmp, ["/bin/sh", "-c", "read line; echo got $line; exit 3"])
    done = _mk(paths, "run", "--bundle", str(bundle), _cid(), check=False, input="ping\n")
    assert (done.returncode, done.stdout) == (3, "got ping\n"), done.stderr
    _nothing_left(paths)


def test_lifecycle_verbs(paths: Paths, short_tmp: Path):
    bundle = _bundle(paths, short_tmp, ["/bin/sleep", "1000"])
    cid = _cid()
    pid_file = short_tmp / "pid"
    _mk(
        paths,
        "create",
        "--bundle",
        str(bundle),
        "--pid-file",
        str(pid_file),
        "--no-pivot",
        "--no-new-keyring",
        "--preserve-fds",
        "0",
        cid,
    )
    state = json.loads(_mk(paths, "state", cid).stdout)
    assert state["status"] == "created" and state["pid"] == int(pid_file.read_text())
    _mk(paths, "start", cid)
    assert json.loads(_mk(paths, "state", cid).stdout)["status"] == "running"
    listed = json.loads(_mk(paths, "list", "--format", "json").stdout)
    assert [c["id"] for c in listed] == [cid]
    assert _mk(paths, "list", "-q").stdout.split() == [cid]
    assert _mk(paths, "ps", cid).stdout.split()[0] == "PID"

    refused = _mk(paths, "delete", cid, check=False)
    assert refused.returncode == 1
    assert "cannot delete container" in refused.stderr and "hint:" in refused.stderr
    assert json.loads(_mk(paths, "state", cid).stdout)["status"] == "running"

    ran = _mk(paths, "exec", cid, "/bin/sh", "-c", "echo inside; exit 6", check=False)
    assert (ran.returncode, ran.stdout) == (6, "inside\n")
    _mk(paths, "kill", cid, "SIGKILL")
    _mk(paths, "delete", cid)
    _nothing_left(paths)


@pytest.mark.parametrize("sig", ["KILL", "9", "SIGKILL"])
def test_kill_signal_spellings(paths: Paths, short_tmp: Path, sig: str):
    cid = _cid()
    _mk(paths, "run", "-d", "--bundle", str(_bundle(paths, short_tmp, ["/bin/sleep", "1000"])), cid)
    _mk(paths, "kill", cid, sig)
    subprocess.run(["sleep", "0.2"], check=True)
    state = json.loads(_mk(paths, "state", cid).stdout)
    assert (state["status"], state["exitCode"]) == ("stopped", 137)
    _mk(paths, "delete", cid)


def test_bad_signal_and_unknown_id(paths: Paths):
    bad = _mk(paths, "kill", "whatever", "SIGNOPE", check=False)
    assert bad.returncode == 1 and "unknown signal" in bad.stderr
    missing = _mk(paths, "--json", "state", "nope", check=False)
    assert missing.returncode == 1
    assert json.loads(missing.stderr)["error"] == "ContainerNotFound"


def test_runc_as_oci_binary(paths: Paths, short_tmp: Path):
    bundle = _bundle(paths, short_tmp, ["/bin/sh", "-c", "exit 5"])
    done = _mk(paths, "run", "--oci-binary", "runc", "--bundle", str(bundle), _cid(), check=False)
    assert done.returncode == 5, done.stderr
    _nothing_left(paths)


def test_cli_path_stays_lean(paths: Paths):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "magikrun", "--root", str(paths.data), "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    modules = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
    assert not {m for m in modules if m.split(".")[0] in ("httpx", "rich", "wasmtime", "yaml")}
