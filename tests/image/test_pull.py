"""Pulls from a real docker-registry on loopback, through taps that misbehave on demand."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from magikrun.errors import (
    DigestMismatch,
    ImageNotFound,
    ImagePullFailed,
    ImageTooLarge,
    MagikrunTimeout,
    RegistryAuthError,
    StorageFull,
)
from magikrun.image._layout import canonical_json
from magikrun.image._mediatypes import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST
from magikrun.image._model import PlatformSpec
from magikrun.image._pull import pull
from magikrun.image._reference import Reference
from magikrun.image._registry import ProgressEvent, RegistryClient
from magikrun.platform import MAX_LAYER_SIZE, MAX_MANIFEST_SIZE, Paths
from magikrun.storage import ContentStore, sha256_digest
from tests._registry import (
    HttpTap,
    RegistryServer,
    Seen,
    TestImage,
    busybox_layer,
    file_layer,
    make_image,
    push_image,
    push_index,
    serve_image,
    unique_repo,
)
from tests.conftest import REGISTRY_USERS, requires_root

USER, PASSWORD = next(iter(REGISTRY_USERS.items()))
CREDS = f"{USER}:{PASSWORD}"
HOSTILE_BYTES = 64 * 1024 * 1024


def stored_blobs(paths: Paths) -> set[str]:
    return set(ContentStore(paths).list())


async def pushed(
    server: RegistryServer, image: TestImage, *, creds: str | None = None, tag: str = "v1"
) -> str:
    repo = unique_repo()
    async with RegistryClient.for_reference(_ref(server.host, repo), creds=creds) as client:
        await push_image(client, repo, tag, image)
    return repo


def _ref(host: str, repo: str, tag: str = "v1") -> Reference:
    return Reference.parse(f"{host}/{repo}:{tag}")


async def test_single_arch_pull(registry: RegistryServer, paths: Paths) -> None:
    image = make_image([busybox_layer(), file_layer({"etc/motd": b"hello\n"})], cmd=("/bin/sh",))
    repo = await pushed(registry, image)
    store = ContentStore(paths)
    events: list[ProgressEvent] = []

    pulled = await pull(f"{registry.host}/{repo}:v1", store, progress=events.append)

    assert pulled.reference == f"{registry.host}/{repo}:v1"
    assert pulled.manifest_digest == image.digest
    assert pulled.config_digest == sha256_digest(image.config)
    assert [layer.digest for layer in pulled.layers] == image.layer_digests
    assert pulled.config.cmd == ("/bin/sh",)
    assert pulled.platform == PlatformSpec("linux", "amd64")
    assert pulled.kind == "oci"
    assert stored_blobs(paths) == {image.digest, pulled.config_digest, *image.layer_digests}
    assert all(store.verify(d) for d in stored_blobs(paths))
    finished = {e.digest for e in events if e.finished}
    assert finished == {pulled.config_digest, *image.layer_digests}
    assert any(not e.finished and 0 < e.done < e.total for e in events)

    again: list[ProgressEvent] = []
    assert await pull(f"{registry.host}/{repo}:v1", store, progress=again.append) == pulled
    assert all(e.finished for e in again)


async def test_pull_by_digest_and_missing_tag(registry: RegistryServer, paths: Paths) -> None:
    image = make_image([file_layer({"a": b"a"})])
    repo = await pushed(registry, image)
    store = ContentStore(paths)
    pulled = await pull(f"{registry.host}/{repo}@{image.digest}", store)
    assert pulled.manifest_digest == image.digest
    with pytest.raises(ImageNotFound, match="not found") as info:
        await pull(f"{registry.host}/{repo}:nope", ContentStore(Paths.resolve(paths.data / "x")))
    assert "MANIFEST_UNKNOWN" in str(info.value)


async def test_index_selects_platform_and_variant(registry: RegistryServer, paths: Paths) -> None:
    platforms = [
        PlatformSpec("linux", "amd64"),
        PlatformSpec("linux", "arm64", "v8"),
        PlatformSpec("linux", "arm", "v7"),
        PlatformSpec("linux", "arm", "v6"),
    ]
    images = [
        make_image([file_layer({"platform": str(p).encode()})], platform=p) for p in platforms
    ]
    repo = unique_repo()
    async with RegistryClient(registry.host) as client:
        await push_index(client, repo, "multi", images)
    store = ContentStore(paths)
    ref = f"{registry.host}/{repo}:multi"

    cases = [
        (None, images[0]),
        (PlatformSpec("linux", "arm64"), images[1]),
        (PlatformSpec("linux", "arm64", "v8"), images[1]),
        (PlatformSpec("linux", "arm", "v7"), images[2]),
        (PlatformSpec("linux", "arm"), images[2]),
        (PlatformSpec("linux", "arm", "v6"), images[3]),
    ]
    for platform, expected in cases:
        pulled = await pull(ref, store, platform=platform)
        assert pulled.manifest_digest == expected.digest, platform
        assert pulled.layers[0].digest == expected.layer_digests[0]
        assert pulled.platform == expected.platform

    before = stored_blobs(paths)
    with pytest.raises(ImageNotFound) as info:
        await pull(ref, store, platform=PlatformSpec("linux", "riscv64"))
    assert "no manifest for linux/riscv64" in str(info.value)
    assert "linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64/v8" in str(info.value)
    assert "--platform" in info.value.hint
    assert stored_blobs(paths) == before


async def test_basic_auth(auth_registry: RegistryServer, paths: Paths, short_tmp: Path) -> None:
    image = make_image([file_layer({"secret": b"s3cret"})])
    repo = await pushed(auth_registry, image, creds=CREDS)
    ref = f"{auth_registry.host}/{repo}:v1"
    store = ContentStore(paths)

    with pytest.raises(RegistryAuthError, match="requires a user name and password"):
        await pull(ref, store, auth_file=_auth_file(short_tmp / "empty.json", {}))
    with pytest.raises(RegistryAuthError, match="refused access"):
        await pull(ref, store, creds=f"{USER}:wrong")
    assert stored_blobs(paths) == set()

    assert (await pull(ref, store, creds=CREDS)).manifest_digest == image.digest


@pytest.mark.parametrize("form", ["auth", "username"])
async def test_basic_auth_from_config_json(
    auth_registry: RegistryServer,
    paths: Paths,
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    form: str,
) -> None:
    image = make_image([file_layer({"f": form.encode()})])
    repo = await pushed(auth_registry, image, creds=CREDS)
    entry = (
        {"auth": base64.b64encode(CREDS.encode()).decode()}
        if form == "auth"
        else {"username": USER, "password": PASSWORD}
    )
    config = {"auths": {f"http://{auth_registry.host}/v2/": entry, "other.example": {}}}
    path = _auth_file(short_tmp / "cfg" / "config.json", config)
    ref = f"{auth_registry.host}/{repo}:v1"

    assert (await pull(ref, ContentStore(paths), auth_file=str(path))).manifest_digest == (
        image.digest
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(path.parent))
    other = Paths.resolve(short_tmp / "other").ensure()
    assert (await pull(ref, ContentStore(other))).manifest_digest == image.digest


def _auth_file(path: Path, document: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


async def test_resume_after_dropped_connection(registry: RegistryServer, paths: Paths) -> None:
    image = make_image([busybox_layer()])
    repo = await pushed(registry, image)
    layer = image.layer_digests[0]
    cut_at = 300_000
    async with HttpTap(upstream=registry.host, cut={f"/blobs/{layer}": cut_at}) as tap:
        pulled = await pull(f"{tap.address}/{repo}:v1", ContentStore(paths))
    gets = tap.gets(f"/blobs/{layer}")
    assert len(gets) == 2
    assert "range" not in gets[0].headers
    assert gets[1].headers["range"] == f"bytes={cut_at}-"
    assert pulled.layers[0].digest == layer
    assert ContentStore(paths).verify(layer)


async def test_resume_when_server_ignores_range(registry: RegistryServer, paths: Paths) -> None:
    image = make_image([busybox_layer()])
    repo = await pushed(registry, image)
    layer = image.layer_digests[0]
    async with HttpTap(
        upstream=registry.host, cut={f"/blobs/{layer}": 200_000}, ignore_range=True
    ) as tap:
        await pull(f"{tap.address}/{repo}:v1", ContentStore(paths))
    gets = tap.gets(f"/blobs/{layer}")
    assert [g.headers.get("range") for g in gets] == [None, "bytes=200000-"]
    assert ContentStore(paths).verify(layer)


async def test_gives_up_after_repeated_drops(registry: RegistryServer, paths: Paths) -> None:
    image = make_image([busybox_layer()])
    repo = await pushed(registry, image)
    layer = image.layer_digests[0]
    tap = HttpTap(upstream=registry.host)
    async with tap:
        original = tap._serve

        async def always_cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            tap.cut[f"/blobs/{layer}"] = 1000
            await original(reader, writer)

        tap._serve = always_cut  # type: ignore[method-assign]
        with pytest.raises(ImagePullFailed, match="failed 4 times") as info:
            await pull(f"{tap.address}/{repo}:v1", ContentStore(paths))
    assert "resumes" in info.value.hint
    assert layer not in stored_blobs(paths)
    assert ContentStore(paths).ingest_offset(layer) == 4000


async def test_wrong_digest_is_rejected_and_nothing_stored(
    registry: RegistryServer, paths: Paths
) -> None:
    image = make_image([busybox_layer()])
    repo = await pushed(registry, image)
    layer = image.layer_digests[0]
    async with HttpTap(upstream=registry.host, corrupt={f"/blobs/{layer}"}) as tap:
        with pytest.raises(DigestMismatch, match=layer):
            await pull(f"{tap.address}/{repo}:v1", ContentStore(paths))
    assert layer not in stored_blobs(paths)
    assert ContentStore(paths).ingest_offset(layer) == 0


async def _endless(total: int = HOSTILE_BYTES) -> AsyncIterator[bytes]:
    chunk = b" " * 65536
    for _ in range(total // len(chunk)):
        yield chunk


async def test_oversized_manifest_refused_while_streaming(paths: Paths) -> None:
    async def respond(seen: Seen) -> tuple[int, dict[str, str], bytes | AsyncIterator[bytes]]:
        return 200, {"Content-Type": OCI_MANIFEST}, _endless()

    async with HttpTap(respond=respond) as tap:
        with pytest.raises(ImageTooLarge, match=f"{MAX_MANIFEST_SIZE}-byte limit"):
            await pull(f"{tap.address}/x/y:v1", ContentStore(paths))
    assert tap.streamed < HOSTILE_BYTES
    assert stored_blobs(paths) == set()


def _lying_image(config_size: int | None = None, layer_size: int | None = None) -> TestImage:
    """An image whose manifest announces other sizes than its blobs have."""
    honest = make_image([file_layer({"a": b"a"})])
    layer = honest.layers[0]
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": sha256_digest(honest.config),
                "size": config_size if config_size is not None else len(honest.config),
            },
            "layers": [
                {
                    "mediaType": OCI_LAYER_GZIP,
                    "digest": sha256_digest(layer),
                    "size": layer_size if layer_size is not None else len(layer),
                }
            ],
        }
    )
    return TestImage(manifest, honest.config, honest.layers, honest.platform)


@pytest.mark.parametrize("which", ["config", "layer"])
async def test_blob_longer_than_announced_refused_while_streaming(paths: Paths, which: str) -> None:
    image = _lying_image()
    digest = sha256_digest(image.config) if which == "config" else image.layer_digests[0]
    async with HttpTap(respond=serve_image(image, extra_blobs={digest: _endless()})) as tap:
        with pytest.raises(DigestMismatch, match="larger than its announced"):
            await pull(f"{tap.address}/x/y:latest", ContentStore(paths))
    assert tap.streamed < HOSTILE_BYTES
    assert digest not in stored_blobs(paths)


@pytest.mark.parametrize("which", ["config", "layer"])
async def test_blob_announced_over_limit_refused_before_download(paths: Paths, which: str) -> None:
    image = (
        _lying_image(config_size=2 * 1024 * 1024)
        if which == "config"
        else _lying_image(layer_size=MAX_LAYER_SIZE + 1)
    )
    async with HttpTap(respond=serve_image(image)) as tap:
        with pytest.raises(ImageTooLarge, match="limit"):
            await pull(f"{tap.address}/x/y:latest", ContentStore(paths))
    assert [r for r in tap.requests if "/blobs/" in r.path] == []
    assert stored_blobs(paths) == set()


async def test_concurrent_pulls_share_one_download(registry: RegistryServer, paths: Paths) -> None:
    shared = busybox_layer()
    images = [make_image([shared, file_layer({"n": str(i).encode()})]) for i in range(4)]
    repo = unique_repo()
    async with RegistryClient(registry.host) as client:
        for i, image in enumerate(images):
            await push_image(client, repo, f"v{i}", image)
    store = ContentStore(paths)
    async with HttpTap(upstream=registry.host) as tap:
        async with asyncio.TaskGroup() as tasks:
            running = [
                tasks.create_task(pull(f"{tap.address}/{repo}:v{i % 4}", store)) for i in range(8)
            ]
        pulled = [task.result() for task in running]
    assert {p.layers[0].digest for p in pulled} == {sha256_digest(shared)}
    assert len(tap.gets(f"/blobs/{sha256_digest(shared)}")) == 1
    for image in images:
        assert len(tap.gets(f"/blobs/{image.layer_digests[1]}")) == 1


async def test_concurrent_pulls_in_two_processes_share_one_download(
    registry: RegistryServer, paths: Paths
) -> None:
    image = make_image([busybox_layer()])
    repo = await pushed(registry, image)
    async with HttpTap(upstream=registry.host) as tap:
        script = (
            "import asyncio, sys\n"
            "from magikrun.image._pull import pull\n"
            "from magikrun.platform import Paths\n"
            "from magikrun.storage import ContentStore\n"
            "store = ContentStore(Paths.resolve(sys.argv[2]))\n"
            "asyncio.run(pull(sys.argv[1], store))\n"
        )
        ref = f"{tap.address}/{repo}:v1"
        procs = [
            await asyncio.create_subprocess_exec(sys.executable, "-c", script, ref, str(paths.data))
            for _ in range(2)
        ]
        assert [await p.wait() for p in procs] == [0, 0]
    assert len(tap.gets(f"/blobs/{image.layer_digests[0]}")) == 1


@requires_root
async def test_disk_full_is_clean(registry: RegistryServer, short_tmp: Path) -> None:
    image = make_image([file_layer({"big": os.urandom(3 * 1024 * 1024)})])
    repo = await pushed(registry, image)
    mount = short_tmp / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        paths = Paths.resolve(mount / "root").ensure()
        store = ContentStore(paths)
        with pytest.raises(StorageFull, match="disk full") as info:
            await pull(f"{registry.host}/{repo}:v1", store)
        assert "free disk space" in info.value.hint
        layer = image.layer_digests[0]
        assert layer not in stored_blobs(paths)
        assert store.ingest_offset(layer) == 0
        assert all(store.verify(d) for d in stored_blobs(paths))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


async def test_credentials_not_sent_on_redirect_to_another_host(
    auth_registry: RegistryServer, paths: Paths
) -> None:
    image = make_image([file_layer({"r": b"redirected"})])
    repo = await pushed(auth_registry, image, creds=CREDS)
    layer, blob = image.layer_digests[0], image.layers[0]

    async def storage(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        return 200, {}, blob

    async with HttpTap(host="127.0.0.2", respond=storage) as foreign:

        async def redirect(seen: Seen) -> tuple[int, dict[str, str], bytes] | None:
            if seen.path.endswith(f"/blobs/{layer}"):
                return 307, {"Location": f"http://{foreign.address}/storage/{layer}"}, b""
            return None

        async with HttpTap(upstream=auth_registry.host, respond=redirect) as tap:
            pulled = await pull(f"{tap.address}/{repo}:v1", ContentStore(paths), creds=CREDS)
    assert pulled.layers[0].digest == layer
    assert [r.path for r in foreign.requests] == [f"/storage/{layer}"]
    assert "authorization" not in foreign.requests[0].headers
    assert tap.gets(f"/blobs/{layer}")[-1].headers["authorization"].startswith("Basic ")


async def test_foreign_layer_urls(paths: Paths) -> None:
    honest = make_image([file_layer({"f": b"foreign"})])
    layer_blob = honest.layers[0]
    layer = sha256_digest(layer_blob)

    async def storage(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        return 200, {}, layer_blob

    async with HttpTap(host="127.0.0.2", respond=storage) as foreign:
        manifest = json.loads(honest.manifest)
        manifest["layers"][0]["urls"] = [f"http://{foreign.address}/layers/{layer}"]
        image = TestImage(canonical_json(manifest), honest.config, (), honest.platform)
        async with HttpTap(respond=serve_image(image)) as tap:
            ref = f"{tap.address}/x/y:latest"
            with pytest.raises(ImagePullFailed, match="foreign layer") as info:
                await pull(ref, ContentStore(paths), creds=CREDS)
            assert "allow foreign layers" in info.value.hint
            assert foreign.requests == []
            assert stored_blobs(paths) == set()

            pulled = await pull(ref, ContentStore(paths), creds=CREDS, allow_foreign_layers=True)
    assert pulled.layers[0].digest == layer
    assert len(foreign.requests) == 1
    assert "authorization" not in foreign.requests[0].headers
    assert [r for r in tap.requests if "/blobs/" + layer in r.path] == []


async def test_whole_pull_timeout(paths: Paths) -> None:
    never = asyncio.Event()

    async def stall(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        await never.wait()
        raise AssertionError("unreachable")

    async with HttpTap(respond=stall) as tap:
        with pytest.raises(MagikrunTimeout, match=r"longer than 0\.5 seconds"):
            await pull(f"{tap.address}/x/y:v1", ContentStore(paths), timeout=0.5)
        never.set()


async def test_bearer_token_registry(
    token_registry: RegistryServer, paths: Paths, short_tmp: Path
) -> None:
    token = token_registry.token
    no_auths = str(_auth_file(short_tmp / "none.json", {}))
    assert token is not None
    image = make_image([file_layer({"t": b"token"}), file_layer({"u": b"two"})])
    public, private = unique_repo("public"), unique_repo("private")
    for repo in (public, private):
        async with RegistryClient.for_reference(
            _ref(token_registry.host, repo), creds=CREDS
        ) as client:
            await push_image(client, repo, "v1", image)
    store = ContentStore(paths)

    before = len(token.requests)
    pulled = await pull(f"{token_registry.host}/{public}:v1", store, creds=None, auth_file=no_auths)
    assert pulled.manifest_digest == image.digest
    anonymous = token.requests[before:]
    assert len(anonymous) == 1, "one token per scope, reused for manifest and all blobs"
    assert anonymous[0][0] == ""
    assert anonymous[0][1]["scope"] == [f"repository:{public}:pull"]
    assert anonymous[0][1]["service"] == [token.service]

    other = ContentStore(Paths.resolve(paths.data / "other").ensure())
    with pytest.raises(RegistryAuthError, match="refused access"):
        await pull(f"{token_registry.host}/{private}:v1", other, auth_file=no_auths)
    with pytest.raises(RegistryAuthError, match="refused the credentials"):
        await pull(f"{token_registry.host}/{private}:v1", other, creds=f"{USER}:wrong")
    assert set(other.list()) == set()

    before = len(token.requests)
    pulled = await pull(f"{token_registry.host}/{private}:v1", other, creds=CREDS)
    assert pulled.manifest_digest == image.digest
    assert [r[0] for r in token.requests[before:]] == [
        f"Basic {base64.b64encode(CREDS.encode()).decode()}"
    ]


async def test_cancelled_pull_keeps_partial_blob_for_resume(paths: Paths) -> None:
    image = make_image([file_layer({"r": os.urandom(1024 * 1024)})])
    layer, blob = image.layer_digests[0], image.layers[0]
    half = len(blob) // 2

    async def stalls_halfway() -> AsyncIterator[bytes]:
        yield blob[:half]
        await asyncio.Event().wait()

    store = ContentStore(paths)
    async with HttpTap(respond=serve_image(image, extra_blobs={layer: stalls_halfway()})) as tap:
        with pytest.raises(MagikrunTimeout):
            await pull(f"{tap.address}/x/y:latest", store, timeout=2)
    assert layer not in stored_blobs(paths)
    assert store.ingest_offset(layer) == half

    async with HttpTap(respond=serve_image(image)) as tap:
        pulled = await pull(f"{tap.address}/x/y:latest", store)
    assert tap.gets(f"/blobs/{layer}")[0].headers["range"] == f"bytes={half}-"
    assert pulled.layers[0].digest == layer
    assert store.verify(layer)
