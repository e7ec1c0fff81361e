"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from magikrun.platform import Paths

if TYPE_CHECKING:
    from tests._registry import RegistryServer


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (unix sockets allow 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mk-", dir="/tmp"))
    try:
        yield path
    finally:
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
