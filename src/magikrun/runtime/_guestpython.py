"""vminit's interpreter packed into the initramfs, so the guest's Python starts from RAM.

Over 9p every file the interpreter opens is a round trip to the host, and under TCG
that made starting Python and importing vminit cost about 2.7 s of a boot. The pack
holds exactly what vminit runs on: the interpreter, the shared objects it maps (the
dynamic loader, libpython, libc...), and as sourceless ``.pyc`` files the stdlib
modules and vminit modules it imports. They are found by running the interpreter on
the host with vminit's imports (the module level ones and those inside functions,
read from its sources) and reading ``sys.modules`` and ``/proc/self/maps``.

Shared objects are cut to their loadable image (what the program headers map; the
dynamic loader reads nothing else), which drops debug sections: libpython built
with debug info shrinks from 23 to 6 MB. The guest starts the interpreter through
the packed loader, so nothing of it comes from the host's shares.

The interpreter is the distribution's build of this process's Python version where
the host has one (:func:`guest_interpreter`), this process's otherwise: the host
compiles the ``.pyc`` files, so the version must be the same.

The archive is cached under ``paths.cache/python``, keyed by the interpreter, its
version and vminit's sources; it is built once per change.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import marshal
import os
import struct
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RuntimeUnavailable
from ..platform import Paths
from ..vminit._early import NEW_ROOT
from ._initramfs import CpioWriter, write_atomic

__all__ = [
    "GUEST_PREFIX",
    "SYSTEM_PYTHON",
    "PythonPack",
    "guest_interpreter",
    "loadable_image",
    "pack_python",
    "vminit_imports",
]

GUEST_PREFIX = "/opt/magikrun-python"
"""Where the packed interpreter lives in the guest's root (under ``NEW_ROOT`` in the
initramfs, which becomes that root)."""
_FORMAT = 3
"""Bumped when the pack's layout changes, so older cached packs are not reused."""
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
"""The distribution's build of this Python version, packed where it exists."""
_PROBE_TIMEOUT = 30.0
_ON_ERROR = ("json.decoder",)
"""Modules the guest imports only on an error, and not by an import statement:
``_json`` raises ``json.decoder.JSONDecodeError`` for a malformed frame."""
_PROBE = """
import json, os, sys, types
package, names = sys.argv[1], json.loads(sys.argv[2])
for n, p in (("magikrun", package), ("magikrun.vminit", package + "/vminit")):
    m = types.ModuleType(n); m.__path__ = [p]; sys.modules[n] = m
import magikrun.vminit.__main__
for name in names:
    __import__(name)
with open("/proc/self/maps") as f:
    maps = sorted({l.split(None, 5)[5].strip() for l in f if len(l.split(None, 5)) == 6})
modules = {n: getattr(m, "__file__", None) for n, m in sys.modules.items()}
magic = sys.modules["_frozen_importlib_external"].MAGIC_NUMBER.hex()
stdlib = os.path.dirname(os.__file__)
print(json.dumps({"modules": modules, "maps": maps, "stdlib": stdlib, "magic": magic}))
"""


@dataclass(frozen=True, slots=True)
class PythonPack:
    """A packed interpreter: its archive on the host and how the guest runs it."""

    archive: Path
    argv: tuple[str, ...]
    """The guest's command line up to the interpreter's own options."""
    package: str
    """The guest directory of the packed ``magikrun`` package (vminit only)."""


