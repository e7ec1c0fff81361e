"""A distribution-spec registry client on ``httpx.AsyncClient``.

Every response body is read as a stream and counted, so a hostile registry cannot
make us buffer more than the limit of what we asked for. Blobs go straight into the
content store while being hashed, and an interrupted download resumes with ``Range``.
Credentials are attached only to requests for the registry's own origin: never to a
redirect target on another host, and never to a layer's ``urls``.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import cache
from types import TracebackType

import httpx

from .._threads import finish_in_thread
from ..errors import (
    DigestMismatch,
    ImageNotFound,
    ImagePullFailed,
    ImageTooLarge,
    InvalidArgument,
    InvalidDigest,
    MagikrunError,
    MagikrunTimeout,
    RegistryAuthError,
)
from ..platform import MAX_MANIFEST_SIZE
from ..storage import BlobWriter, ContentStore, sha256_digest, validate_digest
from ._auth import Authenticator, Credentials, load_credentials
from ._mediatypes import ACCEPT_MANIFESTS
from ._model import Descriptor, ProgressCallback, ProgressEvent
from ._reference import Reference, is_loopback_host

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_TIMEOUT",
    "FetchedManifest",
    "ProgressCallback",
    "ProgressEvent",
    "RegistryClient",
]


DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
"""Per-operation network timeouts; the whole pull is bounded by IMAGE_PULL_TIMEOUT."""
DEFAULT_MAX_CONNECTIONS = 8
"""Connections one client keeps open to a registry at once."""
BLOB_ATTEMPTS = 4
"""Tries per blob download: the first, then resumes after dropped connections."""
MAX_REDIRECTS = 5
_MAX_SMALL_BODY = 64 * 1024
"""Bytes of an error document or token response we read."""
_FLUSH_BYTES = 1 << 20
"""Bytes gathered before a write, so hashing and disk writes run in a worker thread
(they release the GIL) while the event loop keeps reading the network."""
_NO_ENCODING = {"Accept-Encoding": "identity"}
"""Digests cover the bytes as stored; a compressed transfer would also hide the real size."""


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    """A manifest or index as the registry sent it, with its verified digest."""

    data: bytes
    media_type: str
    """The ``Content-Type`` the registry gave (empty if none)."""
    digest: str
    """sha256 of ``data``; equal to the reference's digest when pulled by digest."""
    registry_digest: str | None
    """The registry's ``Docker-Content-Digest`` header, when it sent a valid one."""


@cache
def _tls_context() -> ssl.SSLContext:
    """The system's trust store, loaded once per process (loading it takes ~100 ms)."""
    return ssl.create_default_context()


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


async def _write(
    writer: BlobWriter, received: bytearray, total: int, progress: ProgressCallback | None
) -> None:
    """Hand ``received`` to the writer (in a worker thread) and empty it."""
    data = bytes(received)
    received.clear()
    await finish_in_thread(writer.write, data)
    if progress is not None:
        progress(ProgressEvent(writer.digest, total, writer.offset, False))


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def _body(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as sent. We ask for no transfer compression; one we did not ask for could
    be a decompression bomb, and would make digests and sizes meaningless."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ImagePullFailed(
            f"{response.url.host} sent a body with Content-Encoding {encoding[:50]!r} "
            "though magikrun asked for none",
            hint="the server or a proxy in between is misconfigured",
        )
    return response.aiter_bytes()


async def _read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    """Read the body, stopping as soon as it goes over ``limit`` bytes."""
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ImageTooLarge(f"{what} is {length} bytes, over the {limit}-byte limit")
    body = bytearray()
    async for chunk in _body(response):
        body += chunk
        if len(body) > limit:
            raise ImageTooLarge(f"{what} is over the {limit}-byte limit")
    return bytes(body)


