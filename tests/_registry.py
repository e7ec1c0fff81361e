"""Real registries and loopback HTTP taps for tests.

``RegistryServer`` runs Debian's ``docker-registry`` on a free 127.0.0.1 port with
its own storage (optionally behind htpasswd Basic auth). ``HttpTap`` is a tiny
HTTP/1.1 server on loopback that forwards to a registry (recording every request,
and on demand cutting a response short, ignoring ``Range`` or corrupting a body)
or answers itself. Test images are built in memory and pushed with magikrun's own
registry client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from magikrun.image._layout import LayerEntry, build_layer, canonical_json
from magikrun.image._mediatypes import OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST
from magikrun.image._model import PlatformSpec
from magikrun.image._registry import RegistryClient
from magikrun.storage import sha256_digest

REGISTRY_BINARY = "/usr/bin/docker-registry"
AMD64 = PlatformSpec("linux", "amd64")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RegistryServer:
    """A docker-registry process on 127.0.0.1 with a private storage directory."""

    def __init__(
        self, *, users: dict[str, str] | None = None, token: TokenServer | None = None
    ) -> None:
        self.users = dict(users or {})
        self.token = token
        self.dir = Path(tempfile.mkdtemp(prefix="mk-reg-", dir="/tmp"))
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RegistryServer:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.dir / "data")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": "", "secret": "magikrun-test-secret"},
        }
        if self.users:
            lines = [
                subprocess.run(
                    ["htpasswd", "-Bbn", user, password],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                for user, password in self.users.items()
            ]
            (self.dir / "htpasswd").write_text("\n".join(lines) + "\n")
            config["auth"] = {
                "htpasswd": {"realm": "magikrun-test", "path": str(self.dir / "htpasswd")}
            }
        if self.token is not None:
            config["auth"] = {
                "token": {
                    "realm": self.token.realm,
                    "service": self.token.service,
                    "issuer": self.token.issuer,
                    "rootcertbundle": str(self.token.cert),
                }
            }
        for _ in range(5):
            self.port = free_port()
            config["http"]["addr"] = self.host
            (self.dir / "config.yml").write_text(json.dumps(config))  # JSON is valid YAML
            with open(self.dir / "registry.log", "wb") as log:
                self._proc = subprocess.Popen(
                    [REGISTRY_BINARY, "serve", str(self.dir / "config.yml")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    close_fds=True,
                )
            if self._wait_ready():
                return self
            self._terminate()
        raise RuntimeError(
            f"docker-registry did not start: {(self.dir / 'registry.log').read_text()}"
        )

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                status = httpx.get(f"http://{self.host}/v2/", timeout=2).status_code
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            return status in (200, 401)
        return False

    def _terminate(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self.dir, ignore_errors=True)


class TokenServer:
    """A token service as the distribution spec describes it, for a real Bearer flow.

    Checks Basic credentials against ``users`` (anonymous callers may only pull
    repositories under ``public/``), and answers with an RS256 JWT signed by a key
    made here, whose certificate the registry is configured to trust.
    """

    service = "magikrun-test-registry"
    issuer = "magikrun-test-issuer"

    def __init__(self, users: dict[str, str]) -> None:
        self.users = dict(users)
        self.dir = Path(tempfile.mkdtemp(prefix="mk-tok-", dir="/tmp"))
        self.key, self.cert = self.dir / "key.pem", self.dir / "cert.pem"
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        """(Authorization header, query) of every token request."""
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=magikrun-test-token", "-keyout", str(self.key),
             "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        public_pem = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-pubkey", "-noout"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        public_der = subprocess.run(
            ["openssl", "pkey", "-pubin", "-outform", "DER"],
            input=public_pem, check=True, capture_output=True,
        ).stdout  # fmt: skip
        # libtrust's key id: sha256 of the DER public key, 240 bits, base32 in groups of 4.
        b32 = base64.b32encode(hashlib.sha256(public_der).digest()[:30]).decode()
        self.kid = ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))
        self._server: ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def start(self) -> TokenServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = outer._answer(self.path, self.headers.get("Authorization", ""))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _answer(self, path: str, authorization: str) -> tuple[int, bytes]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        self.requests.append((authorization, query))
        subject = ""
        if authorization:
            scheme, _, encoded = authorization.partition(" ")
            user, _, password = base64.b64decode(encoded).decode().partition(":")
            if scheme != "Basic" or self.users.get(user) != password:
                return 401, b'{"details":"bad credentials"}'
            subject = user
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and (subject or name.startswith("public/")):
                granted = actions.split(",") if subject else ["pull"]
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = f"{_b64url(canonical_json(header))}.{_b64url(canonical_json(claims))}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        token = f"{signing_input}.{_b64url(signature)}"
        return 200, json.dumps({"token": token, "expires_in": 300}).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- a loopback HTTP tap -------------------------------------------------------


@dataclass
class Seen:
    """One request an HttpTap received."""

    method: str
    path: str
    headers: dict[str, str]


Body = bytes | AsyncIterator[bytes]
"""A canned body: bytes (sent with Content-Length) or chunks (delimited by closing)."""
Responder = Callable[[Seen], Awaitable[tuple[int, dict[str, str], Body] | None]]


@dataclass
class HttpTap:
    """An HTTP/1.1 server on ``host``: one request per connection, ``Connection: close``.

    Forwards to ``upstream`` (``host:port``) unless ``respond`` answers the request.
    ``cut`` maps a path suffix to a byte count: the first response for such a path is
    cut after that many body bytes (the connection is dropped). Paths in ``corrupt``
    get their first body byte flipped. ``ignore_range`` strips ``Range`` before
    forwarding, so the upstream answers 200 with the whole body.
    """

    upstream: str | None = None
    host: str = "127.0.0.1"
    respond: Responder | None = None
    cut: dict[str, int] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    ignore_range: bool = False
    requests: list[Seen] = field(default_factory=list)
    streamed: int = 0
    """Body bytes of canned chunked answers that the client accepted."""
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def __aenter__(self) -> HttpTap:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        await asyncio.sleep(0)  # connections accepted just before close reach _accept
        while self._handlers:  # each handler closes its socket before it leaves the set
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    def gets(self, suffix: str) -> list[Seen]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(suffix)]

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Track the connection's handler from the moment it exists, so __aexit__ can end
        it (a handler that registered itself once running could be missed)."""
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        seen = Seen(method, target.partition("?")[0], headers)
        self.requests.append(seen)
        if self.respond is not None:
            answer = await self.respond(seen)
            if answer is not None:
                status, extra, payload = answer
                out = [f"HTTP/1.1 {status} X", "Connection: close"]
                out += [f"{k}: {v}" for k, v in extra.items()]
                if isinstance(payload, bytes):
                    out.append(f"Content-Length: {len(payload)}")
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode())
                if isinstance(payload, bytes):
                    writer.write(payload)
                    await writer.drain()
                    return
                async for chunk in payload:
                    writer.write(chunk)
                    await writer.drain()
                    self.streamed += len(chunk)
                return
        assert self.upstream is not None, f"no upstream for {method} {target}"
        up_host, _, up_port = self.upstream.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(up_host, int(up_port))
        try:
            forward = [f"{method} {target} HTTP/1.1"]
            for line in header_lines:
                name = line.partition(":")[0].strip().lower()
                if (
                    line
                    and name not in ("connection", "keep-alive")
                    and not (self.ignore_range and name == "range")
                ):
                    forward.append(line)
            forward.append("Connection: close")
            up_writer.write(("\r\n".join(forward) + "\r\n\r\n").encode("latin-1") + body)
            await up_writer.drain()
            response_head = await up_reader.readuntil(b"\r\n\r\n")
            writer.write(response_head)
            cut = next((n for s, n in self.cut.items() if seen.path.endswith(s)), None)
            if cut is not None:
                self.cut = {s: n for s, n in self.cut.items() if not seen.path.endswith(s)}
            flip = any(seen.path.endswith(s) for s in self.corrupt) and method == "GET"
            sent = 0
            while chunk := await up_reader.read(1 << 16):
                if flip:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    flip = False
                if cut is not None and sent + len(chunk) >= cut:
                    writer.write(chunk[: cut - sent])
                    await writer.drain()
                    return  # closing now ends the body short of its Content-Length
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
        finally:
            up_writer.close()
            with contextlib.suppress(ConnectionError):
                await up_writer.wait_closed()


