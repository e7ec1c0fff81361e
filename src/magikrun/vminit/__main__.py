"""The guest's PID 1: ``magikrun.vminit CONFIG`` (started by /init's bootstrap)."""

from __future__ import annotations

import json
import os
import sys
import time

from ._init import Loop, Supervisor, power_off
from ._pod import prepare
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


def serve(config: dict[str, object]) -> None:
    """Set up mounts and network, start the pod (see ``ControlServer.boot``), announce ready,
    serve."""
    prepare(config)
    loop = Loop()
    supervisor = Supervisor(loop)
    server = ControlServer(_open_port(), config, supervisor, power_off)
    server.boot(config)
    if not config.get("never_ready"):
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        server.send({"event": "ready", "kernel": os.uname().release, "uptime": uptime})
    loop.run()


def main(argv: list[str]) -> None:
    with open(argv[1], "rb") as handle:
        config = json.load(handle)
    try:
        serve(config)
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
