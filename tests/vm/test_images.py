"""The guest kernel extraction, the cpio writer and the protocol framing (no boot)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from magikrun.errors import RuntimeUnavailable
from magikrun.platform import Paths
from magikrun.runtime._guestkernel import GuestKernel, extract_vmlinux, find_guest_kernel
from magikrun.runtime._initramfs import (
    BUSYBOX,
    CpioWriter,
    _read_module,
    build_initramfs,
    module_load_order,
    strip_signature,
    write_vm_initramfs,
)
from magikrun.runtime._qemu import (
    _PACKAGE,
    GuestPython,
    guest_init,
    host_shares,
    python_shares,
)
from magikrun.vminit import early_init_script
from magikrun.vminit._protocol import decode, encode

from .conftest import needs_vm

SHARES = (("magikrun.0", "/usr"), ("magikrun.1", "/opt/py"))
ELF = b"\x7fELF" + bytes(range(256)) * 64


def _bzimage(payload: bytes) -> bytes:
    """A minimal bzImage: a boot header pointing at ``payload`` (boot protocol 2.08)."""
    setup = bytearray(2 * 512)
    setup[0x1F1] = 1  # one setup sector after the boot sector
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, 16, len(payload))
    return bytes(setup) + b"\0" * 16 + payload + b"trailing"


@pytest.mark.parametrize(
    "compress",
    [
        lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
        lambda d: zstandard.ZstdCompressor().compress(d),
        lambda d: gzip.compress(d) + struct.pack("<I", len(d)),
        lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
        bz2.compress,
    ],
    ids=["xz", "zstd", "gzip", "lzma", "bzip2"],
)
def test_extract_vmlinux_by_magic(compress: object) -> None:
    assert callable(compress)
    assert extract_vmlinux(_bzimage(compress(ELF))) == ELF


def test_extract_vmlinux_refuses_what_it_cannot_read() -> None:
    with pytest.raises(RuntimeUnavailable, match="not a bzImage"):
        extract_vmlinux(b"MZ" + b"\0" * 1024)
    with pytest.raises(RuntimeUnavailable, match="not in a known format"):
        extract_vmlinux(_bzimage(b"\x02\x21\x4c\x18" + b"lz4 frame"))
    with pytest.raises(RuntimeUnavailable, match="does not decompress"):
        extract_vmlinux(_bzimage(b"\xfd7zXZ\x00" + b"garbage"))


def test_no_kernel_is_reported(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailable, match="no guest kernel") as caught:
        find_guest_kernel(Paths.resolve(tmp_path), boot=tmp_path, modules=tmp_path)
    assert "linux-image-amd64" in caught.value.hint


@needs_vm
def test_real_kernel_is_extracted_once(paths: Paths) -> None:
    kernel = find_guest_kernel(paths)
    assert kernel.vmlinux.read_bytes()[:4] == b"\x7fELF"
    mtime = kernel.vmlinux.stat().st_mtime_ns
    assert find_guest_kernel(paths).vmlinux.stat().st_mtime_ns == mtime
    assert [p.name for p in kernel.vmlinux.parent.iterdir()] == [kernel.vmlinux.name]


@needs_vm
def test_module_order_puts_dependencies_first(paths: Paths) -> None:
    kernel = find_guest_kernel(paths)
    order = [Path(p).name for p in module_load_order(kernel.modules, ["9p", "virtio_pci"])]
    assert order.index("9pnet.ko") < order.index("9p.ko")
    assert order.index("virtio.ko") < order.index("virtio_pci.ko")
    assert len(order) == len(set(order))
    with pytest.raises(RuntimeUnavailable, match="no module 'nope'"):
        module_load_order(kernel.modules, ["nope"])


def test_cpio_is_read_back_by_busybox(tmp_path: Path) -> None:
    first = CpioWriter()
    first.directory("etc")
    first.file("etc/motd", b"hello\n", 0o640)
    first.symlink("motd", "etc/motd")
    second = CpioWriter()
    second.file("extra", b"x" * 1001)
    archive = first.finish() + second.finish()
    assert len(archive) % 512 == 0
    out = tmp_path / "out"
    out.mkdir()
    for part in (archive[: len(archive) - 1024], archive):
        subprocess.run(
            [str(BUSYBOX), "cpio", "-id"], input=part, cwd=out, check=True, capture_output=True
        )
    assert (out / "etc/motd").read_bytes() == b"hello\n"
    assert (out / "etc/motd").stat().st_mode & 0o777 == 0o640
    assert (out / "motd").readlink() == Path("etc/motd")


@needs_vm
def test_initramfs_is_cached_by_content_and_private_part_is_0600(paths: Paths) -> None:
    kernel = find_guest_kernel(paths)
    base = build_initramfs(paths, kernel, early_init_script("/usr/bin/python3", "/pkg", SHARES))
    assert (
        build_initramfs(paths, kernel, early_init_script("/usr/bin/python3", "/pkg", SHARES))
        == base
    )
    other = build_initramfs(paths, kernel, early_init_script("/usr/bin/python3", "/other", SHARES))
    assert other != base
    vm = paths.run / "vm.cpio"
    paths.run.mkdir(parents=True, exist_ok=True)
    write_vm_initramfs((base,), vm, {"config.json": b"{}"})
    assert vm.stat().st_mode & 0o777 == 0o600
    assert vm.read_bytes().startswith(base.read_bytes())
    with pytest.raises(FileExistsError):
        write_vm_initramfs((base,), vm, {})


def test_early_init_mounts_the_shares_and_starts_vminit() -> None:
    script = early_init_script("/usr/bin/python3", "/pkg", SHARES).decode()
    assert "mount --bind /sysroot /sysroot" in script
    assert "mount --move . /" in script
    assert "exec $B chroot . /usr/bin/python3 -I -S -X utf8 -c" in script
    assert "/run/magikrun-vm/config.json" in script
    assert "mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,msize=524288,ro" in script
    assert "magikrun.1 /sysroot/opt/py" in script
    with pytest.raises(ValueError, match="unknown root share"):
        early_init_script("/usr/bin/python3", "/pkg", SHARES, share="nfs")


def test_frames_are_bounded() -> None:
    assert decode(encode({"op": "ping", "id": 1}, 100)) == {"op": "ping", "id": 1}
    with pytest.raises(ValueError, match="over 10"):
        encode({"op": "ping", "id": 1}, 10)
    with pytest.raises(ValueError, match="JSON object"):
        decode(b"[1]\n")


def test_guest_tmp_and_run_are_mounted_before_shares_that_live_under_them() -> None:
    """A checkout under /tmp (as CI's fresh clones are) must not be hidden by the guest's
    own /tmp tmpfs: the tmpfs goes first and the share is mounted inside it."""
    shares = (("magikrun.0", "/usr"), ("magikrun.1", "/tmp/clone/src/magikrun"))
    script = early_init_script("/usr/bin/python3", "/tmp/clone/src/magikrun", shares).decode()
    tmpfs = script.index("tmp /sysroot/tmp")
    run = script.index("run /sysroot/run")
    share = script.index("magikrun.1 /sysroot/tmp/clone/src/magikrun")
    assert tmpfs < share and run < share
    assert script.count("/sysroot/tmp ||") == 1


@needs_vm
def test_module_signatures_are_stripped_only_where_not_enforced(
    paths: Paths, tmp_path: Path
) -> None:
    kernel = find_guest_kernel(paths)
    relative = module_load_order(kernel.modules, ["9p"])[-1]
    signed = _read_module(kernel.modules / relative)
    assert signed.endswith(b"~Module signature appended~\n")
    bare = strip_signature(signed)
    assert signed.startswith(bare) and len(bare) < len(signed) - 256
    assert bare[:4] == b"\x7fELF"
    assert strip_signature(bare) == bare
    config = tmp_path / "config"
    config.write_text("CONFIG_MODULE_SIG=y\n# CONFIG_MODULE_SIG_FORCE is not set\n")
    lenient = GuestKernel(kernel.version, kernel.vmlinux, kernel.modules, config)
    assert not lenient.enforces_module_signatures()
    config.write_text("CONFIG_MODULE_SIG=y\nCONFIG_MODULE_SIG_FORCE=y\n")
    assert lenient.enforces_module_signatures()
    assert GuestKernel(kernel.version, kernel.vmlinux, kernel.modules).enforces_module_signatures()


def test_a_packed_guest_shares_usr_but_not_the_hosts_python_or_magikrun() -> None:
    """The packed interpreter needs neither; the host's interpreter (``SHARED``) and a
    pod's infra program (its read-only shares) need both."""
    python_dirs = {os.path.realpath(sys.base_prefix), _PACKAGE}
    packed = {path for _, path in host_shares(GuestPython.PACKED)[0]}
    shared = {path for _, path in host_shares(GuestPython.SHARED)[0]}
    assert "/usr" in packed
    assert packed <= shared
    assert not python_dirs & packed - {"/usr"}
    for path in python_dirs:
        assert any(path == d or path.startswith(d + "/") for d in shared), path
        beyond_usr = not path.startswith("/usr/")
        assert (path in python_shares()) is beyond_usr, path
    script = guest_init().decode()  # the host's interpreter: its shares in /init
    assert all(f"/sysroot{path}" in script for _, path in host_shares(GuestPython.SHARED)[0])
