"""Pull + unpack of a multi-layer image from a loopback registry: magikrun vs skopeo + umoci.

Starts Debian's docker-registry on a free 127.0.0.1 port, pushes a deterministic
5-layer image (busybox plus four layers of a few MB of varied files), then runs,
each ``--runs`` times into a fresh root:

- magikrun, library: ``ImageService(paths).pull(ref)`` (download, verify, unpack, index)
- magikrun, CLI: ``magikrun --root R image pull --quiet REF`` (adds interpreter start-up)
- peer: ``skopeo copy docker://REF oci:DIR:bench`` then ``umoci unpack --image DIR:bench B``
- a second pull of the cached image (library, fresh ImageService each time; and CLI)

and prints the medians and the ratios against the peer measured in the same run.
Targets: library pull+unpack at most 0.8x the peer; cached pull under 50 ms.

    .venv/bin/python bench/pull_unpack.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repo root: tests/ is a package

from magikrun.image import ImageService, LayerEntry, RegistryClient, build_layer, pull  # noqa: E402
from magikrun.platform import Paths  # noqa: E402
from tests._registry import RegistryServer, busybox_layer, make_image, push_image  # noqa: E402

MAGIKRUN = Path(sys.executable).with_name("magikrun")
LAYERS = 4
FILES_PER_LAYER = 120
WORDS = [b"magikrun", b"layer", b"overlay", b"registry", b"digest", b"snapshot", b"wasm", b"\n"]


def _varied_layer(seed: int) -> bytes:
    """A few MB of files: some text-like (compressible), some random (not), sizes 1 kB-80 kB."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    entries = [LayerEntry(f"data{seed}", "dir", mode=0o755)]
    for i in range(FILES_PER_LAYER):
        size = rng.randint(1_000, 80_000)
        if i % 3 == 0:
            data = rng.randbytes(size)
        else:
            data = b" ".join(rng.choice(WORDS) for _ in range(size // 6))[:size]
        entries.append(LayerEntry(f"data{seed}/d{i % 7}/f{i}.bin", data=data))
        if i % 7 == 0:
            entries.append(LayerEntry(f"data{seed}/d{i % 7}", "dir", mode=0o755))
    blob, _ = build_layer(entries, gzip_level=6)
    return blob


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    layers = [busybox_layer()] + [_varied_layer(seed) for seed in range(1, LAYERS + 1)]
    image = make_image(layers)
    total = sum(len(b) for b in layers)
    server = RegistryServer().start()
    work = Path(tempfile.mkdtemp(prefix="mk-bench-"))
    try:
        ref = f"{server.host}/bench/pull:1"

        async def push() -> None:
            async with RegistryClient(server.host) as client:
                await push_image(client, "bench/pull", "1", image)

        asyncio.run(push())
        print(
            f"image: {len(layers)} layers, {total / 1e6:.1f} MB compressed, registry {server.host}"
        )
        umoci_flags = [] if os.geteuid() == 0 else ["--rootless"]
        results: dict[str, list[float]] = {
            k: [] for k in ("api", "cli", "peer", "cached", "cached_cli", "download", "unpack")
        }
        for run in range(args.runs):
            _one_run(work / str(run), ref, umoci_flags, results, peer_first=run % 2 == 1)
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"runs: {args.runs} (medians)")
        print(
            f"magikrun pull+unpack (library)   {med['api'] * 1000:8.1f} ms  "
            f"ratio vs skopeo+umoci {med['api'] / med['peer']:.2f}x (target <= 0.80x)"
        )
        print(
            f"magikrun pull+unpack (CLI)       {med['cli'] * 1000:8.1f} ms  "
            f"ratio vs skopeo+umoci {med['cli'] / med['peer']:.2f}x"
        )
        print(f"skopeo copy + umoci unpack       {med['peer'] * 1000:8.1f} ms")
        print(f"  of magikrun's: download only   {med['download'] * 1000:8.1f} ms")
        print(f"  of magikrun's: unpack + index  {med['unpack'] * 1000:8.1f} ms")
        print(f"cached pull (library)            {med['cached'] * 1000:8.1f} ms  (target < 50 ms)")
        print(f"cached pull (CLI, with startup)  {med['cached_cli'] * 1000:8.1f} ms")
    finally:
        server.stop()
        _cleanup(work)


def _one_run(
    work: Path,
    ref: str,
    umoci_flags: list[str],
    results: dict[str, list[float]],
    *,
    peer_first: bool,
) -> None:
    """One round; the order alternates so neither side always meets a cold cache."""
    work.mkdir(parents=True)
    root, cli_root, split = work / "api", work / "cli", work / "split"
    oci, bundle = work / "oci", work / "bundle"

    def peer() -> None:
        _run(
            "skopeo", "copy", "--quiet", "--src-tls-verify=false",
            f"docker://{ref}", f"oci:{oci}:bench",
        )  # fmt: skip
        _run("umoci", "unpack", *umoci_flags, "--image", f"{oci}:bench", str(bundle))

    if peer_first:
        results["peer"].append(_timed(peer))
    paths = Paths.resolve(root).ensure()
    results["api"].append(_timed(lambda: asyncio.run(ImageService(paths).pull(ref))))

    async def cached() -> float:
        start = time.perf_counter()
        await ImageService(paths).pull(ref)
        return time.perf_counter() - start

    results["cached"].append(asyncio.run(cached()))
    cli = [str(MAGIKRUN), "--root"]
    results["cached_cli"].append(_timed(lambda: _run(*cli, str(root), "image", "pull", "-q", ref)))
    results["cli"].append(_timed(lambda: _run(*cli, str(cli_root), "image", "pull", "-q", ref)))
    split_paths = Paths.resolve(split).ensure()
    content = ImageService(split_paths).content
    results["download"].append(_timed(lambda: asyncio.run(pull(ref, content))))
    results["unpack"].append(_timed(lambda: asyncio.run(ImageService(split_paths).pull(ref))))
    if not peer_first:
        results["peer"].append(_timed(peer))
    _cleanup(work)


def _cleanup(path: Path) -> None:
    """Unmount nothing (a pull mounts nothing) and delete the tree."""
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
