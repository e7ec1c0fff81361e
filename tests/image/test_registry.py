"""Registry client and auth units: challenges, tokens, credentials files, HTTP rules.

The Bearer flow runs on ``httpx.MockTransport`` (docker-registry's token auth needs a
separate signing token service); everything else a user sees is covered against the
real docker-registry in test_pull.py.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from magikrun.errors import (
    DigestMismatch,
    ImagePullFailed,
    InvalidArgument,
    MagikrunTimeout,
    RegistryAuthError,
    UnsupportedMediaType,
)
from magikrun.image._auth import Challenge, Credentials, load_credentials, parse_challenges
from magikrun.image._mediatypes import OCI_MANIFEST
from magikrun.image._pull import pull
from magikrun.image._reference import Reference
from magikrun.image._registry import RegistryClient
from magikrun.platform import Paths
from magikrun.storage import ContentStore, sha256_digest
from tests._registry import file_layer, make_image

REALM = "https://auth.example/token"
REGISTRY = "registry.example"


def test_parse_challenges() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push", Basic realm="x\\"y"'
    )
    assert parse_challenges(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.example/token",
                "service": "registry.example",
                "scope": "repository:a/b:pull,push",
            },
        ),
        Challenge("basic", {"realm": 'x"y'}),
    ]
    assert parse_challenges("Basic") == [Challenge("basic", {})]
    assert parse_challenges("") == []
    with pytest.raises(RegistryAuthError, match="unterminated"):
        parse_challenges('Bearer realm="open')


def test_credentials_parse_and_repr() -> None:
    creds = Credentials.parse("user:pa:ss")
    assert (creds.username, creds.password) == ("user", "pa:ss")
    assert "pa:ss" not in repr(creds)
    assert creds.basic() == "Basic " + base64.b64encode(b"user:pa:ss").decode()
    for bad in ("nocolon", ":pw"):
        with pytest.raises(InvalidArgument, match="USER:PASSWORD"):
            Credentials.parse(bad)


def test_load_credentials(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = short_tmp / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:h").decode()},
                    "http://127.0.0.1:5000": {"username": "u", "password": "p"},
                    "bad.example": {"auth": "%%%"},
                }
            }
        )
    )
    assert load_credentials("docker.io", auth_file=cfg) == Credentials("hub", "h")
    assert load_credentials("127.0.0.1:5000", auth_file=cfg) == Credentials("u", "p")
    assert load_credentials("other.example", auth_file=cfg) is None
    assert load_credentials("other.example", creds="a:b", auth_file=cfg) == Credentials("a", "b")
    with pytest.raises(RegistryAuthError, match=r"malformed credentials for 'bad\.example'"):
        load_credentials("bad.example", auth_file=cfg)

    monkeypatch.setenv("DOCKER_CONFIG", str(short_tmp))
    assert load_credentials("127.0.0.1:5000") == Credentials("u", "p")
    monkeypatch.setenv("DOCKER_CONFIG", str(short_tmp / "nowhere"))
    assert load_credentials("127.0.0.1:5000") is None
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_credentials("x", auth_file=short_tmp / "missing.json")
    (short_tmp / "broken.json").write_text("{not json")
    with pytest.raises(RegistryAuthError, match="not valid JSON"):
        load_credentials("x", auth_file=short_tmp / "broken.json")


def test_scheme_rules() -> None:
    assert RegistryClient("127.0.0.1:5000").base_url.scheme == "http"
    assert RegistryClient("localhost").base_url.scheme == "http"
    assert RegistryClient("registry.example").base_url.scheme == "https"
    assert RegistryClient("registry.example", plain_http=True).base_url.scheme == "http"
    assert RegistryClient("127.0.0.1:5000", plain_http=False).base_url.scheme == "https"


class TokenRegistry:
    """A MockTransport handler playing a registry with a Bearer token service."""

    def __init__(self, users: dict[str, str] | None, manifest: bytes) -> None:
        self.users = users
        self.manifest = manifest
        self.token_requests: list[httpx.Request] = []
        self.registry_requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            self.token_requests.append(request)
            if self.users is not None:
                expected = {Credentials(u, p).basic() for u, p in self.users.items()}
                if request.headers.get("Authorization") not in expected:
                    return httpx.Response(401)
            scope = request.url.params["scope"]
            return httpx.Response(200, json={"token": f"T:{scope}", "expires_in": 300})
        self.registry_requests.append(request)
        scope = "repository:app/x:pull"
        if request.headers.get("Authorization") != f"Bearer T:{scope}":
            challenge = f'Bearer realm="{REALM}",service="{REGISTRY}",scope="{scope}"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return httpx.Response(200, headers={"Content-Type": OCI_MANIFEST}, content=self.manifest)


async def test_bearer_token_flow_and_cache() -> None:
    manifest = make_image([file_layer({"a": b"a"})]).manifest
    server = TokenRegistry({"alice": "pw"}, manifest)
    ref = Reference.parse(f"{REGISTRY}/app/x:v1")
    async with RegistryClient.for_reference(
        ref, creds="alice:pw", transport=httpx.MockTransport(server)
    ) as client:
        first = await client.get_manifest(ref)
        second = await client.get_manifest(ref)
    assert first.data == second.data == manifest
    assert first.digest == sha256_digest(manifest)
    assert len(server.token_requests) == 1
    token_request = server.token_requests[0]
    assert token_request.url.params["service"] == REGISTRY
    assert token_request.url.params["scope"] == "repository:app/x:pull"
    assert token_request.headers["Authorization"] == Credentials("alice", "pw").basic()
    assert [r.url.scheme for r in server.registry_requests] == ["https"] * 3


async def test_bearer_anonymous_token() -> None:
    manifest = make_image([file_layer({"b": b"b"})]).manifest
    server = TokenRegistry(None, manifest)
    ref = Reference.parse(f"{REGISTRY}/app/x:v1")
    async with RegistryClient(REGISTRY, transport=httpx.MockTransport(server)) as client:
        assert (await client.get_manifest(ref)).data == manifest
    assert "Authorization" not in server.token_requests[0].headers


async def test_bearer_wrong_credentials(paths: Paths) -> None:
    server = TokenRegistry({"alice": "pw"}, b"{}")
    with pytest.raises(RegistryAuthError, match="refused the credentials") as info:
        await pull(
            f"{REGISTRY}/app/x:v1",
            ContentStore(paths),
            creds="alice:wrong",
            transport=httpx.MockTransport(server),
        )
    assert "--creds" in info.value.hint
    assert list(ContentStore(paths).list()) == []


async def test_credentials_not_sent_to_plain_http_realm_elsewhere() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.host == REGISTRY, "nothing may reach the plain-HTTP realm"
        challenge = 'Bearer realm="http://evil.example/token",service="s"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    ref = Reference.parse(f"{REGISTRY}/app/x:v1")
    async with RegistryClient.for_reference(
        ref, creds="alice:pw", transport=httpx.MockTransport(handler)
    ) as client:
        with pytest.raises(RegistryAuthError, match=r"plain HTTP to evil\.example"):
            await client.get_manifest(ref)


async def test_transport_errors_are_mapped() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    ref = Reference.parse(f"{REGISTRY}/app/x:v1")
    async with RegistryClient(REGISTRY, transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(ImagePullFailed, match="cannot talk to registry") as info:
            await client.get_manifest(ref)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    async with RegistryClient(REGISTRY, transport=httpx.MockTransport(slow)) as client:
        with pytest.raises(MagikrunTimeout, match="did not answer in time"):
            await client.get_manifest(ref)


async def test_manifest_digest_checked_when_pinned() -> None:
    manifest = make_image([file_layer({"c": b"c"})]).manifest
    other = "sha256:" + "0" * 64

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": other},
            content=manifest,
        )

    async with RegistryClient(REGISTRY, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(DigestMismatch, match="hashes to"):
            await client.get_manifest(Reference.parse(f"{REGISTRY}/app/x@{other}"))
        with pytest.raises(DigestMismatch, match="announced"):
            await client.get_manifest(Reference.parse(f"{REGISTRY}/app/x:v1"))


async def test_compressed_transfer_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Accept-Encoding"] == "identity"
        return httpx.Response(
            200, headers={"Content-Type": OCI_MANIFEST, "Content-Encoding": "gzip"}, content=b"x"
        )

    async with RegistryClient(REGISTRY, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ImagePullFailed, match="Content-Encoding 'gzip'"):
            await client.get_manifest(Reference.parse(f"{REGISTRY}/app/x:v1"))


async def test_redirect_loop_refused() -> None:
    hops: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hops.append(str(request.url))
        return httpx.Response(302, headers={"Location": f"/v2/app/x/manifests/v{len(hops)}"})

    async with RegistryClient(REGISTRY, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ImagePullFailed, match="redirected"):
            await client.get_manifest(Reference.parse(f"{REGISTRY}/app/x:v1"))
    assert len(hops) == 6


def _serving(
    image_blobs: dict[str, bytes], manifest: bytes, content_type: str
) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        digest = request.url.path.rpartition("/")[2]
        if "/manifests/" in request.url.path:
            return httpx.Response(200, headers={"Content-Type": content_type}, content=manifest)
        return httpx.Response(200, content=image_blobs[digest])

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("content_type", ["application/octet-stream", ""])
async def test_media_type_from_document_without_content_type(
    paths: Paths, content_type: str
) -> None:
    image = make_image([file_layer({"m": b"m"})])
    blobs = {sha256_digest(b): b for b in (image.config, *image.layers)}
    pulled = await pull(
        f"{REGISTRY}/app/x:v1",
        ContentStore(paths),
        transport=_serving(blobs, image.manifest, content_type),
    )
    assert pulled.manifest_digest == image.digest

    odd = json.dumps({"schemaVersion": 2, "mediaType": "text/plain"}).encode()
    with pytest.raises(UnsupportedMediaType, match="'text/plain'"):
        await pull(
            f"{REGISTRY}/app/x:v2",
            ContentStore(paths),
            transport=_serving(blobs, odd, content_type),
        )
