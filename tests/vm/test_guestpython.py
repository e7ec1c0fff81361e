"""The packed guest interpreter: ELF cutting, what is packed, caching (no boot)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from magikrun.errors import RuntimeUnavailable
from magikrun.platform import Paths
from magikrun.runtime import _guestpython
from magikrun.runtime._guestpython import (
    GUEST_PREFIX,
    SYSTEM_PYTHON,
    _soname,
    guest_interpreter,
    loadable_image,
    pack_python,
    vminit_imports,
)
from magikrun.runtime._initramfs import BUSYBOX
from magikrun.runtime._qemu import _PACKAGE
from magikrun.vminit._early import NEW_ROOT

PACKAGE = Path(_PACKAGE)
GUEST_MODULES = ("__main__", "_init", "_pod", "_protocol", "_server", "_infra")
"""vminit's modules in the guest (``_infra`` only for pods with infra extensions)."""


def _libz() -> Path:
    for directory in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib64"):
        if (Path(directory) / "libz.so.1").is_file():
            return Path(directory) / "libz.so.1"
    pytest.skip("no libz.so.1 to cut")


def test_loadable_image_keeps_what_the_loader_maps(tmp_path: Path) -> None:
    original = _libz().read_bytes()
    cut = loadable_image(original)
    assert len(cut) < len(original)
    assert struct.unpack_from("<QHHHH", cut, 0x28)[0] == 0  # no section headers
    assert _soname(cut) == "libz.so.1"
    copy = tmp_path / "libz.so.1"
    copy.write_bytes(cut)
    probe = (
        "import ctypes, sys\n"
        "version = ctypes.CDLL(sys.argv[1]).zlibVersion\n"
        "version.restype = ctypes.c_char_p\n"
        "print(version().decode())\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe, str(copy)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip()[0].isdigit()


def test_loadable_image_refuses_what_is_not_elf64() -> None:
    with pytest.raises(RuntimeUnavailable, match="not a little-endian ELF64"):
        loadable_image(b"#!/bin/sh\n")
    with pytest.raises(RuntimeUnavailable, match="not a little-endian ELF64"):
        loadable_image(b"\x7fELF\x01\x01" + b"\0" * 64)  # ELF32


def test_vminit_imports_include_imports_on_use_but_not_type_checking() -> None:
    names = vminit_imports(PACKAGE / "vminit" / f"{m}.py" for m in GUEST_MODULES)
    assert "ctypes" in names  # power_off imports it when the guest ends
    assert {"_json", "_signal", "select"} <= set(names)  # the boot's own imports
    assert {"json", "signal"} <= set(names)  # the infra relay's, imported on use
    assert "typing" not in names
    assert "magikrun.vminit._infra" in names  # the server imports it on use
    assert not [n for n in names if n.startswith("magikrun") and "vminit" not in n]


def _entries(archive: Path) -> set[str]:
    with archive.open("rb") as data:
        listing = subprocess.run(
            [str(BUSYBOX), "cpio", "-t"], stdin=data, capture_output=True, check=True
        )
    return set(listing.stdout.decode().split())


def test_pack_holds_vminit_and_its_stdlib_and_is_cached(paths: Paths, tmp_path: Path) -> None:
    pack = pack_python(paths, PACKAGE)
    prefix = f"{NEW_ROOT}{GUEST_PREFIX}".lstrip("/")
    names = _entries(pack.archive)
    lib = f"{prefix}/lib/python{sys.version_info.major}.{sys.version_info.minor}"
    for module in GUEST_MODULES:
        assert f"{prefix}/magikrun/vminit/{module}.pyc" in names
    for module in ("json/decoder.pyc", "ctypes/__init__.pyc", "socket.pyc"):
        assert f"{lib}/{module}" in names
    assert f"{prefix}/magikrun/vminit/_client.pyc" not in names  # the host's side
    assert not [n for n in names if "asyncio" in n or n.endswith(".py")]
    assert f"{prefix}/lib/libc.so.6" in names
    # cached: the same archive, not rebuilt
    mtime = pack.archive.stat().st_mtime_ns
    assert pack_python(paths, PACKAGE) == pack
    assert pack.archive.stat().st_mtime_ns == mtime
    # deterministic: another root builds the same bytes
    other = pack_python(Paths.resolve(tmp_path / "other"), PACKAGE)
    assert other.archive.read_bytes() == pack.archive.read_bytes()


def test_packed_interpreter_runs_vminit_from_the_pack_alone(paths: Paths, tmp_path: Path) -> None:
    """Unpacked anywhere, the pack starts vminit's modules without a file of the host's
    Python installation (the guest has none of it)."""
    pack = pack_python(paths, PACKAGE)
    with pack.archive.open("rb") as data:
        subprocess.run([str(BUSYBOX), "cpio", "-id"], stdin=data, cwd=tmp_path, check=True)
    root = str(tmp_path / NEW_ROOT.lstrip("/"))
    argv = [root + pack.argv[0], pack.argv[1], root + pack.argv[2], root + pack.argv[3]]
    probe = (
        "import sys,types,json\n"
        "for n,p in (('magikrun',sys.argv[1]),('magikrun.vminit',sys.argv[1]+'/vminit')):\n"
        "    m=types.ModuleType(n);m.__path__=[p];sys.modules[n]=m\n"
        "import magikrun.vminit.__main__, ctypes\n"
        "maps={l.split()[-1] for l in open('/proc/self/maps') if '/' in l}\n"
        "files={getattr(m,'__file__',None) or '' for m in sys.modules.values()}\n"
        "print(json.dumps(sorted(p for p in maps|files if p.startswith('/'))))\n"
    )
    done = subprocess.run(
        [*argv, "-I", "-S", "-X", "utf8", "-c", probe, root + pack.package],
        capture_output=True,
        text=True,
        check=True,
        env={"LC_ALL": "C"},  # as the guest's /init starts it
    )
    used = json.loads(done.stdout)
    assert used, done.stderr
    assert [p for p in used if not p.startswith(root)] == []


def test_the_system_build_of_this_python_version_is_packed_where_it_exists(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if SYSTEM_PYTHON.is_file():
        assert guest_interpreter() == str(SYSTEM_PYTHON.resolve())
    monkeypatch.setattr(_guestpython, "SYSTEM_PYTHON", tmp_path / "python3.missing")
    assert guest_interpreter() == str(Path(sys.executable).resolve())


def test_an_interpreter_of_another_version_is_refused(
    monkeypatch: pytest.MonkeyPatch, paths: Paths, tmp_path: Path
) -> None:
    """A ``python3.X`` whose ``.pyc`` magic differs (as the probe reports it) is not packed
    with this process's ``.pyc`` files, and nothing is cached."""
    other = tmp_path / "python3.other"
    probe = {"modules": {}, "maps": [], "stdlib": str(tmp_path), "magic": "00000d0a"}
    other.write_text(f"#!/bin/sh\necho '{json.dumps(probe)}'\n")
    other.chmod(0o755)
    monkeypatch.setattr(_guestpython, "SYSTEM_PYTHON", other)
    with pytest.raises(RuntimeUnavailable, match=r"python3\.other reads other \.pyc files than"):
        pack_python(paths, PACKAGE)
    assert not list((paths.cache / "python").glob("*"))
