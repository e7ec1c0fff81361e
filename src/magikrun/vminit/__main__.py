"""The guest's PID 1: ``magikrun.vminit CONFIG`` (started by /init's bootstrap)."""

from __future__ import annotations

import os
import sys
import time

from ._init import Loop, Supervisor, power_off
from ._pod import mount_system, prepare
from ._protocol import loads
from ._server import ControlServer, find_port

_PORT_WAIT = 5.0


def _open_port() -> int:
    deadline = time.monotonic() + _PORT_WAIT
    while True:
        try:
            return os.open(find_port(), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _uptime() -> float:
    with open("/proc/uptime") as handle:
        return float(handle.read().split()[0])


def serve(config_path: str) -> None:
    """Mount the kernel's filesystems, set up mounts and network, start the pod (see
    ``ControlServer.boot``), announce ready with the guest's uptime at each step (for
    the host's boot timeline), serve."""
    mount_system()
    marks = {"vminit.main": _uptime()}
    with open(config_path, "rb") as handle:
        config = loads(handle.read())
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds no JSON object")
    prepare(config)
    marks["vminit.prepared"] = _uptime()
    loop = Loop()
    supervisor = Supervisor(loop)
    server = ControlServer(_open_port(), config, supervisor, power_off)
    server.boot(config)
    marks["vminit.started"] = _uptime()
    if not config.get("never_ready"):
        release = os.uname().release
        uptime = marks["vminit.started"]
        server.send({"event": "ready", "kernel": release, "uptime": uptime, "marks": marks})
    loop.run()


def main(argv: list[str]) -> None:
    try:
        serve(argv[1])
    except BaseException:
        if os.getpid() == 1:  # powering off would lose the traceback on the console
            import traceback

            traceback.print_exc()
        raise
    finally:
        if os.getpid() == 1:
            power_off()


if __name__ == "__main__":
    main(sys.argv)
