"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from magikrun.platform import Paths
from magikrun.pod._network import HOST_NETWORKS, PodNetwork, root_tag

if TYPE_CHECKING:
    from tests._registry import RegistryServer


def _reap_leftovers(path: Path) -> None:
    """Stop what a failed or interrupted test left running under ``path`` before the
    directory goes: containers (through the OCI binary that made them), processes naming
    the path (monitors, supervisors, QEMU), its IP allocations on the host's bridges,
    then mounts (rootfs overlays, netns binds).
    Tests assert "nothing left" themselves; this only keeps one failure from leaking
    into the machine and the tests after it."""
    for oci_root in (*path.glob("run/oci"), *path.glob("*/run/oci"), *path.glob("*/*/run/oci")):
        for binary in ("crun", "runc"):
            listed = subprocess.run(
                [binary, "--root", str(oci_root), "list", "-q"],
                capture_output=True,
                text=True,
                check=False,
            )
            for container in listed.stdout.split():
                subprocess.run(
                    [binary, "--root", str(oci_root), "delete", "--force", container],
                    capture_output=True,
                    check=False,
                )
    needle = str(path).encode()
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    bridges = [p.name for p in HOST_NETWORKS.iterdir()] if HOST_NETWORKS.is_dir() else []
    for run in (*path.glob("run"), *path.glob("*/run"), *path.glob("*/*/run")):
        root = Paths(data=run.parent, run=run)
        owner = f".{root_tag(root)}"
        for bridge in bridges:
            for allocation, holder in PodNetwork(root, bridge=bridge).allocations().items():
                if holder.endswith(owner):
                    allocation.unlink(missing_ok=True)
    prefix = str(path) + "/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for target in reversed(mounts):
        if target.startswith(prefix):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (unix sockets allow 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mk-", dir="/tmp"))
    try:
        yield path
    finally:
        if os.geteuid() == 0:
            _reap_leftovers(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def paths(short_tmp: Path) -> Paths:
    """An isolated magikrun root for one test."""
    return Paths.resolve(short_tmp / "root").ensure()


requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


REGISTRY_USERS = {"alice": "wonderland"}
"""The accounts of the ``auth_registry`` fixture (htpasswd, bcrypt)."""


@pytest.fixture(scope="session")
def registry() -> Iterator[RegistryServer]:
    """Debian's docker-registry on a free 127.0.0.1 port, anonymous (one per xdist worker)."""
    from tests._registry import RegistryServer

    server = RegistryServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def auth_registry() -> Iterator[RegistryServer]:
    """docker-registry behind htpasswd Basic auth with the accounts of REGISTRY_USERS."""
    from tests._registry import RegistryServer

    server = RegistryServer(users=REGISTRY_USERS).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def token_registry() -> Iterator[RegistryServer]:
    """docker-registry with Bearer token auth, and its token service (``.token``) on loopback:
    REGISTRY_USERS may push and pull, anonymous callers may pull ``public/*``."""
    from tests._registry import RegistryServer, TokenServer

    token = TokenServer(REGISTRY_USERS).start()
    server = RegistryServer(token=token)
    try:
        yield server.start()
    finally:
        server.stop()
        token.stop()