def vminit_imports(sources: Iterable[Path]) -> list[str]:
    """The imports in vminit's ``sources``, including those inside functions (imported
    on use, as ``ctypes`` at power-off or ``._infra`` for pods with extensions) but not
    those for type checkers; relative ones are named within ``magikrun.vminit``."""
    names: set[str] = set()
    for source in sources:
        tree = ast.parse(source.read_bytes(), str(source))
        skipped = {
            id(node)
            for branch in ast.walk(tree)
            if isinstance(branch, ast.If) and ast.unparse(branch.test) == "TYPE_CHECKING"
            for statement in branch.body
            for node in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                names.add(f"magikrun.vminit.{node.module}")
    return sorted(
        n
        for n in names
        if n != "__future__" and (n.startswith("magikrun.vminit.") or not n.startswith("magikrun"))
    )


def loadable_image(data: bytes) -> bytes:
    """An ELF64 shared object or program cut to what its program headers map, with no
    section headers (the dynamic loader reads only the program headers)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise RuntimeUnavailable(
            "a shared object of the guest's interpreter is not a little-endian ELF64 file",
            hint="microVMs pack an x86-64 Python; run magikrun with one",
        )
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    end = max([phoff + phentsize * phnum] + [o + n for _, o, _, n in _segments(data)])
    image = bytearray(data[:end])
    struct.pack_into("<Q", image, 0x28, 0)  # e_shoff
    struct.pack_into("<HH", image, 0x3C, 0, 0)  # e_shnum, e_shstrndx
    return bytes(image)


def _segments(data: bytes) -> list[tuple[int, int, int, int]]:
    """(type, file offset, virtual address, file size) of each ELF64 program header."""
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    found = []
    for index in range(phnum):
        kind, _, offset, vaddr, _, filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + index * phentsize
        )
        found.append((kind, offset, vaddr, filesz))
    return found


def _soname(data: bytes) -> str | None:
    """The shared object's ``DT_SONAME``: the name the loader looks it up by."""
    segments = _segments(data)
    tags: dict[int, int] = {}
    for kind, offset, _, size in segments:
        if kind == 2:  # PT_DYNAMIC
            for entry in range(offset, offset + size, 16):
                tag, value = struct.unpack_from("<qQ", data, entry)
                if tag == 0:
                    break
                tags.setdefault(tag, value)
    if 14 not in tags or 5 not in tags:  # DT_SONAME, DT_STRTAB
        return None
    for kind, offset, vaddr, size in segments:
        if kind == 1 and vaddr <= tags[5] < vaddr + size:  # PT_LOAD holding the strings
            start = tags[5] - vaddr + offset + tags[14]
            return data[start : data.index(b"\0", start)].decode()
    return None


def _interpreter(data: bytes) -> str:
    """The program's dynamic loader (its ``PT_INTERP``)."""
    for kind, offset, _, size in _segments(data):
        if kind == 3:  # PT_INTERP
            return data[offset : offset + size].rstrip(b"\0").decode()
    raise RuntimeUnavailable(
        "the Python interpreter is statically linked or has no dynamic loader",
        hint="run magikrun with a dynamically linked CPython",
    )


def _pyc(source: Path) -> bytes:
    """A sourceless ``.pyc`` (no timestamp: the same source gives the same bytes)."""
    code = compile(source.read_bytes(), str(source), "exec", dont_inherit=True)
    return importlib.util.MAGIC_NUMBER + b"\0" * 12 + marshal.dumps(code)


def _probe(python: str, package: Path, names: Sequence[str]) -> dict[str, Any]:
    """What ``python`` has loaded once vminit and ``names`` are imported."""
    argv = [python, "-I", "-S", "-c", _PROBE, str(package), json.dumps(list(names))]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=_PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeUnavailable(f"cannot run {python} to find vminit's modules: {exc}") from exc
    if done.returncode != 0:
        raise RuntimeUnavailable(
            f"{python} could not import vminit: {done.stderr.decode(errors='replace')[-500:]}",
            hint="vminit needs only the stdlib; check the interpreter's installation",
        )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _probe_all(python: str, package: Path) -> dict[str, Any]:
    """The probe after vminit's imports, then again with the imports its guest modules
    make on use (the host-side modules of the package are not read)."""
    wanted: list[str] = list(_ON_ERROR)
    while True:  # until the guest modules the last probe loaded import nothing new
        found = _probe(python, package, wanted)
        guest = [Path(f) for n, f in found["modules"].items() if n.startswith("magikrun.") and f]
        lazy = [n for n in vminit_imports(sorted(guest)) if n not in found["modules"]]
        if not lazy:
            return found
        wanted += lazy


class _Tree:
    """Cpio entries under one prefix, each parent directory written once, first."""

    def __init__(self, cpio: CpioWriter) -> None:
        self.cpio = cpio
        self.made: set[str] = set()

    def directory(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if parent and parent not in self.made:
            self.directory(parent)
        if path not in self.made:
            self.made.add(path)
            self.cpio.directory(path)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.directory(path.rpartition("/")[0])
        self.cpio.file(path, data, mode)


def _build(python: str, package: Path) -> tuple[bytes, tuple[str, ...], str]:
    found = _probe_all(python, package)
    if found["magic"] != importlib.util.MAGIC_NUMBER.hex():
        raise RuntimeUnavailable(
            f"{python} reads other .pyc files than this Python {sys.version.split()[0]}",
            hint="the guest's interpreter must be the same Python version as magikrun's",
        )
    stdlib = Path(found["stdlib"])
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    prefix = f"{NEW_ROOT}{GUEST_PREFIX}".lstrip("/")
    tree = _Tree(CpioWriter())
    executable = Path(python).read_bytes()
    loader = _interpreter(executable)
    lib = f"{prefix}/lib"
    tree.file(f"{prefix}/bin/{Path(python).name}", loadable_image(executable), 0o755)
    tree.directory(f"{lib}/{version}/lib-dynload")
    for name, file in sorted(found["modules"].items()):
        if file is None or not file.endswith(".py"):
            continue
        origin = Path(file)
        if name.startswith("magikrun."):
            target = f"{prefix}/{origin.relative_to(package.parent).with_suffix('.pyc')}"
        elif origin.is_relative_to(stdlib):
            target = f"{lib}/{version}/{origin.relative_to(stdlib).with_suffix('.pyc')}"
        else:
            raise RuntimeUnavailable(
                f"vminit imports {name} from {origin}, outside the stdlib",
                hint="vminit must import only the stdlib and its own modules",
            )
        tree.file(target, _pyc(origin))
    for mapped in found["maps"]:
        path = Path(mapped)
        if ".so" not in path.name or not path.is_file() or path == Path(python):
            continue
        data = path.read_bytes()
        if path.is_relative_to(stdlib):
            target = f"{lib}/{version}/{path.relative_to(stdlib)}"
        else:
            target = f"{lib}/{_soname(data) or path.name}"
        tree.file(target, loadable_image(data), 0o755)
    argv = (
        f"{GUEST_PREFIX}/lib/{Path(loader).name}",
        "--library-path",
        f"{GUEST_PREFIX}/lib",
        f"{GUEST_PREFIX}/bin/{Path(python).name}",
    )
    return tree.cpio.finish(), argv, f"{GUEST_PREFIX}/magikrun"


def guest_interpreter() -> str:
    """The interpreter to pack: :data:`SYSTEM_PYTHON` where it exists, else this process's.

    A distribution's build starts faster under TCG than one with a shared libpython and
    no profile-guided optimisation (as pyenv builds): Debian's ``python3.11 -I -S -c
    pass`` took 0.38-0.59 s in the guest against 0.76-1.00 s for pyenv's 3.11.7, four
    interleaved pairs in one VM. It is the same version (the host compiles the ``.pyc``
    files; :func:`pack_python` checks their magic number).
    """
    if SYSTEM_PYTHON.is_file() and os.access(SYSTEM_PYTHON, os.X_OK):
        return os.path.realpath(SYSTEM_PYTHON)
    return os.path.realpath(sys.executable)


def pack_python(paths: Paths, package: Path) -> PythonPack:
    """:func:`guest_interpreter` packed for vminit from ``package``, with ``.pyc`` files
    this process compiles; built once per change of the interpreter or vminit's sources."""
    python = guest_interpreter()
    key = hashlib.sha256(f"{_FORMAT} {python} {sys.version}\n".encode())
    key.update(hashlib.sha256(Path(python).read_bytes()).digest())
    for source in sorted((package / "vminit").glob("*.py")):
        key.update(f"{source.name}\n".encode() + hashlib.sha256(source.read_bytes()).digest())
    cache = paths.cache / "python"
    archive = cache / f"{key.hexdigest()}.cpio"
    manifest = archive.with_suffix(".json")
    if archive.is_file() and manifest.is_file():
        info = json.loads(manifest.read_text())
        return PythonPack(archive=archive, argv=tuple(info["argv"]), package=info["package"])
    data, argv, guest_package = _build(python, package)
    write_atomic(archive, data)
    write_atomic(manifest, json.dumps({"argv": argv, "package": guest_package}).encode())
    return PythonPack(archive=archive, argv=argv, package=guest_package)
