"""OCI image layouts and image archives: read them safely, write them deterministically.

Reading treats the archive as hostile: every name inside it is checked before it
is used, nothing is followed out of the archive (a layout directory is walked
from its directory fd without following links; a tar is read member by member,
never extracted), and manifests, configs and blobs are bounded by the same
limits as a pull. Writing (for the demo images and tests) produces byte-identical
output for identical input: sorted entries, fixed times, canonical JSON.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from ..errors import (
    ImageNotFound,
    ImageTooLarge,
    InvalidArgument,
    ManifestInvalid,
    PathTraversal,
    UnsupportedMediaType,
)
from ..platform import (
    MAX_CONFIG_SIZE,
    MAX_FILES_PER_LAYER,
    MAX_LAYER_SIZE,
    MAX_LAYERS,
    MAX_MANIFEST_SIZE,
    MAX_SYMLINK_DEPTH,
    MAX_WASM_MODULE_SIZE,
)
from ..storage import sha256_digest, validate_digest
from ._mediatypes import (
    ARCHIVE_LAYERS,
    CONFIG_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    WASM_CONFIG,
    WASM_LAYER,
)
from ._model import Descriptor, Image, ImageConfig, Layer, PlatformSpec

__all__ = [
    "REF_NAME_ANNOTATION",
    "ArchiveSource",
    "LayerEntry",
    "LayoutWriter",
    "ParsedManifest",
    "build_image",
    "build_layer",
    "canonical_json",
    "open_archive",
    "parse_descriptor",
    "parse_index",
    "parse_manifest",
    "platform_key",
    "select_platform",
]

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
LAYOUT_VERSION = "1.0.0"
FIXED_MTIME = 946_684_800
"""2000-01-01T00:00:00Z: the mtime of every entry magikrun writes, so digests are stable."""
_MAX_NAME = 4096
WASM_PLATFORM = PlatformSpec("wasip1", "wasm")
"""The platform of a wasm artifact whose config names none."""
_CHUNK = 1 << 20


def canonical_json(obj: Any) -> bytes:
    """The one JSON encoding magikrun writes for blobs: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# -- reading archives ---------------------------------------------------------


class ArchiveSource(Protocol):
    """The files of an image archive, addressed by checked relative names."""

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def open(self, name: str) -> IO[bytes]: ...


def safe_name(name: str) -> str:
    """Normalize a name inside an archive; raise PathTraversal if it could leave it."""
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME or "\x00" in name:
        raise PathTraversal(
            f"archive entry name {str(name)[:100]!r} is empty, too long or has a NUL byte",
            path=str(name)[:100],
        )
    if name.startswith("/") or any(part == ".." for part in name.split("/")):
        raise PathTraversal(f"archive entry {name[:200]!r} points outside the archive", path=name)
    normal = posixpath.normpath(name)
    if normal in (".", ""):
        raise PathTraversal(f"archive entry {name[:200]!r} names the archive root", path=name)
    return normal


def read_limited(source: ArchiveSource, name: str, limit: int, what: str) -> bytes:
    """Read a small file whole, refusing one over ``limit`` before reading it."""
    size = source.size(name)
    if size > limit:
        raise ImageTooLarge(f"{what} {name!r} is {size} bytes, over the {limit}-byte limit")
    with source.open(name) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ImageTooLarge(f"{what} {name!r} is over the {limit}-byte limit")
    return data


def read_json(source: ArchiveSource, name: str, limit: int, what: str) -> Any:
    data = read_limited(source, name, limit, what)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestInvalid(f"{what} {name!r} is not valid JSON: {exc}") from exc


