"""The guest's initramfs: a cpio (newc) archive written here, cached by content.

It holds busybox-static, the kernel modules the guest needs to reach its root (the
Debian kernel builds virtio, 9p and virtiofs as modules), with their dependencies
resolved from ``modules.dep`` and decompressed when shipped as ``.ko.xz``/``.ko.zst``,
and ``/init``. The archive for one kernel is built once and reused; what is private to
one VM (its token and configuration) goes into a second, small archive appended to
a copy of it, since the kernel unpacks concatenated archives in order.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import RuntimeUnavailable
from ..platform import Paths
from ._guestkernel import GuestKernel

__all__ = [
    "GUEST_MODULES",
    "CpioWriter",
    "build_initramfs",
    "module_load_order",
    "strip_signature",
    "write_atomic",
    "write_vm_initramfs",
]

BUSYBOX = Path("/bin/busybox")
GUEST_MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p")
"""The modules a q35 guest needs to reach its root and control port; each one more
costs the boot about 50 ms under TCG, so callers add only what a VM uses
(``virtio_mmio`` on microvm, ``virtio_net`` for a NIC, ``virtiofs``)."""

_PAD = b"\0" * 512
_SIGNATURE_MARK = b"~Module signature appended~\n"


class CpioWriter:
    """Writes a cpio "newc" archive (the format the kernel unpacks) into memory."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._ino = 1

    def _put(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)

    def _align(self, to: int = 4) -> None:
        self._put(_PAD[: -self._size % to])

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        self._ino += 1
        self._put(b"070701" + b"".join(b"%08X" % value for value in fields) + encoded)
        self._align()
        self._put(data)
        self._align()

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        """The archive with its trailer, padded to 512 bytes so another may follow."""
        self._entry("TRAILER!!!", 0)
        self._align(512)
        return b"".join(self._parts)


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        import zstandard

        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    return data


def strip_signature(module: bytes) -> bytes:
    """``module`` without its appended signature (``struct module_signature`` and the
    marker after the signer, key id and signature bytes it sizes)."""
    if not module.endswith(_SIGNATURE_MARK):
        return module
    info = module[-len(_SIGNATURE_MARK) - 12 : -len(_SIGNATURE_MARK)]
    signer, key_id = info[3], info[4]
    (signature,) = struct.unpack(">I", info[8:12])
    return module[: len(module) - len(_SIGNATURE_MARK) - 12 - signer - key_id - signature]


def _module_name(relative: str) -> str:
    base = relative.rsplit("/", 1)[-1].split(".ko", 1)[0]
    return base.replace("-", "_")


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Paths (relative to ``modules_dir``) of ``wanted`` and their dependencies, deps first.

    Modules built into the kernel (listed in ``modules.builtin``) need no loading.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
        by_name[_module_name(target)] = target
    builtin_file = modules_dir / "modules.builtin"
    builtin = set()
    if builtin_file.is_file():
        builtin = {_module_name(line) for line in builtin_file.read_text().split()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            raise RuntimeUnavailable(
                f"the guest kernel has no module {name!r} in {modules_dir}",
                hint="use a kernel with virtio, 9p and virtiofs support (Debian's does)",
                module=name,
            )
        visit(by_name[key])
    return order


def write_atomic(target: Path, data: bytes) -> None:
    """Write ``target`` (its directory made 0700 if missing) through a temporary file, so a
    cache never holds a partial file."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_cached(cache: Path, data: bytes) -> Path:
    target = cache / f"{hashlib.sha256(data).hexdigest()}.cpio"
    if not target.is_file():
        write_atomic(target, data)
    return target


def build_initramfs(
    paths: Paths,
    kernel: GuestKernel,
    init: bytes,
    *,
    modules: Iterable[str] = GUEST_MODULES,
    busybox: Path = BUSYBOX,
) -> Path:
    """The shared archive (busybox, modules, ``/init``) for ``kernel``, from the cache if built.

    ``/modules.list`` names the modules in load order for ``/init`` to ``insmod``.
    Their signatures are left out where the kernel does not enforce them: the host
    read them from its own module tree, and checking them cost the guest about 0.2 s
    of its boot under TCG (module loading 0.50-0.55 s against 0.65-0.83 s, three
    interleaved pairs).
    """
    if not busybox.is_file():
        raise RuntimeUnavailable(
            f"{busybox} is missing: the guest's early init needs a static busybox",
            hint="apt-get install busybox-static",
        )
    order = module_load_order(kernel.modules, modules)
    cpio = CpioWriter()
    for name in ("bin", "dev", "proc", "sys", "sysroot", "modules", "vm"):
        cpio.directory(name)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    listing = []
    signed = kernel.enforces_module_signatures()
    for index, relative in enumerate(order):
        stored = f"{index:02d}-{_module_name(relative)}.ko"
        module = _read_module(kernel.modules / relative)
        cpio.file(f"modules/{stored}", module if signed else strip_signature(module))
        listing.append(stored)
    cpio.file("modules.list", ("\n".join(listing) + "\n").encode())
    cpio.file("init", init, 0o755)
    return _write_cached(paths.cache / "initramfs", cpio.finish())


def write_vm_initramfs(shared: Sequence[Path], target: Path, private: dict[str, bytes]) -> None:
    """Write ``target`` (mode 0600): the ``shared`` archives in order, then an archive of
    ``private`` under /vm."""
    extra = CpioWriter()
    for name, data in private.items():
        extra.file(f"vm/{name}", data, 0o600)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        for archive in shared:
            with archive.open("rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)
        out.write(extra.finish())
