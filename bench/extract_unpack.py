"""Layer extraction alone: magikrun's unpack into snapshots + rootfs vs ``umoci unpack``.

Builds a deterministic 5-layer image as an OCI layout (busybox with its applet symlinks,
then four layers of 120 files of 1-80 kB, gzip), then, each ``--runs`` times into fresh
directories and alternating which goes first:

- magikrun: ``unpack_layers`` (layers in parallel) into a ``SnapshotStore`` (snapshot mode,
  diff_id verified) and ``prepare_rootfs`` (overlay mount, or copy without root), then
  remove; and the same with ``unpack_layer`` one layer at a time
- magikrun flatten: ``apply_layer`` of every layer onto one directory (the no-overlay path)
- peer: ``umoci unpack --image LAYOUT:bench BUNDLE`` (flattened rootfs + config.json)

and prints the medians and the ratios against umoci measured in the same run. No network:
this isolates extraction from the registry client that ``bench/pull_unpack.py`` also times.

    .venv/bin/python bench/extract_unpack.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from magikrun.image import ExtractBudget, Layer, apply_layer, unpack_layer, unpack_layers
from magikrun.image._mediatypes import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST
from magikrun.platform import Paths
from magikrun.storage import SnapshotStore

APPLETS = 300
FILE_LAYERS = 4
FILES_PER_LAYER = 120
WORDS = [b"magikrun", b"layer", b"overlay", b"digest", b"snapshot", b"\n"]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(entries: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in entries:
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _layers() -> list[bytes]:
    """Uncompressed tars: busybox and its applet links, then layers of varied files."""
    busybox = Path("/bin/busybox").read_bytes()
    base: list[tuple[tarfile.TarInfo, bytes | None]] = [
        _dir("bin"),
        _file("bin/busybox", busybox, 0o755),
    ]
    for i in range(APPLETS):
        link = tarfile.TarInfo(f"bin/applet{i}")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        base.append((link, None))
    layers = [_tar(base)]
    for seed in range(1, FILE_LAYERS + 1):
        rng = random.Random(seed)  # noqa: S311 - reproducible data, not secrets
        entries: list[tuple[tarfile.TarInfo, bytes | None]] = [_dir(f"data{seed}")]
        entries += [_dir(f"data{seed}/d{j}") for j in range(7)]
        for i in range(FILES_PER_LAYER):
            size = rng.randint(1_000, 80_000)
            if i % 3 == 0:
                data = rng.randbytes(size)
            else:
                data = b" ".join(rng.choice(WORDS) for _ in range(size // 6))[:size]
            entries.append(_file(f"data{seed}/d{i % 7}/f{i}.bin", data))
        layers.append(_tar(entries))
    return layers


def _write_layout(layout: Path, tars: list[bytes], blobs: list[bytes]) -> None:
    """An OCI image layout umoci can unpack, tagged ``bench``."""
    store = layout / "blobs" / "sha256"
    store.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = _sha(data)
        (store / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/busybox", "sh"]},
            "rootfs": {"type": "layers", "diff_ids": [_sha(t) for t in tars]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": put(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": put(b), "size": len(b)} for b in blobs
            ],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": put(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "bench"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


async def _magikrun(root: Path, layers: list[Layer], blobs: list[bytes], *, parallel: bool) -> None:
    store = SnapshotStore(Paths.resolve(root).ensure())
    budget = ExtractBudget()
    if parallel:
        by_diff = {layer.diff_id: blob for layer, blob in zip(layers, blobs, strict=True)}
        await unpack_layers(
            store, layers, lambda layer: io.BytesIO(by_diff[layer.diff_id]), budget=budget
        )
    else:
        below: list[str] = []
        for layer, blob in zip(layers, blobs, strict=True):
            opener = functools.partial(io.BytesIO, blob)
            await unpack_layer(store, layer, opener, lowers=below[::-1], budget=budget)
            below.append(layer.diff_id)
    rootfs = await store.prepare_rootfs("bench", [layer.diff_id for layer in layers])
    await rootfs.remove()


def _run_magikrun(root: Path, layers: list[Layer], blobs: list[bytes], parallel: bool) -> None:
    asyncio.run(_magikrun(root, layers, blobs, parallel=parallel))


def _flatten(target: Path, blobs: list[bytes]) -> None:
    target.mkdir()
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        budget = ExtractBudget()
        for blob in blobs:
            apply_layer(io.BytesIO(blob), OCI_LAYER_GZIP, fd, mode="flatten", budget=budget)
    finally:
        os.close(fd)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    tars = _layers()
    blobs = [gzip.compress(t, compresslevel=6) for t in tars]
    layers = [
        Layer(_sha(b), OCI_LAYER_GZIP, len(b), _sha(t)) for t, b in zip(tars, blobs, strict=True)
    ]
    work = Path(tempfile.mkdtemp(prefix="mk-bench-extract-"))
    umoci_flags = [] if os.geteuid() == 0 else ["--rootless"]
    try:
        _write_layout(work / "layout", tars, blobs)
        print(
            f"image: {len(blobs)} layers, {sum(map(len, blobs)) / 1e6:.1f} MB compressed, "
            f"{sum(map(len, tars)) / 1e6:.1f} MB of tar"
        )
        times: dict[str, list[float]] = {
            k: [] for k in ("parallel", "magikrun", "flatten", "umoci")
        }
        for run in range(args.runs):
            round_dir = work / f"run{run}"
            round_dir.mkdir()

            def peer(bundle: Path = round_dir / "bundle") -> None:
                subprocess.run(
                    ["umoci", "unpack", *umoci_flags, "--image", f"{work / 'layout'}:bench",
                     str(bundle)],
                    check=True, stdout=subprocess.DEVNULL,
                )  # fmt: skip

            if run % 2:
                times["umoci"].append(_timed(peer))
            for parallel, key in ((True, "parallel"), (False, "magikrun")):
                run_it = functools.partial(_run_magikrun, round_dir / key, layers, blobs, parallel)
                times[key].append(_timed(run_it))
            times["flatten"].append(_timed(functools.partial(_flatten, round_dir / "flat", blobs)))
            if not run % 2:
                times["umoci"].append(_timed(peer))
            shutil.rmtree(round_dir)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"runs: {args.runs} (medians)")
        print(
            f"magikrun unpack_layers+rootfs {med['parallel'] * 1000:8.1f} ms  "
            f"ratio vs umoci {med['parallel'] / med['umoci']:.2f}x"
        )
        print(
            f"  one layer at a time         {med['magikrun'] * 1000:8.1f} ms  "
            f"ratio vs umoci {med['magikrun'] / med['umoci']:.2f}x"
        )
        print(
            f"magikrun flatten (no overlay) {med['flatten'] * 1000:8.1f} ms  "
            f"ratio vs umoci {med['flatten'] / med['umoci']:.2f}x"
        )
        print(f"umoci unpack                  {med['umoci'] * 1000:8.1f} ms")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
