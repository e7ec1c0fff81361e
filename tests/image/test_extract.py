"""Layer extraction against a hostile-archive corpus built here with tarfile.

Every rejection asserts the error (type, message, entry) and that nothing was written
outside the target directory.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from magikrun.errors import (
    DigestMismatch,
    ImageTooLarge,
    PathTraversal,
    UnsafeLayer,
    UnsupportedMediaType,
)
from magikrun.image import ExtractBudget, LayerStats, apply_layer, unpack_layer, unpack_layers
from magikrun.image._mediatypes import OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD, WASM_LAYER
from magikrun.image._model import Layer
from magikrun.platform import Paths
from magikrun.storage import SnapshotStore

MODES = ["flatten", "snapshot"]
ROOT = os.geteuid() == 0
requires_root = pytest.mark.skipif(not ROOT, reason="needs root (devices, trusted xattrs)")


# -- building archives ----------------------------------------------------------------------


Entry = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes = b"data", mode: int = 0o644, **attrs: object) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 1_600_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def dir_(name: str, mode: int = 0o755) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 1_500_000_000
    return info, None


def sym(name: str, target: str) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def hard(name: str, target: str) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info, None


def node(name: str, kind: bytes = tarfile.CHRTYPE, major: int = 1, minor: int = 3) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor, info.mode = kind, major, minor, 0o666
    return info, None


def pax_name(name: str, entry: Entry) -> Entry:
    """Carry the name in a PAX header, where it can hold bytes ustar cannot."""
    entry[0].pax_headers = {"path": name}
    return entry


def tar(*entries: Entry) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def listing(top: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under ``top`` with its type/mode and content or link target."""
    found: dict[str, tuple[int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path).encode()
            else:
                content = b""
            found[str(path.relative_to(top))] = (st.st_mode, content)
    return found


# -- the sandbox --------------------------------------------------------------------------


@dataclass
class Site:
    base: Path
    outside: Path
    """A directory outside every target, with a secret an attack would overwrite."""
    budget: ExtractBudget

    def target(self, name: str = "root") -> Path:
        path = self.base / name
        path.mkdir(exist_ok=True)
        return path

    def apply(
        self,
        data: bytes,
        *,
        mode: str = "flatten",
        target: str = "root",
        lowers: tuple[str, ...] = (),
        media_type: str = OCI_LAYER_TAR,
        privileged: bool | None = None,
    ) -> LayerStats:
        fd = os.open(self.target(target), os.O_RDONLY | os.O_DIRECTORY)
        try:
            return apply_layer(
                io.BytesIO(data),
                media_type,
                fd,
                mode=mode,  # type: ignore[arg-type]
                lowers=[self.base / lower for lower in lowers],
                privileged=privileged,
                budget=self.budget,
            )
        finally:
            os.close(fd)

    def stack(self, mode: str, *layers: bytes) -> str:
        """Apply well-formed lower layers; return the target the next layer goes to."""
        if mode == "flatten":
            for data in layers:
                self.apply(data)
            return "root"
        for index, data in enumerate(layers):
            self.apply(data, mode="snapshot", target=f"l{index}", lowers=self.below)
            self.below = (f"l{index}", *self.below)
        return f"l{len(layers)}"

    def apply_last(self, mode: str, data: bytes, target: str) -> LayerStats:
        return self.apply(data, mode=mode, target=target, lowers=self.below)

    below: tuple[str, ...] = ()


@pytest.fixture
def site(short_tmp: Path) -> Iterator[Site]:
    outside = short_tmp / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    before = listing(outside)
    yield Site(short_tmp, outside, ExtractBudget())
    assert listing(outside) == before, "something was written outside the target"
    stray = (
        {p.name for p in short_tmp.iterdir()} - {"outside", "root"} - {f"l{i}" for i in range(8)}
    )
    assert not stray, f"unexpected files beside the target: {stray}"


def rejects(exc_type: type[Exception], match: str, entry: str | None = None) -> object:
    return _Rejects(exc_type, match, entry)


class _Rejects:
    def __init__(self, exc_type: type[Exception], match: str, entry: str | None) -> None:
        self.ctx = pytest.raises(exc_type, match=match)
        self.entry = entry

    def __enter__(self) -> None:
        self.info = self.ctx.__enter__()

    def __exit__(self, *exc: object) -> bool:
        handled = self.ctx.__exit__(*exc)  # type: ignore[arg-type]
        if self.entry is not None:
            assert self.info.value.entry == self.entry  # type: ignore[attr-defined]
        assert self.info.value.hint  # type: ignore[attr-defined]
        return bool(handled)


# -- names --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (reg("../outside/secret", b"pwned"), "'..' component"),
        (reg("a/../../outside/secret", b"pwned"), "'..' component"),
        (reg("/outside/secret", b"pwned"), "absolute path"),
        (pax_name("evil\x00name", reg("x", b"pwned")), "NUL byte"),
        (sym("/", "/outside"), "absolute path"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "nul", "slash-symlink"],
)
def test_hostile_names_are_rejected(site: Site, mode: str, entry: Entry, match: str) -> None:
    with rejects(PathTraversal, match, entry[0].pax_headers.get("path", entry[0].name)):
        site.apply(tar(reg("ok"), entry), mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("entry", [sym(".", "/"), hard(".", "ok"), sym("./", "x")])
def test_root_as_link_is_rejected(site: Site, mode: str, entry: Entry) -> None:
    with rejects(UnsafeLayer, "names the root"):
        site.apply(tar(reg("ok"), entry), mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name", ["d/" * 300 + "f", "x" * 200 + "/" + "y" * 200 + "/" + "z" * 4000], ids=["deep", "long"]
)
def test_overlong_paths_are_rejected(site: Site, mode: str, name: str) -> None:
    with rejects(UnsafeLayer, "has a path over 4096 bytes or 256 components", name):
        site.apply(tar(pax_name(name, reg("x"))), mode=mode)
    assert os.listdir(site.base / "root") == []


def test_nul_in_symlink_target_is_rejected(site: Site) -> None:
    link = sym("l", "x")
    link[0].pax_headers = {"linkpath": "/outside\x00/secret"}
    with rejects(PathTraversal, "NUL byte in its target", "l"):
        site.apply(tar(link))


# -- symlinks -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_symlink_then_file_in_one_layer(site: Site, mode: str) -> None:
    layer = tar(sym("s", str(site.outside / "secret")), reg("s", b"pwned"))
    with rejects(PathTraversal, "replaces a symlink made earlier in the same layer", "s"):
        site.apply(layer, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_symlink_dir_then_file_in_one_layer(site: Site, mode: str) -> None:
    layer = tar(sym("d", str(site.outside)), reg("d/secret", b"pwned"))
    with rejects(PathTraversal, "reached through the symlink 'd'", "d/secret"):
        site.apply(layer, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_symlink_dir_then_file_across_layers(site: Site, mode: str) -> None:
    target = site.stack(mode, tar(dir_("etc"), sym("etc/d", str(site.outside))))
    with rejects(PathTraversal, "reached through the symlink 'etc/d'", "etc/d/secret"):
        site.apply_last(mode, tar(reg("etc/d/secret", b"pwned")), target)


@pytest.mark.parametrize("mode", MODES)
def test_relative_symlink_dir_across_layers(site: Site, mode: str) -> None:
    target = site.stack(mode, tar(sym("up", "../../outside")))
    with rejects(PathTraversal, "through the symlink 'up'", "up/secret"):
        site.apply_last(mode, tar(reg("up/secret", b"pwned")), target)


@pytest.mark.parametrize("mode", MODES)
def test_whiteout_under_lower_symlink_is_rejected(site: Site, mode: str) -> None:
    target = site.stack(mode, tar(sym("d", str(site.outside))))
    with rejects(PathTraversal, "through the symlink 'd'", "d/.wh.secret"):
        site.apply_last(mode, tar(reg("d/.wh.secret", b"")), target)


@pytest.mark.parametrize("mode", MODES)
def test_file_replaces_lower_symlink_without_following_it(site: Site, mode: str) -> None:
    # A layer may legitimately turn a symlink into a file: the link is replaced, never
    # written through.
    target = site.stack(mode, tar(sym("s", str(site.outside / "secret"))))
    site.apply_last(mode, tar(reg("s", b"new")), target)
    assert (site.base / target / "s").read_bytes() == b"new"
    assert not (site.base / target / "s").is_symlink()


@pytest.mark.parametrize("mode", MODES)
def test_symlink_cycles_and_deep_chains_are_never_followed(site: Site, mode: str) -> None:
    chain = [sym(f"c{i}", f"c{i + 1}") for i in range(60)]
    layer = tar(sym("a", "b"), sym("b", "a"), *chain, sym("c60", str(site.outside)))
    site.apply(layer, mode=mode)
    assert os.readlink(site.base / "root" / "a") == "b"
    for name in ("a/x", "c0/secret"):
        with rejects(PathTraversal, "reached through the symlink", name):
            site.apply(tar(reg(name, b"pwned")), mode="flatten")


@pytest.mark.parametrize("mode", MODES)
def test_dir_entry_replaces_lower_symlink(site: Site, mode: str) -> None:
    target = site.stack(mode, tar(sym("d", str(site.outside))))
    site.apply_last(mode, tar(dir_("d"), reg("d/secret", b"mine")), target)
    assert (site.base / target / "d" / "secret").read_bytes() == b"mine"


# -- hardlinks ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("link", "error", "match"),
    [
        (hard("h", "../outside/secret"), PathTraversal, "'..' component"),
        (hard("h", "/outside/secret"), PathTraversal, "absolute path"),
        (hard("h", "d/secret"), PathTraversal, "reached through the symlink 'd'"),
        (hard("h", "missing"), UnsafeLayer, "does not exist"),
        (hard("h", "realdir"), UnsafeLayer, "is a directory"),
        (hard("h", "h"), UnsafeLayer, "not a file"),
    ],
    ids=["dotdot", "absolute", "through-symlink", "missing", "directory", "self"],
)
def test_hostile_hardlinks(
    site: Site, mode: str, link: Entry, error: type[Exception], match: str
) -> None:
    layer = tar(sym("d", str(site.outside)), dir_("realdir"), link)
    with rejects(error, match, "h"):
        site.apply(layer, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_hardlink_within_layer(site: Site, mode: str) -> None:
    site.apply(tar(dir_("a"), reg("a/f", b"same"), hard("b", "a/f")), mode=mode)
    root = site.base / "root"
    assert (root / "b").read_bytes() == b"same"
    assert (root / "b").stat().st_ino == (root / "a" / "f").stat().st_ino


@pytest.mark.parametrize("mode", MODES)
def test_hardlink_to_a_symlink_links_the_symlink(site: Site, mode: str) -> None:
    site.apply(tar(sym("s", str(site.outside / "secret")), hard("h", "s")), mode=mode)
    root = site.base / "root"
    assert (root / "h").is_symlink()
    assert (root / "h").lstat().st_ino == (root / "s").lstat().st_ino


def test_hardlink_to_lower_layer_in_snapshot_mode(site: Site) -> None:
    target = site.stack("snapshot", tar(reg("f")))
    with rejects(UnsafeLayer, "does not exist in this layer", "h"):
        site.apply_last("snapshot", tar(hard("h", "f")), target)


def test_replacing_a_hardlinked_file_leaves_the_other_name(site: Site) -> None:
    site.apply(tar(reg("f", b"orig"), hard("g", "f")))
    site.apply(tar(reg("g", b"changed")))
    assert (site.base / "root" / "f").read_bytes() == b"orig"


# -- devices, modes, owners ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_devices_refused_when_unprivileged(site: Site, mode: str, kind: bytes) -> None:
    with rejects(UnsafeLayer, "device node", "dev/x"):
        site.apply(tar(dir_("dev"), node("dev/x", kind)), mode=mode, privileged=False)


def test_fifo_allowed_unprivileged(site: Site) -> None:
    site.apply(tar(node("p", tarfile.FIFOTYPE)), privileged=False)
    assert stat.S_ISFIFO((site.base / "root" / "p").lstat().st_mode)


@requires_root
def test_devices_created_when_privileged(site: Site) -> None:
    site.apply(tar(dir_("dev"), node("dev/null", tarfile.CHRTYPE, 1, 3)), privileged=True)
    st = (site.base / "root" / "dev" / "null").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3


@requires_root
@pytest.mark.parametrize("privileged", [True, False])
def test_setuid_and_owner_only_when_privileged(site: Site, privileged: bool) -> None:
    site.apply(
        tar(reg("su", mode=0o4755, uid=1234, gid=2345), dir_("sticky", 0o1777)),
        privileged=privileged,
    )
    st = (site.base / "root" / "su").lstat()
    assert stat.S_IMODE(st.st_mode) == (0o4755 if privileged else 0o755)
    assert (st.st_uid, st.st_gid) == ((1234, 2345) if privileged else (0, 0))
    assert stat.S_IMODE((site.base / "root" / "sticky").lstat().st_mode) == 0o1777


@requires_root
@pytest.mark.parametrize("mode", MODES)
def test_xattrs_only_in_allowed_namespaces(site: Site, mode: str) -> None:
    forged = {
        "SCHILY.xattr.user.origin": "layer",
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.trusted.overlay.redirect": "/etc",
        "SCHILY.xattr.user.overlay.opaque": "y",
        "SCHILY.xattr.security.selinux": "system_u:object_r:etc_t:s0",
    }
    file_entry, dir_entry = reg("f"), dir_("d")
    file_entry[0].pax_headers = dict(forged)
    dir_entry[0].pax_headers = dict(forged)
    site.apply(tar(file_entry, dir_entry), mode=mode, privileged=True)
    for name in ("f", "d"):
        assert os.listxattr(site.base / "root" / name) == ["user.origin"]
        assert os.getxattr(site.base / "root" / name, "user.origin") == b"layer"


def test_metadata_is_applied(site: Site) -> None:
    site.apply(tar(dir_("d", 0o750), reg("d/f", mode=0o600), sym("d/l", "f")))
    root = site.base / "root"
    assert stat.S_IMODE((root / "d").stat().st_mode) == 0o750
    assert (root / "d").stat().st_mtime == 1_500_000_000
    assert stat.S_IMODE((root / "d" / "f").stat().st_mode) == 0o600
    assert (root / "d" / "f").stat().st_mtime == 1_600_000_000
    assert os.readlink(root / "d" / "l") == "f"


def test_unsupported_entry_type(site: Site) -> None:
    info = tarfile.TarInfo("weird")
    info.type = b"V"  # a GNU volume header
    with rejects(UnsafeLayer, "unsupported tar type", "weird"):
        site.apply(tar((info, None)))


# -- limits -------------------------------------------------------------------------------


def test_file_count_limit(site: Site) -> None:
    site.budget = ExtractBudget(max_files_per_layer=3)
    with rejects(ImageTooLarge, "more than 3 entries", "d"):
        site.apply(tar(reg("a"), reg("b"), reg("c"), dir_("d")))
    assert not (site.base / "root" / "d").exists()


def test_compressed_size_limit(site: Site) -> None:
    site.budget = ExtractBudget(max_layer_bytes=1000)
    blob = gzip.compress(tar(reg("big", os.urandom(4000))))
    with rejects(ImageTooLarge, "layer blob is over 1000 bytes"):
        site.apply(blob, media_type=OCI_LAYER_GZIP)


def test_rootfs_budget_is_shared_across_layers(site: Site) -> None:
    site.budget = ExtractBudget(max_rootfs_bytes=15_000)
    site.apply(tar(reg("one", b"1" * 6000)))
    with rejects(ImageTooLarge, "over 15000 uncompressed bytes", "three"):
        site.apply(tar(reg("two", b"2" * 6000), reg("three", b"3" * 6000)))
    assert site.budget.used_bytes == 12_000
    assert not (site.base / "root" / "three").exists()


def test_decompression_bomb_is_cut_off(site: Site) -> None:
    site.budget = ExtractBudget(max_rootfs_bytes=1 << 20, max_files_per_layer=10)
    bomb = zstandard.ZstdCompressor().compress(tar(reg("a")) + b"\0" * (8 << 20))
    with rejects(ImageTooLarge, "decompresses to over"):
        site.apply(bomb, media_type=OCI_LAYER_ZSTD)


# -- compression and diff_id --------------------------------------------------------------


def _compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


@pytest.mark.parametrize("kind", ["plain", "gzip", "zstd"])
@pytest.mark.parametrize("media_type", [OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD])
def test_compression_is_sniffed_and_diff_id_is_of_the_tar(
    site: Site, kind: str, media_type: str
) -> None:
    layer = tar(dir_("etc"), reg("etc/hostname", b"box\n"), reg("big", os.urandom(3 << 20)))
    stats = site.apply(_compress(kind, layer), media_type=media_type)
    assert stats == LayerStats(diff_id=sha(layer), entries=3, bytes=4 + (3 << 20))
    assert (site.base / "root" / "etc" / "hostname").read_bytes() == b"box\n"


def test_diff_id_covers_trailing_padding_and_multi_member_gzip(site: Site) -> None:
    layer = tar(reg("a", b"x")) + b"\0" * 20480
    blob = gzip.compress(layer[:700]) + gzip.compress(layer[700:])
    assert site.apply(blob, media_type=OCI_LAYER_GZIP).diff_id == sha(layer)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (gzip.compress(tar(reg("a", os.urandom(5000))))[:-2000], "truncated"),
        (b"\x1f\x8b" + b"garbage" * 100, "not valid gzip"),
        (b"not a tar archive at all" * 50, "not a valid tar archive"),
    ],
    ids=["truncated-gzip", "corrupt-gzip", "not-tar"],
)
def test_corrupt_blobs(site: Site, blob: bytes, match: str) -> None:
    with rejects(UnsafeLayer, match):
        site.apply(blob, media_type=OCI_LAYER_GZIP)


def test_non_archive_media_type(site: Site) -> None:
    with pytest.raises(UnsupportedMediaType, match="not a tar archive"):
        site.apply(b"\0asm", media_type=WASM_LAYER)


# -- whiteouts: flatten -------------------------------------------------------------------


def test_whiteout_removes_file_dir_and_link_not_target(site: Site) -> None:
    site.apply(
        tar(
            dir_("d"),
            reg("d/f"),
            dir_("tree"),
            dir_("tree/sub"),
            reg("tree/sub/x"),
            sym("lnk", str(site.outside / "secret")),
            sym("dirlnk", str(site.outside)),
            reg("keep"),
        )
    )
    site.apply(
        tar(
            reg("d/.wh.f", b""),
            reg(".wh.tree", b""),
            reg(".wh.lnk", b""),
            reg(".wh.dirlnk", b""),
            reg(".wh.absent", b""),
        )
    )
    assert sorted(listing(site.base / "root")) == ["d", "keep"]


@pytest.mark.parametrize("opq_first", [True, False])
def test_opaque_hides_lower_but_not_same_layer(site: Site, opq_first: bool) -> None:
    site.apply(tar(dir_("d"), reg("d/old"), dir_("d/sub"), reg("d/sub/old"), sym("d/l", "/x")))
    same_layer = [reg("d/new"), dir_("d/sub"), reg("d/sub/new")]
    opq = reg("d/.wh..wh..opq", b"")
    entries = [opq, *same_layer] if opq_first else [*same_layer, opq]
    site.apply(tar(*entries, reg("d/after")))
    assert sorted(listing(site.base / "root" / "d")) == ["after", "new", "sub", "sub/new"]


def test_whiteout_does_not_hide_same_layer_entry(site: Site) -> None:
    site.apply(tar(reg("f", b"lower")))
    site.apply(tar(reg("f", b"upper"), reg(".wh.f", b"")))
    assert (site.base / "root" / "f").read_bytes() == b"upper"


def test_whiteout_then_recreate_in_one_layer(site: Site) -> None:
    site.apply(tar(dir_("d"), reg("d/old")))
    site.apply(tar(reg(".wh.d", b""), dir_("d"), reg("d/new")))
    assert sorted(listing(site.base / "root" / "d")) == ["new"]


def test_whiteout_naming_dotdot_is_rejected(site: Site) -> None:
    with rejects(PathTraversal, "names no file", "d/.wh.."):
        site.apply(tar(dir_("d"), reg("d/.wh..", b"")))


# -- whiteouts: snapshot (overlay format) -------------------------------------------------


def _is_whiteout(path: Path) -> bool:
    st = path.lstat()
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@requires_root
def test_snapshot_whiteouts_become_overlay_format(site: Site) -> None:
    target = site.stack("snapshot", tar(dir_("d"), reg("d/f"), reg("g"), dir_("o"), reg("o/x")))
    site.apply_last(
        "snapshot",
        tar(reg("d/.wh.f", b""), reg(".wh.g", b""), reg("o/.wh..wh..opq", b""), reg("o/y")),
        target,
    )
    top = site.base / target
    assert _is_whiteout(top / "d" / "f") and _is_whiteout(top / "g")
    assert os.getxattr(top / "o", "trusted.overlay.opaque") == b"y"
    assert (top / "o" / "y").exists() and not (top / "o" / "x").exists()


@requires_root
def test_snapshot_whiteout_then_dir_is_opaque(site: Site) -> None:
    target = site.stack("snapshot", tar(dir_("d"), reg("d/old")))
    site.apply_last("snapshot", tar(reg(".wh.d", b""), dir_("d"), reg("d/new")), target)
    top = site.base / target
    assert os.getxattr(top / "d", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(top / "d")) == ["new"]


@requires_root
def test_snapshot_whiteout_of_same_layer_entry_is_ignored(site: Site) -> None:
    site.apply(tar(reg("f", b"mine"), reg(".wh.f", b"")), mode="snapshot")
    assert (site.base / "root" / "f").read_bytes() == b"mine"


@requires_root
def test_unprivileged_snapshot_marks_opaque_with_user_xattr(short_tmp: Path) -> None:
    """trusted.* needs CAP_SYS_ADMIN: an unprivileged extraction marks opaque dirs with
    user.overlay.opaque (what rootless overlay and the copy fallback read). Whiteout
    devices (0/0) need no privilege since Linux 5.8. Runs in a forked child that dropped
    to nobody: the venv's interpreter is not readable by other users."""
    short_tmp.chmod(0o711)
    target = short_tmp / "target"
    target.mkdir()
    os.chown(target, 65534, 65534)
    layer = tar(reg("d/.wh..wh..opq", b""), reg("d/.wh.gone", b""), reg("d/kept"))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        message = b"ok"
        try:
            os.setgid(65534)
            os.setuid(65534)
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
            apply_layer(
                io.BytesIO(layer), OCI_LAYER_TAR, fd, mode="snapshot", budget=ExtractBudget()
            )
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            message = repr(exc).encode()
        finally:
            os.write(write_end, message)
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    assert message == "ok"
    assert os.getxattr(target / "d", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(target / "d")
    assert _is_whiteout(target / "d" / "gone") and (target / "d" / "kept").exists()


# -- unpack_layer: the snapshot store's applier --------------------------------------------


def _layer(data: bytes, diff_id: str | None = None) -> Layer:
    return Layer(sha(data), OCI_LAYER_TAR, len(data), diff_id or sha(data))


async def test_unpack_layer_verifies_diff_id_and_leaves_nothing(paths: Paths) -> None:
    store = SnapshotStore(paths)
    data = tar(reg("f"))
    bad = _layer(data, diff_id="sha256:" + "0" * 64)
    with pytest.raises(DigestMismatch, match="not the image config's diff_id") as info:
        await unpack_layer(store, bad, lambda: io.BytesIO(data), budget=ExtractBudget())
    assert info.value.actual == sha(data)  # type: ignore[attr-defined]
    assert store.list() == []
    assert os.listdir(paths.snapshots / "tmp") == []


async def test_unpack_layer_hostile_leaves_no_partial_snapshot(paths: Paths) -> None:
    store = SnapshotStore(paths)
    base = tar(sym("d", "/etc"))
    evil = tar(reg("ok", b"x" * 10000), reg("d/passwd", b"pwned"))
    await unpack_layer(store, _layer(base), lambda: io.BytesIO(base), budget=ExtractBudget())
    with pytest.raises(PathTraversal, match="symlink 'd' of a lower layer"):
        await unpack_layer(
            store,
            _layer(evil),
            lambda: io.BytesIO(evil),
            lowers=[sha(base)],
            budget=ExtractBudget(),
        )
    assert store.list() == [sha(base)]
    assert os.listdir(paths.snapshots / "tmp") == []


async def test_unpack_layer_runs_once(paths: Paths) -> None:
    store = SnapshotStore(paths)
    data = tar(dir_("bin"), reg("bin/sh", os.urandom(1 << 20)))
    opened: list[int] = []

    def opener() -> io.BytesIO:
        opened.append(1)
        return io.BytesIO(data)

    results = await asyncio.gather(
        *(unpack_layer(store, _layer(data), opener, budget=ExtractBudget()) for _ in range(6))
    )
    assert len(set(results)) == 1 and len(opened) == 1
    assert (results[0] / "bin" / "sh").stat().st_size == 1 << 20
    assert store.list() == [sha(data)]


def _slow_opener(blobs: dict[str, bytes], slow: set[str]) -> Callable[[Layer], io.BytesIO]:
    def opener(layer: Layer) -> io.BytesIO:
        if layer.diff_id in slow:
            time.sleep(0.2)  # let the layers above start first: exercises the retry
        return io.BytesIO(blobs[layer.diff_id])

    return opener


async def test_unpack_layers_in_parallel(paths: Paths) -> None:
    store = SnapshotStore(paths)
    tars = [
        tar(dir_("bin"), reg("bin/sh", b"sh" * 1000)),
        tar(dir_("etc"), reg("etc/a", b"a" * 3000)),
        tar(reg("etc/b", b"b" * 5000)),  # implicit parent: needs the lowers
        tar(),
        tar(reg(".wh.bin", b"")),
        tar(),  # the same empty layer again
    ]
    layers = [_layer(t) for t in tars]
    blobs = {layer.diff_id: t for layer, t in zip(layers, tars, strict=True)}
    created: list[str] = []
    budget = ExtractBudget()
    opener = _slow_opener(blobs, {layers[0].diff_id, layers[1].diff_id})
    await unpack_layers(store, layers, opener, budget=budget, created=created)
    assert sorted(created) == store.list() == sorted(set(blobs))
    assert budget.used_bytes == 2000 + 3000 + 5000  # a retried layer is not charged twice
    assert (store.path(layers[2].diff_id) / "etc" / "b").read_bytes() == b"b" * 5000
    assert leftovers_of(paths) == []
    await unpack_layers(store, layers, opener, budget=ExtractBudget(), created=created)
    assert len(created) == 5


async def test_unpack_layers_rejects_cross_layer_escape(paths: Paths) -> None:
    store = SnapshotStore(paths)
    tars = [tar(sym("etc", "/etc")), tar(reg("pad", b"x")), tar(reg("etc/passwd", b"pwned"))]
    layers = [_layer(t) for t in tars]
    blobs = {layer.diff_id: t for layer, t in zip(layers, tars, strict=True)}
    created: list[str] = []
    with pytest.raises(PathTraversal, match="symlink 'etc' of a lower layer"):
        await unpack_layers(
            store,
            layers,
            _slow_opener(blobs, {layers[0].diff_id}),
            budget=ExtractBudget(),
            created=created,
        )
    assert layers[2].diff_id not in store.list()
    assert store.list() == sorted(created)
    assert leftovers_of(paths) == []


def leftovers_of(paths: Paths) -> list[str]:
    return os.listdir(paths.snapshots / "tmp")
