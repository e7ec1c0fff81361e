"""Resolving paths inside a hostile root filesystem (magikrun._fs)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from magikrun import _fs
from magikrun._fs import RootPath, open_in_root, open_resolved, resolve_in_root
from magikrun.errors import UnsafeRootfsPath
from magikrun.platform import MAX_SYMLINK_DEPTH


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with /etc/passwd, /srv/data/, and a secret beside (outside) it."""
    (tmp_path / "secret").write_text("outside")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "srv/data").mkdir(parents=True)
    os.mkfifo(root / "fifo")
    return root


@pytest.fixture
def root_fd(root: Path) -> Iterator[int]:
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture(params=["openat2", "walk"])
def opener(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """open_in_root both ways: the kernel's RESOLVE_IN_ROOT and the walk kernels before 5.6
    get."""
    monkeypatch.setattr(_fs, "_openat2_missing", request.param == "walk")
    return str(request.param)


def _read(fd: int) -> str:
    with os.fdopen(fd) as file:
        return file.read()


def test_plain_paths_resolve_to_what_is_there(root_fd: int) -> None:
    assert resolve_in_root(root_fd, "/etc/passwd") == RootPath(("etc", "passwd"), "file")
    assert resolve_in_root(root_fd, "/srv/./data/") == RootPath(("srv", "data"), "dir")
    assert resolve_in_root(root_fd, "/") == RootPath((), "dir")
    assert resolve_in_root(root_fd, "fifo").kind == "other"
    missing = resolve_in_root(root_fd, "/srv/new/../app/x")
    assert missing == RootPath(("srv", "app", "x"), "missing")
    assert missing.path == "/srv/app/x"


def test_symlinks_resolve_inside_the_root(root: Path, root_fd: int) -> None:
    (root / "srv/abs").symlink_to("/etc")  # absolute: starts at the root, not the host's /
    (root / "srv/rel").symlink_to("../etc/passwd")
    (root / "srv/data/up").symlink_to("..")
    assert resolve_in_root(root_fd, "/srv/abs/passwd") == RootPath(("etc", "passwd"), "file")
    assert resolve_in_root(root_fd, "/srv/rel") == RootPath(("etc", "passwd"), "file")
    assert resolve_in_root(root_fd, "/srv/data/up/abs").path == "/etc"


@pytest.mark.parametrize(
    ("link", "path"),
    [
        (None, "/.."),
        (None, "/srv/../../secret"),
        ("../../secret", "/srv/esc"),
        ("../..", "/srv/esc/secret"),
        ("/../secret", "/srv/esc"),
    ],
)
def test_climbing_above_the_root_is_refused(
    root: Path, root_fd: int, link: str | None, path: str
) -> None:
    if link is not None:
        (root / "srv/esc").symlink_to(link)
    with pytest.raises(UnsafeRootfsPath, match="resolves outside the root filesystem") as info:
        resolve_in_root(root_fd, path)
    assert info.value.reason == "escape" and info.value.hint


def test_link_loops_and_depth_are_bounded(root: Path, root_fd: int) -> None:
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    with pytest.raises(UnsafeRootfsPath, match="too many levels of symbolic links") as info:
        resolve_in_root(root_fd, "/a")
    assert info.value.reason == "links"
    # A chain exactly MAX_SYMLINK_DEPTH long resolves; one more link is refused.
    for i in range(MAX_SYMLINK_DEPTH + 1):
        (root / f"l{i}").symlink_to(f"l{i + 1}" if i < MAX_SYMLINK_DEPTH else "etc")
    assert resolve_in_root(root_fd, "/l1") == RootPath(("etc",), "dir")
    with pytest.raises(UnsafeRootfsPath, match="too many levels"):
        resolve_in_root(root_fd, "/l0")


def test_a_path_through_a_file_is_refused(root_fd: int) -> None:
    with pytest.raises(UnsafeRootfsPath, match=r"/etc/passwd is not a directory") as info:
        resolve_in_root(root_fd, "/etc/passwd/x")
    assert info.value.reason == "notdir"


def test_open_in_root_stays_inside(root: Path, root_fd: int, tmp_path: Path, opener: str) -> None:
    flags = os.O_RDONLY | os.O_CLOEXEC
    (root / "srv/abs").symlink_to("/etc/passwd")
    (root / "srv/host").symlink_to(tmp_path / "secret")  # absolute host path: not followed out
    assert _read(open_in_root(root_fd, "/srv/abs", flags)).startswith("root:")
    with pytest.raises(FileNotFoundError):
        open_in_root(root_fd, "/srv/host", flags)
    with pytest.raises(FileNotFoundError):
        open_in_root(root_fd, "/srv/missing", flags)
    if opener == "openat2":  # the kernel keeps '..' at the root, as a chroot does
        with pytest.raises(FileNotFoundError):
            open_in_root(root_fd, "../secret", flags)
    else:
        with pytest.raises(UnsafeRootfsPath, match="outside the root"):
            open_in_root(root_fd, "../secret", flags)


def test_open_resolved_follows_no_link_swapped_in(root: Path, root_fd: int) -> None:
    resolved = resolve_in_root(root_fd, "/srv/data")
    os.rename(root / "srv/data", root / "srv/old")
    (root / "srv/data").symlink_to("/etc")
    with pytest.raises(OSError):
        open_resolved(root_fd, resolved, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    with pytest.raises(FileNotFoundError):
        open_resolved(root_fd, resolve_in_root(root_fd, "/nope"), os.O_RDONLY)