# -- test images -------------------------------------------------------------


@dataclass(frozen=True)
class TestImage:
    """An image built in memory: its blobs and its manifest."""

    __test__ = False

    manifest: bytes
    config: bytes
    layers: tuple[bytes, ...]
    platform: PlatformSpec

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def layer_digests(self) -> list[str]:
        return [sha256_digest(layer) for layer in self.layers]

    @property
    def descriptor(self) -> dict[str, Any]:
        platform: dict[str, str] = {
            "os": self.platform.os,
            "architecture": self.platform.architecture,
        }
        if self.platform.variant:
            platform["variant"] = self.platform.variant
        return {
            "mediaType": OCI_MANIFEST,
            "digest": self.digest,
            "size": len(self.manifest),
            "platform": platform,
        }


@cache
def busybox_layer() -> bytes:
    """A layer holding /bin/busybox and an /bin/sh link (built once per process)."""
    data = Path("/bin/busybox").read_bytes()
    blob, _ = build_layer(
        [
            LayerEntry("bin", kind="dir", mode=0o755),
            LayerEntry("bin/busybox", data=data, mode=0o755),
            LayerEntry("bin/sh", kind="symlink", target="busybox"),
        ],
        gzip_level=1,
    )
    return blob


def file_layer(files: dict[str, bytes]) -> bytes:
    blob, _ = build_layer([LayerEntry(path, data=data) for path, data in files.items()])
    return blob