def _registry_message(body: bytes) -> str:
    """The ``errors[].message`` of a distribution-spec error document, if there is one."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    errors = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(errors, list):
        return ""
    parts = [
        f"{e.get('code', '')}: {e.get('message', '')}" for e in errors[:5] if isinstance(e, dict)
    ]
    return "; ".join(parts)[:500]


def _content_range_start(value: str | None) -> int | None:
    """The first byte of ``Content-Range: bytes START-END/TOTAL``."""
    if value is None or not value.startswith("bytes "):
        return None
    start = value[6:].partition("-")[0]
    return int(start) if start.isdigit() else None


class RegistryClient:
    """One registry, one connection pool, one set of credentials: use one per pull.

    ```python
    ref = Reference.parse("127.0.0.1:5000/demo/busybox:1")
    async with RegistryClient.for_reference(ref) as client:
        manifest = await client.get_manifest(ref)
    ```

    Parameters:
    * ``registry`` — ``host[:port]`` as in ``Reference.host``.
    * ``credentials`` — Basic credentials, also used to obtain Bearer tokens.
    * ``plain_http`` — ``True`` forces HTTP, ``False`` forces HTTPS; ``None`` (default)
      uses HTTP only for loopback registries, as Docker does.
    * ``transport`` — an httpx transport (unit tests use ``httpx.MockTransport``).
    """

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None = None,
        plain_http: bool | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if plain_http is None:
            plain_http = is_loopback_host(registry)
        self.registry = registry
        self.base_url = httpx.URL(f"{'http' if plain_http else 'https'}://{registry}")
        self._auth = Authenticator(registry, credentials)
        self._client = httpx.AsyncClient(
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            http2=not plain_http,
            verify=_tls_context(),
            follow_redirects=False,
            transport=transport,
        )

    @classmethod
    def for_reference(
        cls,
        ref: Reference,
        *,
        creds: str | None = None,
        auth_file: str | None = None,
        plain_http: bool | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> RegistryClient:
        """A client for ``ref``'s registry with credentials from ``creds`` or an auth file."""
        credentials = load_credentials(ref.registry, creds=creds, auth_file=auth_file)
        return cls(ref.host, credentials=credentials, plain_http=plain_http, transport=transport)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    def _url(self, path: str) -> httpx.URL:
        return self.base_url.copy_with(path=path)

    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        """The one place where httpx's exceptions become magikrun errors."""
        try:
            yield
        except MagikrunError:
            raise
        except httpx.TimeoutException as exc:
            raise MagikrunTimeout(
                f"registry {self.registry} did not answer in time while {what}",
                hint="check the network, or retry later",
                registry=self.registry,
            ) from exc
        except httpx.HTTPError as exc:
            raise ImagePullFailed(
                f"cannot talk to registry {self.registry} while {what}: "
                f"{type(exc).__name__}: {exc}",
                hint=(
                    "check the address and the network; use --plain-http for a registry "
                    "that only speaks HTTP"
                ),
                registry=self.registry,
            ) from exc

    async def _fail(
        self, response: httpx.Response, what: str, not_found: Callable[[str], MagikrunError]
    ) -> None:
        """Raise the error that a non-success ``response`` means."""
        body = await _read_capped(response, _MAX_SMALL_BODY, "an error response")
        detail = _registry_message(body)
        status = response.status_code
        suffix = f" ({detail})" if detail else ""
        if status in (401, 403):
            raise RegistryAuthError(
                f"registry {self.registry} refused access (HTTP {status}) while {what}{suffix}",
                registry=self.registry,
            )
        if status == 404:
            raise not_found(f"{what}: the registry {self.registry} answered 404{suffix}")
        raise ImagePullFailed(
            f"registry {self.registry} answered HTTP {status} while {what}{suffix}",
            hint="retry later" if status == 429 or status >= 500 else None,
            registry=self.registry,
        )

    async def _token_fetch(self, url: httpx.URL, headers: dict[str, str]) -> tuple[int, bytes]:
        response = await self._client.send(
            self._client.build_request("GET", url, headers={**_NO_ENCODING, **headers}),
            stream=True,
        )
        try:
            return response.status_code, await _read_capped(
                response, _MAX_SMALL_BODY, f"the token response of {url.host}"
            )
        finally:
            await response.aclose()

    @asynccontextmanager
    async def _request(
        self,
        method: str,
        url: httpx.URL,
        *,
        scope: str | None,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Send a request and yield the open (streaming) response.

        Follows redirects itself so that ``Authorization`` goes only to the registry's
        origin, and answers one 401 challenge there. ``scope=None`` sends no credentials.
        """
        own = _origin(self.base_url)
        for attempt in range(2):
            target, hops = url, 0
            while True:
                sent = {**_NO_ENCODING, **(headers or {})}
                authorization = self._auth.header(scope) if scope is not None else None
                if authorization is not None and _origin(target) == own:
                    sent["Authorization"] = authorization
                request = self._client.build_request(method, target, headers=sent, content=content)
                response = await self._client.send(request, stream=True)
                location = response.headers.get("Location")
                if response.status_code not in (301, 302, 303, 307, 308) or location is None:
                    break
                await response.aclose()
                hops += 1
                target = target.join(location)
                if hops > MAX_REDIRECTS or target.scheme not in ("http", "https"):
                    raise ImagePullFailed(
                        f"registry {self.registry} redirected {url.path} too often or to "
                        f"{target.scheme!r}",
                        registry=self.registry,
                    )
            challenged = response.status_code == 401 and _origin(target) == own
            if attempt == 0 and challenged and scope is not None:
                challenge = response.headers.get("WWW-Authenticate")
                await response.aclose()
                await self._auth.answer(self._token_fetch, challenge, scope)
                continue
            try:
                yield response
            finally:
                await response.aclose()
            return

    async def get_manifest(self, ref: Reference) -> FetchedManifest:
        """Fetch the manifest or index ``ref`` names, refusing one over MAX_MANIFEST_SIZE.

        Raises DigestMismatch when pulled by digest and the bytes do not match.
        """
        what = f"fetching the manifest of {ref}"
        url = self._url(f"/v2/{ref.repository}/manifests/{ref.reference}")
        with self._mapped(what):
            headers = {"Accept": ACCEPT_MANIFESTS}
            async with self._request(
                "GET", url, scope=pull_scope(ref.repository), headers=headers
            ) as response:
                if response.status_code != 200:
                    await self._fail(response, what, _image_not_found(ref))
                data = await _read_capped(response, MAX_MANIFEST_SIZE, f"the manifest of {ref}")
                media_type = response.headers.get("Content-Type", "").partition(";")[0].strip()
                announced = response.headers.get("Docker-Content-Digest")
        digest = sha256_digest(data)
        if ref.digest is not None and digest != ref.digest:
            raise DigestMismatch(
                f"the registry sent a manifest for {ref} that hashes to {digest}",
                digest=ref.digest,
                actual=digest,
            )
        registry_digest: str | None = None
        if announced is not None:
            try:
                registry_digest = validate_digest(announced)
            except InvalidDigest:
                registry_digest = None
            if registry_digest is not None and registry_digest != digest:
                raise DigestMismatch(
                    f"the registry announced {registry_digest} for {ref} but sent bytes "
                    f"hashing to {digest}",
                    digest=registry_digest,
                    actual=digest,
                )
        return FetchedManifest(data, media_type, digest, registry_digest)

    async def fetch_blob(
        self,
        repository: str,
        desc: Descriptor,
        store: ContentStore,
        *,
        max_size: int,
        progress: ProgressCallback | None = None,
    ) -> bool:
        """Download ``desc`` from ``repository`` into ``store`` unless it is there already.

        Returns whether this call downloaded it. Concurrent calls for one digest share
        one download (the store's ingest lock).
        """
        url = self._url(f"/v2/{repository}/blobs/{desc.digest}")
        return await self._download(url, pull_scope(repository), desc, store, max_size, progress)

    async def fetch_foreign(
        self,
        desc: Descriptor,
        store: ContentStore,
        *,
        max_size: int,
        progress: ProgressCallback | None = None,
    ) -> bool:
        """Download ``desc`` from its ``urls`` (foreign layers), without any credentials."""
        if not desc.urls:
            raise InvalidArgument(f"descriptor {desc.digest} has no urls")
        last: MagikrunError | None = None
        for text in desc.urls:
            url = httpx.URL(text)
            if url.scheme not in ("http", "https") or not url.host:
                last = ImagePullFailed(f"layer {desc.digest} names an unusable url {text[:200]!r}")
                continue
            try:
                return await self._download(url, None, desc, store, max_size, progress)
            except (ImagePullFailed, MagikrunTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def _download(
        self,
        url: httpx.URL,
        scope: str | None,
        desc: Descriptor,
        store: ContentStore,
        max_size: int,
        progress: ProgressCallback | None,
    ) -> bool:
        what = f"downloading blob {desc.digest}"
        async with store.ingest(desc.digest, size=desc.size, max_size=max_size) as writer:
            if writer is None:
                if progress is not None:
                    progress(ProgressEvent(desc.digest, desc.size, desc.size, True))
                return False
            failures = 0
            with self._mapped(what):
                while writer.offset < desc.size:
                    try:
                        await self._attempt(url, scope, desc, writer, progress, what)
                    except httpx.TransportError as exc:
                        failures += 1
                        if failures >= BLOB_ATTEMPTS:
                            raise ImagePullFailed(
                                f"{what}: the connection failed {failures} times, the last "
                                f"after {writer.offset} of {desc.size} bytes: {exc}",
                                hint="check the network and pull again; the download resumes",
                                registry=self.registry,
                                digest=desc.digest,
                            ) from exc
            await finish_in_thread(writer.commit)
        if progress is not None:
            progress(ProgressEvent(desc.digest, desc.size, desc.size, True))
        return True

    async def _attempt(
        self,
        url: httpx.URL,
        scope: str | None,
        desc: Descriptor,
        writer: BlobWriter,
        progress: ProgressCallback | None,
        what: str,
    ) -> None:
        """One GET of the blob from ``writer.offset`` on. What arrives is kept even when
        the connection drops, so that the next attempt resumes after it."""
        headers = {"Range": f"bytes={writer.offset}-"} if writer.offset else {}
        async with self._request("GET", url, scope=scope, headers=headers) as response:
            if response.status_code == 206:
                content_range = response.headers.get("Content-Range")
                if _content_range_start(content_range) != writer.offset:
                    raise ImagePullFailed(
                        f"registry {self.registry} answered a resume of {desc.digest} at byte "
                        f"{writer.offset} with Content-Range {content_range!r}",
                        registry=self.registry,
                    )
            elif response.status_code == 200:
                writer.reset()  # the server ignored Range: start over
            elif response.status_code == 416 and writer.offset:
                writer.reset()
                return
            else:
                await self._fail(response, what, _blob_not_found(self.registry))
            received = bytearray()
            try:
                async for chunk in _body(response):
                    received += chunk
                    if len(received) >= _FLUSH_BYTES or writer.offset + len(received) > desc.size:
                        await _write(writer, received, desc.size, progress)
            finally:
                if received:
                    await _write(writer, received, desc.size, progress)
        if writer.offset < desc.size:
            raise httpx.RemoteProtocolError("the body ended before the blob's announced size")

    async def push_blob(self, repository: str, data: bytes) -> str:
        """Upload ``data`` (monolithic POST then PUT) unless the registry has it; return its
        digest."""
        digest = sha256_digest(data)
        scope = push_scope(repository)
        what = f"pushing blob {digest} to {repository}"
        with self._mapped(what):
            blob_url = self._url(f"/v2/{repository}/blobs/{digest}")
            async with self._request("HEAD", blob_url, scope=scope) as response:
                if response.status_code == 200:
                    return digest
            uploads = self._url(f"/v2/{repository}/blobs/uploads/")
            async with self._request("POST", uploads, scope=scope, content=b"") as response:
                if response.status_code != 202 or "Location" not in response.headers:
                    await self._fail(response, what, _push_failed(self.registry))
                location = response.headers["Location"]
            # Merge, not replace: the upload URL's query carries the registry's _state.
            target = uploads.join(location).copy_merge_params({"digest": digest})
            headers = {"Content-Type": "application/octet-stream"}
            async with self._request(
                "PUT", target, scope=scope, headers=headers, content=data
            ) as response:
                if response.status_code != 201:
                    await self._fail(response, what, _push_failed(self.registry))
        return digest

    async def push_manifest(
        self, repository: str, reference: str, data: bytes, media_type: str
    ) -> str:
        """Upload a manifest or index under ``reference`` (a tag or its digest); return its
        digest."""
        digest = sha256_digest(data)
        what = f"pushing manifest {digest} to {repository}:{reference}"
        url = self._url(f"/v2/{repository}/manifests/{reference}")
        with self._mapped(what):
            async with self._request(
                "PUT",
                url,
                scope=push_scope(repository),
                headers={"Content-Type": media_type},
                content=data,
            ) as response:
                if response.status_code != 201:
                    await self._fail(response, what, _push_failed(self.registry))
        return digest


def _image_not_found(ref: Reference) -> Callable[[str], MagikrunError]:
    def make(message: str) -> MagikrunError:
        return ImageNotFound(
            f"image {ref} not found ({message})",
            hint="check the name and tag; list the registry's tags with skopeo list-tags",
            reference=str(ref),
        )

    return make


def _blob_not_found(registry: str) -> Callable[[str], MagikrunError]:
    def make(message: str) -> MagikrunError:
        return ImagePullFailed(
            f"{message}: a blob the manifest names is missing",
            hint="the image in the registry is incomplete; push it again",
            registry=registry,
        )

    return make


def _push_failed(registry: str) -> Callable[[str], MagikrunError]:
    def make(message: str) -> MagikrunError:
        return ImagePullFailed(message, hint="check the repository name", registry=registry)

    return make