class _DirSource:
    """A layout directory, walked from its fd without following any link."""

    def __init__(self, root_fd: int) -> None:
        self._root = root_fd

    def _open_fd(self, name: str) -> int:
        parts = safe_name(name).split("/")
        fd = os.dup(self._root)
        try:
            for part in parts[:-1]:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
            leaf = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except FileNotFoundError:
            raise ImageNotFound(
                f"archive has no {name!r}", hint="is this an OCI layout or docker-save archive?"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise PathTraversal(
                    f"archive path {name!r} goes through a symbolic link or non-directory",
                    path=name,
                ) from exc
            raise
        finally:
            os.close(fd)
        if not stat.S_ISREG(os.fstat(leaf).st_mode):
            os.close(leaf)
            raise PathTraversal(f"archive entry {name!r} is not a regular file", path=name)
        return leaf

    def exists(self, name: str) -> bool:
        try:
            os.close(self._open_fd(name))
        except ImageNotFound:
            return False
        return True

    def size(self, name: str) -> int:
        fd = self._open_fd(name)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def open(self, name: str) -> IO[bytes]:
        fd = self._open_fd(name)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")


class _TarSource:
    """A tar archive read in place. Links inside it resolve only to its own members."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self._tar = tar
        self._files: dict[str, tarfile.TarInfo] = {}
        self._links: dict[str, str] = {}
        count = 0
        for member in tar:
            count += 1
            if count > MAX_FILES_PER_LAYER:
                raise ImageTooLarge(f"archive has more than {MAX_FILES_PER_LAYER} entries")
            name = safe_name(member.name)
            if member.isreg():
                self._files[name] = member
            elif member.issym() or member.islnk():
                base = posixpath.dirname(name) if member.issym() else ""
                target = member.linkname
                if member.issym() and target.startswith("/"):
                    raise PathTraversal(
                        f"archive link {name!r} points outside the archive", path=name
                    )
                joined = posixpath.normpath(posixpath.join(base, target))
                if joined == ".." or joined.startswith("../"):
                    raise PathTraversal(
                        f"archive link {name!r} points outside the archive", path=name
                    )
                self._links[name] = safe_name(joined)
            elif not member.isdir():
                raise PathTraversal(
                    f"archive entry {name!r} is a device, fifo or other special file", path=name
                )

    def _member(self, name: str) -> tarfile.TarInfo:
        current = safe_name(name)
        for _ in range(MAX_SYMLINK_DEPTH):
            if current in self._files:
                return self._files[current]
            if current not in self._links:
                raise ImageNotFound(
                    f"archive has no {name!r}",
                    hint="is this an OCI layout or docker-save archive?",
                )
            current = self._links[current]
        raise PathTraversal(f"archive link {name!r} loops or is nested too deeply", path=name)

    def exists(self, name: str) -> bool:
        try:
            self._member(name)
        except ImageNotFound:
            return False
        return True

    def size(self, name: str) -> int:
        return self._member(name).size

    def open(self, name: str) -> IO[bytes]:
        f = self._tar.extractfile(self._member(name))
        if f is None:
            raise ImageNotFound(f"archive entry {name!r} has no content")
        return f


@contextmanager
def open_archive(path: str | os.PathLike[str]) -> Iterator[ArchiveSource]:
    """Open an image archive: a layout directory, or a tar (plain or gzip-compressed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InvalidArgument(
            f"no such file or directory: {os.fspath(path)}",
            hint="pass an OCI layout directory, an OCI layout tar or a docker-save tar",
            path=os.fspath(path),
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            yield _DirSource(fd)
            return
        if not stat.S_ISREG(mode):
            raise InvalidArgument(
                f"{os.fspath(path)} is neither a directory nor a regular file",
                hint="pass an OCI layout directory or a tar archive",
                path=os.fspath(path),
            )
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "rb") as raw:
            try:
                tar = tarfile.open(fileobj=raw, mode="r:*")
            except tarfile.TarError as exc:
                raise InvalidArgument(
                    f"{os.fspath(path)} is not a tar archive: {exc}",
                    hint="pass an OCI layout directory, an OCI layout tar or a docker-save tar",
                    path=os.fspath(path),
                ) from exc
            with tar:
                try:
                    yield _TarSource(tar)
                except tarfile.TarError as exc:
                    raise ManifestInvalid(
                        f"{os.fspath(path)} is a damaged tar archive: {exc}",
                        path=os.fspath(path),
                    ) from exc
    finally:
        os.close(fd)


def blob_name(digest: str) -> str:
    return f"blobs/sha256/{validate_digest(digest)[7:]}"


# -- parsing manifests and configs -------------------------------------------


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ManifestInvalid(message)


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    _require(
        isinstance(value, list) and all(isinstance(v, str) for v in value),
        f"{what} must be a list of strings",
    )
    return tuple(value)


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    _require(
        isinstance(value, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()),
        f"{what} must map strings to strings",
    )
    return dict(value)


def parse_descriptor(obj: Any, what: str) -> Descriptor:
    """A descriptor from untrusted JSON: digest validated, size a non-negative int."""
    _require(isinstance(obj, dict), f"{what} is not an object")
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    _require(isinstance(media_type, str) and 0 < len(media_type) <= 255, f"{what}: bad mediaType")
    _require(isinstance(digest, str), f"{what}: digest missing")
    _require(
        isinstance(size, int) and not isinstance(size, bool) and size >= 0,
        f"{what}: size must be a non-negative integer",
    )
    platform = None
    if obj.get("platform") is not None:
        p = obj["platform"]
        _require(
            isinstance(p, dict)
            and isinstance(p.get("os"), str)
            and isinstance(p.get("architecture"), str),
            f"{what}: bad platform",
        )
        variant = p.get("variant")
        platform = PlatformSpec(
            p["os"], p["architecture"], variant if isinstance(variant, str) and variant else None
        )
    return Descriptor(
        media_type=media_type,
        digest=validate_digest(digest),
        size=size,
        urls=_str_list(obj.get("urls"), f"{what}.urls"),
        annotations=_str_map(obj.get("annotations"), f"{what}.annotations"),
        platform=platform,
    )


def parse_index(data: bytes) -> list[Descriptor]:
    """The manifests an image index (or a layout's ``index.json``) lists."""
    doc = _loads(data, "image index")
    _require(isinstance(doc, dict), "image index is not an object")
    manifests = doc.get("manifests")
    _require(isinstance(manifests, list), "image index has no manifests list")
    return [parse_descriptor(m, f"index.manifests[{i}]") for i, m in enumerate(manifests)]


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    """An image manifest, checked against the limits."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)


def parse_manifest(data: bytes) -> ParsedManifest:
    if len(data) > MAX_MANIFEST_SIZE:
        raise ImageTooLarge(f"manifest is over the {MAX_MANIFEST_SIZE}-byte limit")
    doc = _loads(data, "manifest")
    _require(isinstance(doc, dict), "manifest is not an object")
    _require(doc.get("schemaVersion") == 2, "manifest schemaVersion must be 2")
    media_type = doc.get("mediaType", OCI_MANIFEST)
    if media_type not in MANIFEST_TYPES:
        raise UnsupportedMediaType(
            f"manifest media type {str(media_type)[:100]!r} is not supported"
        )
    config = parse_descriptor(doc.get("config"), "manifest.config")
    if config.media_type not in CONFIG_TYPES:
        raise UnsupportedMediaType(f"config media type {config.media_type!r} is not supported")
    if config.size > MAX_CONFIG_SIZE:
        raise ImageTooLarge(f"image config is over the {MAX_CONFIG_SIZE}-byte limit")
    raw_layers = doc.get("layers")
    _require(isinstance(raw_layers, list), "manifest has no layers list")
    if len(raw_layers) > MAX_LAYERS:
        raise ImageTooLarge(f"image has {len(raw_layers)} layers, over the limit of {MAX_LAYERS}")
    layers = tuple(parse_descriptor(x, f"manifest.layers[{i}]") for i, x in enumerate(raw_layers))
    for layer in layers:
        if layer.media_type not in ARCHIVE_LAYERS and layer.media_type != WASM_LAYER:
            raise UnsupportedMediaType(f"layer media type {layer.media_type!r} is not supported")
        limit = MAX_WASM_MODULE_SIZE if layer.media_type == WASM_LAYER else MAX_LAYER_SIZE
        if layer.size > limit:
            raise ImageTooLarge(
                f"layer {layer.digest} is {layer.size} bytes, over the {limit}-byte limit",
                digest=layer.digest,
            )
    return ParsedManifest(
        media_type=str(media_type),
        config=config,
        layers=layers,
        annotations=_str_map(doc.get("annotations"), "manifest.annotations"),
    )


def build_image(
    reference: str, manifest_digest: str, manifest: ParsedManifest, config_data: bytes
) -> Image:
    """The Image a manifest and its (digest-checked) config describe."""
    if len(config_data) > MAX_CONFIG_SIZE:
        raise ImageTooLarge(f"image config is over the {MAX_CONFIG_SIZE}-byte limit")
    doc = _loads(config_data, "image config")
    _require(isinstance(doc, dict), "image config is not an object")
    settings = doc.get("config") or {}
    _require(isinstance(settings, dict), "image config 'config' is not an object")
    ports = settings.get("ExposedPorts") or {}
    _require(isinstance(ports, dict), "ExposedPorts is not an object")
    for key in ("WorkingDir", "User", "StopSignal"):
        _require(isinstance(settings.get(key, ""), str), f"image config {key} is not a string")
    config = ImageConfig(
        entrypoint=_str_list(settings.get("Entrypoint"), "Entrypoint"),
        cmd=_str_list(settings.get("Cmd"), "Cmd"),
        env=_str_list(settings.get("Env"), "Env"),
        working_dir=settings.get("WorkingDir") or "",
        user=settings.get("User") or "",
        labels=_str_map(settings.get("Labels"), "Labels"),
        exposed_ports=tuple(sorted(str(p) for p in ports)),
        stop_signal=settings.get("StopSignal") or "",
    )
    archives = [d for d in manifest.layers if d.media_type in ARCHIVE_LAYERS]
    rootfs = doc.get("rootfs") or {}
    _require(isinstance(rootfs, dict), "image config rootfs is not an object")
    diff_ids = [validate_digest(d) for d in _str_list(rootfs.get("diff_ids"), "rootfs.diff_ids")]
    _require(
        len(diff_ids) == len(archives),
        f"image config lists {len(diff_ids)} diff_ids for {len(archives)} layers",
    )
    pending = iter(diff_ids)
    layers = tuple(
        Layer(
            digest=d.digest,
            media_type=d.media_type,
            size=d.size,
            diff_id=d.digest if d.media_type == WASM_LAYER else next(pending),
        )
        for d in manifest.layers
    )
    is_wasm = manifest.config.media_type == WASM_CONFIG or any(
        layer.media_type == WASM_LAYER for layer in layers
    )
    os_name, arch = doc.get("os"), doc.get("architecture")
    variant = doc.get("variant")
    if is_wasm and os_name is None and arch is None:
        # A wasm artifact's config may be ``{}`` (the wasm config media type asks for no
        # platform): its module runs on any host, under WASI preview 1.
        os_name, arch = WASM_PLATFORM.os, WASM_PLATFORM.architecture
    _require(
        isinstance(os_name, str) and isinstance(arch, str), "image config lacks os/architecture"
    )
    platform = PlatformSpec(
        os_name, arch, variant if isinstance(variant, str) and variant else None
    )
    created = doc.get("created")
    annotations: dict[str, Any] = dict(manifest.annotations)
    if isinstance(created, str):
        annotations.setdefault("org.opencontainers.image.created", created)
    return Image(
        reference=reference,
        manifest_digest=validate_digest(manifest_digest),
        config_digest=manifest.config.digest,
        platform=platform,
        config=config,
        layers=layers,
        kind="wasm" if is_wasm else "oci",
        annotations=annotations,
    )


def _loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestInvalid(f"{what} is not valid JSON: {exc}") from exc


# -- writing ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayerEntry:
    """One entry of a layer archive that magikrun writes."""

    path: str
    kind: Literal["file", "dir", "symlink"] = "file"
    data: bytes = b""
    mode: int = 0o644
    target: str = ""
    """Link target, for symlinks."""


def build_layer(entries: Iterable[LayerEntry], *, gzip_level: int | None = 6) -> tuple[bytes, str]:
    """A deterministic layer blob and its diff_id (the digest of the uncompressed tar)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(entries, key=lambda e: e.path):
            info = tarfile.TarInfo(entry.path.strip("/"))
            info.mtime = FIXED_MTIME
            info.mode = entry.mode
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = entry.target
                tar.addfile(info)
            else:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    raw = buf.getvalue()
    diff_id = sha256_digest(raw)
    if gzip_level is None:
        return raw, diff_id
    return gzip.compress(raw, compresslevel=gzip_level, mtime=0), diff_id


class LayoutWriter:
    """Write images into an OCI image layout directory.

    ```python
    writer = LayoutWriter(Path("out"))
    writer.add_image(ref_name="example.local/app:1", config=cfg, layers=[(OCI_LAYER_GZIP, blob)])
    writer.write_index()
    ```
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._manifests: list[dict[str, Any]] = []
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def add_blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = sha256_digest(data)
        target = self.root / blob_name(digest)
        if not target.exists():
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(data)
            tmp.rename(target)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_image(
        self,
        *,
        ref_name: str,
        config: Mapping[str, Any],
        layers: Sequence[tuple[str, bytes]],
        config_media_type: str = OCI_CONFIG,
        artifact_type: str | None = None,
        platform: PlatformSpec | None = None,
    ) -> str:
        """Store config, layers and manifest; list the manifest under ``ref_name``.
        Returns the manifest digest."""
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.add_blob(canonical_json(config), config_media_type),
            "layers": [self.add_blob(data, media_type) for media_type, data in layers],
        }
        if artifact_type is not None:
            manifest["artifactType"] = artifact_type
        desc = self.add_blob(canonical_json(manifest), OCI_MANIFEST)
        desc["annotations"] = {REF_NAME_ANNOTATION: ref_name}
        if platform is not None:
            desc["platform"] = {"os": platform.os, "architecture": platform.architecture}
            if platform.variant:
                desc["platform"]["variant"] = platform.variant
        self._manifests.append(desc)
        return str(desc["digest"])

    def write_index(self) -> None:
        """Write ``oci-layout`` and ``index.json`` listing every added image."""
        (self.root / "oci-layout").write_bytes(
            canonical_json({"imageLayoutVersion": LAYOUT_VERSION})
        )
        manifests = sorted(self._manifests, key=lambda d: d["annotations"][REF_NAME_ANNOTATION])
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        (self.root / "index.json").write_bytes(canonical_json(index))


def copy_stream(src: IO[bytes], write: Callable[[bytes], object], limit: int) -> int:
    """Copy ``src`` through ``write`` in chunks, up to ``limit`` + 1 bytes; returns bytes."""
    total = 0
    while chunk := src.read(min(_CHUNK, limit + 1 - total)):
        write(chunk)
        total += len(chunk)
        if total > limit:
            break
    return total


_WASM_OSES = frozenset({"wasi", "wasip1", "wasip2"})


def platform_key(p: PlatformSpec) -> tuple[str, str, str | None]:
    """What platforms are compared by: (os, architecture, variant), with the variants that
    are implied filled in (containerd's rules: arm64 is v8, arm is v7)."""
    variant = p.variant
    if p.architecture == "arm64" and variant is None:
        variant = "v8"
    elif p.architecture == "arm" and variant is None:
        variant = "v7"
    elif p.architecture == "amd64" and variant == "v1":
        variant = None
    return p.os, p.architecture, variant


def select_platform(
    manifests: list[Descriptor], wanted: PlatformSpec, *, explicit: bool, reference: str
) -> Descriptor:
    """The index entry for ``wanted`` (os/architecture/variant).

    Without an explicit choice, an index with no entry for the host but one for
    WebAssembly yields that one: a wasm module runs on any host.
    """
    candidates = [m for m in manifests if m.platform is not None and m.media_type in MANIFEST_TYPES]
    key = platform_key(wanted)
    for m in candidates:
        assert m.platform is not None
        if platform_key(m.platform) == key:
            return m
    if not explicit:
        for m in candidates:
            assert m.platform is not None
            if m.platform.os in _WASM_OSES or m.platform.architecture == "wasm":
                return m
    available = ", ".join(sorted({str(m.platform) for m in candidates})) or "none"
    raise ImageNotFound(
        f"image {reference} has no manifest for {wanted}; available platforms: {available}",
        hint="choose one of the available platforms with --platform OS/ARCH[/VARIANT]",
        reference=reference,
        platform=str(wanted),
    )