def make_image(
    layers: list[bytes],
    *,
    platform: PlatformSpec = AMD64,
    cmd: tuple[str, ...] = ("/bin/sh",),
    config_extra: dict[str, Any] | None = None,
    layer_media_type: str = OCI_LAYER_GZIP,
) -> TestImage:
    """An OCI image of gzip ``layers`` (diff_ids computed from them)."""
    diff_ids = [sha256_digest(gzip.decompress(layer)) for layer in layers]
    config_doc: dict[str, Any] = {
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        **(config_extra or {}),
    }
    if platform.variant:
        config_doc["variant"] = platform.variant
    config = canonical_json(config_doc)
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config),
                       "size": len(config)},
            "layers": [
                {"mediaType": layer_media_type, "digest": sha256_digest(b), "size": len(b)}
                for b in layers
            ],
        }
    )  # fmt: skip
    return TestImage(manifest, config, tuple(layers), platform)


async def push_image(client: RegistryClient, repository: str, tag: str, image: TestImage) -> str:
    """Push blobs then the manifest; returns the manifest digest."""
    for blob in (image.config, *image.layers):
        await client.push_blob(repository, blob)
    return await client.push_manifest(repository, tag, image.manifest, OCI_MANIFEST)


async def push_index(
    client: RegistryClient, repository: str, tag: str, images: list[TestImage]
) -> str:
    """Push each image by digest and an index listing them under ``tag``."""
    for image in images:
        await push_image(client, repository, image.digest, image)
    index = canonical_json(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [i.descriptor for i in images]}
    )
    return await client.push_manifest(repository, tag, index, OCI_INDEX)


def unique_repo(prefix: str = "test") -> str:
    """A repository name no other test (or xdist worker) uses."""
    return f"{prefix}/r{os.getpid()}-{time.monotonic_ns()}"


def serve_image(
    image: TestImage, *, tag: str = "latest", extra_blobs: dict[str, Body] | None = None
) -> Responder:
    """A Responder that plays a registry holding ``image`` (and ``extra_blobs``, which
    may be hostile streams), for tests of what a real registry would never send."""
    blobs: dict[str, Body] = {sha256_digest(b): b for b in (image.config, *image.layers)}
    blobs.update(extra_blobs or {})

    async def respond(seen: Seen) -> tuple[int, dict[str, str], Body] | None:
        if seen.path == "/v2/":
            return 200, {}, b"{}"
        if seen.path.endswith((f"/manifests/{tag}", f"/manifests/{image.digest}")):
            return 200, {"Content-Type": OCI_MANIFEST}, image.manifest
        digest = seen.path.rpartition("/blobs/")[2]
        if digest in blobs:
            return 200, {}, blobs[digest]
        return 404, {}, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}'

    return respond
