"""The guest kernel: Debian's ``linux-image-amd64``, unpacked to a bare ``vmlinux``.

QEMU loads an uncompressed ELF ``vmlinux`` straight to its entry point, which under
TCG saves the three seconds the bzImage spends decompressing itself (1.9 s against
5.2 s to reach init, measured). The payload's compression is found by its magic
bytes and undone with the stdlib (or zstandard), once per kernel: the result is
cached under ``paths.cache`` by the bzImage's content digest.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import RuntimeUnavailable
from ..platform import Paths

__all__ = ["GuestKernel", "extract_vmlinux", "find_guest_kernel"]

BOOT_DIR = Path("/boot")
MODULES_DIR = Path("/lib/modules")
_ELF_MAGIC = b"\x7fELF"
_VERSION = re.compile(r"^vmlinuz-(\d[\w.+~-]*)$")
_FORCED_SIGNATURES = (
    "CONFIG_MODULE_SIG_FORCE=y",
    "CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY=y",
    "CONFIG_LOCK_DOWN_KERNEL_FORCE_CONFIDENTIALITY=y",
)
"""Kernel options under which a module without a valid signature is refused."""


@dataclass(frozen=True, slots=True)
class GuestKernel:
    """A kernel the guest boots: its version, bare ELF image and module tree."""

    version: str
    vmlinux: Path
    modules: Path
    config: Path | None = None
    """The kernel's build configuration (``/boot/config-VERSION``), where installed."""

    def enforces_module_signatures(self) -> bool:
        """Whether the kernel may refuse unsigned modules: unless its configuration
        shows it does not (no forced signatures, no forced lockdown)."""
        if self.config is None:
            return True
        lines = self.config.read_text(errors="replace").splitlines()
        return any(option in lines for option in _FORCED_SIGNATURES)


def _zstd(data: bytes) -> bytes:
    import zstandard

    return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))


def _xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _lzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)


def _gzip(data: bytes) -> bytes:
    # decompressobj stops at the member's end: the kernel appends its size after it
    return zlib.decompressobj(wbits=31).decompress(data)


_DECOMPRESSORS: tuple[tuple[bytes, str, Callable[[bytes], bytes]], ...] = (
    (b"\xfd7zXZ\x00", "xz", _xz),
    (b"\x28\xb5\x2f\xfd", "zstd", _zstd),
    (b"\x1f\x8b\x08", "gzip", _gzip),
    (b"\x5d\x00\x00", "lzma", _lzma),
    (b"BZh", "bzip2", bz2.decompress),
)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage (boot protocol 2.08+: ``payload_offset/length``).

    Raises :class:`~magikrun.errors.RuntimeUnavailable` when the image is not a
    bzImage or its payload uses a compression we cannot undo (lz4, lzo).
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise RuntimeUnavailable(
            "the guest kernel is not a bzImage (no 'HdrS' boot header)",
            hint="install Debian's linux-image-amd64 or point magikrun at a bzImage",
        )
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    for magic, name, decompress in _DECOMPRESSORS:
        if payload.startswith(magic):
            try:
                elf = decompress(payload)
            except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as exc:
                raise RuntimeUnavailable(
                    f"the guest kernel's {name} payload does not decompress: {exc}",
                    hint="reinstall linux-image-amd64",
                ) from exc
            if not elf.startswith(_ELF_MAGIC):
                break
            return elf
    raise RuntimeUnavailable(
        f"the guest kernel's payload is not in a known format (starts {payload[:6].hex()})",
        hint="use a kernel compressed with xz, zstd, gzip, lzma or bzip2",
    )


def _newest_kernel(boot: Path, modules: Path) -> tuple[str, Path]:
    found: list[tuple[tuple[int, ...], str, Path]] = []
    for entry in boot.glob("vmlinuz-*"):
        match = _VERSION.match(entry.name)
        if match is None or not (modules / match.group(1) / "modules.dep").is_file():
            continue
        version = match.group(1)
        key = tuple(int(part) for part in re.findall(r"\d+", version))
        found.append((key, version, entry))
    if not found:
        raise RuntimeUnavailable(
            f"no guest kernel: no {boot}/vmlinuz-* with a module tree in {modules}",
            hint="apt-get install linux-image-amd64",
        )
    _, version, path = max(found)
    return version, path


def find_guest_kernel(
    paths: Paths, *, boot: Path = BOOT_DIR, modules: Path = MODULES_DIR
) -> GuestKernel:
    """The newest installed kernel, its ``vmlinux`` extracted once into ``paths.cache``."""
    version, bzimage_path = _newest_kernel(boot, modules)
    try:
        bzimage = bzimage_path.read_bytes()
    except OSError as exc:
        raise RuntimeUnavailable(
            f"cannot read the guest kernel {bzimage_path}: {exc.strerror}",
            hint="run as a user that can read /boot (root on Debian)",
            path=str(bzimage_path),
        ) from exc
    digest = hashlib.sha256(bzimage).hexdigest()
    cache = paths.cache / "vmlinux"
    target = cache / f"{digest}.elf"
    if not target.is_file():
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        elf = extract_vmlinux(bzimage)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".vmlinux-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(elf)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    config = boot / f"config-{version}"
    return GuestKernel(
        version=version,
        vmlinux=target,
        modules=modules / version,
        config=config if config.is_file() else None,
    )
