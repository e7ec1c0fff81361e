"""The snapshot store and root filesystems, on real overlay mounts.

Storage never parses tar, so these tests fill snapshots directly in overlayfs' format
(0/0 character devices for whiteouts, ``trusted.overlay.opaque`` for opaque dirs).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from magikrun.errors import (
    InvalidArgument,
    InvalidDigest,
    RootfsExists,
    SnapshotInUse,
    SnapshotNotFound,
    StorageError,
)
from magikrun.platform import Paths
from magikrun.storage import Rootfs, SnapshotStore

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (overlay mounts)")

Spec = dict[str, object]
"""path -> bytes (file), "dir", "opaque" / "user-opaque" (opaque dir as root / as an
unprivileged extraction marks it), "whiteout", ("link", target)."""


def digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def filler(spec: Spec) -> Callable[[int], None]:
    def fill(root_fd: int) -> None:
        root = Path(f"/proc/self/fd/{root_fd}")
        for rel, what in spec.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(what, bytes):
                path.write_bytes(what)
            elif what in ("dir", "opaque", "user-opaque"):
                path.mkdir(exist_ok=True)
                if what == "opaque":
                    os.setxattr(path, "trusted.overlay.opaque", b"y")
                elif what == "user-opaque":
                    os.setxattr(path, "user.overlay.opaque", b"y")
            elif what == "whiteout":
                os.mknod(path, stat.S_IFCHR, 0)
            else:
                assert isinstance(what, tuple)
                os.symlink(what[1], path)

    return fill


async def snapshot(store: SnapshotStore, name: str, spec: Spec) -> str:
    await store.extract(digest(name), filler(spec))
    return digest(name)


def tree(top: Path) -> dict[str, tuple[int, bytes]]:
    found: dict[str, tuple[int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            content = b""
            if stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path).encode()
            found[str(path.relative_to(top))] = (st.st_mode, content)
    return found


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as info:
        return any(line.split()[4] == str(path) for line in info)


def leftovers(paths: Paths) -> list[str]:
    return os.listdir(paths.snapshots / "tmp") + [
        n for n in os.listdir(paths.run / "rootfs") if n.startswith(".")
    ]


BASE: Spec = {
    "bin/sh": b"#!sh",
    "etc/passwd": b"root:x:0:0",
    "etc/old": b"old",
    "var/lib/data/a": b"a",
    "var/lib/data/b": b"b",
    "lnk": ("link", "/etc/passwd"),
}
TOP: Spec = {
    "etc/passwd": "whiteout",
    "etc/new": b"new",
    "var/lib/data": "opaque",
    "var/lib/data/c": b"c",
    "lnk": "whiteout",
    "bin/sh": b"#!newsh",
}
EXPECTED = {"bin", "bin/sh", "etc", "etc/old", "etc/new", "var", "var/lib", "var/lib/data"}
EXPECTED |= {"var/lib/data/c"}


# -- snapshots ----------------------------------------------------------------------------


async def test_extract_commits_only_on_success(paths: Paths) -> None:
    store = SnapshotStore(paths)

    def fail(root_fd: int) -> None:
        filler({"big": b"x" * 100_000})(root_fd)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await store.extract(digest("a"), fail)
    assert not store.has(digest("a"))
    assert store.list() == []
    assert leftovers(paths) == []
    with pytest.raises(SnapshotNotFound, match="is not unpacked"):
        store.path(digest("a"))


async def test_extract_once_across_tasks_and_threads(paths: Paths) -> None:
    store = SnapshotStore(paths)
    calls: list[int] = []

    def fill(root_fd: int) -> None:
        calls.append(1)
        time.sleep(0.05)
        filler({"f": b"x"})(root_fd)

    def in_thread() -> Path:
        return asyncio.run(SnapshotStore(paths).extract(digest("one"), fill))

    threads: list[Path] = []
    worker = threading.Thread(target=lambda: threads.append(in_thread()))
    worker.start()
    results = await asyncio.gather(*(store.extract(digest("one"), fill) for _ in range(5)))
    await asyncio.to_thread(worker.join)
    assert len(calls) == 1
    assert set(results) | set(threads) == {store.path(digest("one"))}
    assert (store.path(digest("one")) / "f").read_bytes() == b"x"


async def test_extract_once_across_processes(paths: Paths) -> None:
    code = (
        "import asyncio, sys, time\n"
        "from magikrun.platform import Paths\n"
        "from magikrun.storage import SnapshotStore\n"
        "def fill(fd):\n"
        "    print('filling', flush=True)\n"
        "    sys.stdin.readline()\n"
        "    open(f'/proc/self/fd/{fd}/by-child', 'w').close()\n"
        "asyncio.run(SnapshotStore(Paths.resolve(sys.argv[1])).extract(sys.argv[2], fill))\n"
    )
    store = SnapshotStore(paths)
    with subprocess.Popen(
        [sys.executable, "-c", code, str(paths.data), digest("shared")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "filling\n"
        ours = asyncio.ensure_future(store.extract(digest("shared"), filler({"by-parent": b""})))
        await asyncio.sleep(0.1)
        assert not ours.done()  # waiting on the child's lock
        child.stdin.write("go\n")
        child.stdin.flush()
        assert await asyncio.to_thread(child.wait) == 0
        path = await ours
    assert os.listdir(path) == ["by-child"]


async def test_cancelled_extract_waits_for_its_thread(paths: Paths) -> None:
    """A thread cannot be interrupted: cancelling waits for it, so nothing is half-made
    (here the fill completes, so the snapshot is committed whole)."""
    store = SnapshotStore(paths)
    started, release = threading.Event(), threading.Event()

    def fill(root_fd: int) -> None:
        filler({"first": b"1"})(root_fd)
        started.set()
        release.wait()
        filler({"second": b"2"})(root_fd)

    task = asyncio.ensure_future(store.extract(digest("c"), fill))
    await asyncio.to_thread(started.wait)
    task.cancel()
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(os.listdir(store.path(digest("c")))) == ["first", "second"]
    assert leftovers(paths) == []


async def test_stale_extraction_is_cleaned(paths: Paths) -> None:
    store = SnapshotStore(paths)
    stale = paths.snapshots / "tmp" / (digest("s").removeprefix("sha256:") + ".crashed")
    (stale / "half").mkdir(parents=True)
    await snapshot(store, "s", {"f": b"x"})
    assert not stale.exists()
    assert leftovers(paths) == []


async def test_digests_are_validated(paths: Paths) -> None:
    store = SnapshotStore(paths)
    for bad in ("sha256:../../etc", "sha256:" + "A" * 64, "md5:abc", digest("x") + "/"):
        with pytest.raises(InvalidDigest):
            store.has(bad)
        with pytest.raises(InvalidDigest):
            await store.extract(bad, filler({}))
    assert leftovers(paths) == []


async def test_remove_snapshot(paths: Paths) -> None:
    store = SnapshotStore(paths)
    await snapshot(store, "r", {"f": b"x"})
    await store.remove(digest("r"))
    await store.remove(digest("r"))
    assert store.list() == [] and leftovers(paths) == []


# -- root filesystems ---------------------------------------------------------------------


@requires_root
async def test_overlay_rootfs_honours_whiteouts_and_opaque_dirs(paths: Paths) -> None:
    store = SnapshotStore(paths)
    layers = [await snapshot(store, "base", BASE), await snapshot(store, "top", TOP)]
    rootfs = await store.prepare_rootfs("c1", layers, method="overlay")
    assert rootfs.kind == "overlay" and mounted(rootfs.path)
    assert set(tree(rootfs.path)) == EXPECTED
    assert (rootfs.path / "bin" / "sh").read_bytes() == b"#!newsh"
    await rootfs.remove()


@requires_root
async def test_copy_fallback_gives_the_same_tree(paths: Paths) -> None:
    store = SnapshotStore(paths)
    layers = [await snapshot(store, "base", BASE), await snapshot(store, "top", TOP)]
    overlay = await store.prepare_rootfs("ov", layers)
    copy = await store.prepare_rootfs("cp", layers, method="copy")
    assert copy.kind == "copy" and not mounted(copy.path)
    assert tree(copy.path) == tree(overlay.path)
    assert store.rootfs("cp") == copy
    await overlay.remove()
    await copy.remove()
    assert store.list_rootfs() == []


async def test_copy_fallback_honours_unprivileged_opaque_marker(paths: Paths) -> None:
    store = SnapshotStore(paths)
    layers = [
        await snapshot(store, "base", {"d/old": b"old", "d/sub/old": b"old"}),
        await snapshot(store, "top", {"d": "user-opaque", "d/new": b"new"}),
    ]
    rootfs = await store.prepare_rootfs("cp", layers, method="copy")
    assert sorted(tree(rootfs.path)) == ["d", "d/new"]
    await rootfs.remove()


@requires_root
async def test_two_rootfs_share_lowers_but_not_writes(paths: Paths) -> None:
    store = SnapshotStore(paths)
    layers = [await snapshot(store, "base", BASE)]
    one = await store.prepare_rootfs("one", layers)
    two = await store.prepare_rootfs("two", layers)
    (one.path / "etc" / "passwd").write_bytes(b"changed")
    (one.path / "new-file").write_bytes(b"mine")
    os.unlink(one.path / "bin" / "sh")
    assert (two.path / "etc" / "passwd").read_bytes() == b"root:x:0:0"
    assert not (two.path / "new-file").exists()
    assert (two.path / "bin" / "sh").exists()
    assert (store.path(layers[0]) / "etc" / "passwd").read_bytes() == b"root:x:0:0"
    with pytest.raises(SnapshotInUse, match="one, two"):
        await store.remove(layers[0])
    await one.remove()
    await two.remove()
    await store.remove(layers[0])


@requires_root
async def test_remove_unmounts_and_is_idempotent(paths: Paths) -> None:
    store = SnapshotStore(paths)
    rootfs = await store.prepare_rootfs("gone", [await snapshot(store, "base", BASE)])
    (rootfs.path / "scratch").write_bytes(b"x")
    await rootfs.remove()
    await rootfs.remove()
    assert not mounted(rootfs.path)
    assert not rootfs.path.parent.exists()
    assert store.rootfs("gone") is None


@requires_root
async def test_remove_of_a_busy_rootfs_keeps_it(paths: Paths) -> None:
    store = SnapshotStore(paths)
    rootfs = await store.prepare_rootfs("busy", [await snapshot(store, "base", BASE)])
    (rootfs.path / "work").write_bytes(b"unsaved")
    with open(rootfs.path / "work", "rb"):
        with pytest.raises(StorageError, match="cannot unmount") as info:
            await rootfs.remove()
        assert info.value.hint
        assert mounted(rootfs.path)
        assert (rootfs.path.parent / "upper" / "work").read_bytes() == b"unsaved"
    await rootfs.remove()
    assert not mounted(rootfs.path) and store.list_rootfs() == []


@requires_root
async def test_rootfs_is_found_after_a_crash(paths: Paths) -> None:
    store = SnapshotStore(paths)
    layers = [await snapshot(store, "base", BASE)]
    created = await store.prepare_rootfs("crashed", layers, readonly=True)
    found = SnapshotStore(paths).rootfs("crashed")  # a new process's view
    assert found == created
    assert [r.key for r in SnapshotStore(paths).list_rootfs()] == ["crashed"]
    assert found is not None
    await found.remove()
    assert not mounted(created.path)


@requires_root
async def test_readonly_rootfs(paths: Paths) -> None:
    store = SnapshotStore(paths)
    rootfs = await store.prepare_rootfs("ro", [await snapshot(store, "base", BASE)], readonly=True)
    with pytest.raises(OSError) as info:
        (rootfs.path / "x").write_bytes(b"x")
    assert info.value.errno == errno.EROFS
    await rootfs.remove()


@requires_root
async def test_many_layers_fit_one_mount(paths: Paths) -> None:
    store = SnapshotStore(paths)
    layers = [await snapshot(store, f"layer{i}", {f"f{i}": b"%d" % i}) for i in range(128)]
    rootfs = await store.prepare_rootfs("many", layers, method="overlay")
    assert rootfs.kind == "overlay" and len(os.listdir(rootfs.path)) == 128
    await rootfs.remove()


async def test_prepare_failures_leave_nothing(paths: Paths) -> None:
    store = SnapshotStore(paths)
    layers = [await snapshot(store, "base", {"f": b"x"})]
    with pytest.raises(SnapshotNotFound, match="is not unpacked"):
        await store.prepare_rootfs("k", [*layers, digest("missing")])
    for key in ("", ".hidden", "a/b", "../x", "x" * 129):
        with pytest.raises(InvalidArgument, match="invalid root filesystem key"):
            await store.prepare_rootfs(key, layers)
    with pytest.raises(InvalidArgument, match="at least one layer"):
        await store.prepare_rootfs("k", [])
    assert os.listdir(paths.run / "rootfs") == []
    rootfs = await store.prepare_rootfs("k", layers, method="copy")
    with pytest.raises(RootfsExists, match="'k' exists"):
        await store.prepare_rootfs("k", layers, method="copy")
    assert isinstance(store.rootfs("k"), Rootfs)
    await rootfs.remove()
    assert os.listdir(paths.run / "rootfs") == [] and leftovers(paths) == []
