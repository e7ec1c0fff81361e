"""Registry authentication: anonymous, Basic, and Bearer tokens from a challenge.

Credentials come from ``--creds USER:PASSWORD`` or a docker-style ``config.json``.
They are only ever attached to requests for the registry they belong to and to the
token realm that registry names; the registry client decides which requests those are.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..errors import InvalidArgument, RegistryAuthError
from ._reference import DEFAULT_REGISTRY, is_loopback_host

__all__ = ["Authenticator", "Challenge", "Credentials", "load_credentials", "parse_challenges"]

_DOCKER_HUB_KEYS = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
_TOKEN_LEEWAY = 10.0
"""Seconds before a token's stated expiry at which we stop using it."""
_DEFAULT_TOKEN_LIFETIME = 60.0
"""Seconds a token lives when the token server does not say (the distribution spec's default)."""

TokenFetch = Callable[[httpx.URL, dict[str, str]], Awaitable[tuple[int, bytes]]]
"""GET a URL with headers, return status and body: the registry client's capped request."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password (or token) for one registry."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """Parse ``USER:PASSWORD`` (the password may contain ':')."""
        username, sep, password = text.partition(":")
        if not sep or not username:
            raise InvalidArgument(
                "credentials must be USER:PASSWORD", hint="pass --creds USER:PASSWORD"
            )
        return cls(username, password)

    def basic(self) -> str:
        """The value of a Basic ``Authorization`` header."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a scheme (lowercased) and its parameters."""

    scheme: str
    params: dict[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value (RFC 7235) into its challenges.

    ```python
    parse_challenges('Bearer realm="https://auth/token",service="reg"')
    # [Challenge(scheme='bearer', params={'realm': 'https://auth/token', 'service': 'reg'})]
    ```
    """
    challenges: list[Challenge] = []
    pos, n = 0, len(header)

    def skip_space(i: int) -> int:
        while i < n and header[i] in " \t,":
            i += 1
        return i

    def token(i: int) -> tuple[str, int]:
        start = i
        while i < n and header[i] not in ' \t,="':
            i += 1
        return header[start:i], i

    pos = skip_space(pos)
    while pos < n:
        scheme, pos = token(pos)
        if not scheme:
            raise RegistryAuthError(f"malformed WWW-Authenticate header {header[:200]!r}")
        params: dict[str, str] = {}
        while True:
            mark = pos = skip_space(pos)
            name, pos = token(pos)
            if not name or pos >= n or header[pos] != "=":
                pos = mark  # not a parameter: the next challenge's scheme (or the end)
                break
            pos += 1
            if pos < n and header[pos] == '"':
                value, pos = _quoted(header, pos + 1)
            else:
                value, pos = token(pos)
            params[name.lower()] = value
        challenges.append(Challenge(scheme.lower(), params))
        pos = skip_space(pos)
    return challenges


def _quoted(text: str, pos: int) -> tuple[str, int]:
    out: list[str] = []
    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
        elif char == '"':
            return "".join(out), pos + 1
        else:
            out.append(char)
            pos += 1
    raise RegistryAuthError(f"unterminated quoted string in WWW-Authenticate {text[:200]!r}")


def _config_key(key: str) -> str:
    """``https://index.docker.io/v1/`` → ``docker.io``; ``http://host:5000/x`` → ``host:5000``."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    host = key.partition("/")[0].lower()
    return DEFAULT_REGISTRY if host in _DOCKER_HUB_KEYS else host


def _default_auth_file() -> Path:
    docker_config = os.environ.get("DOCKER_CONFIG")
    if docker_config:
        return Path(docker_config) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _entry_credentials(entry: Any, path: Path, key: str) -> Credentials:
    bad = RegistryAuthError(
        f"malformed credentials for {key!r} in {path}",
        hint="each 'auths' entry needs 'auth' (base64 of USER:PASSWORD) or username and password",
        path=str(path),
    )
    if not isinstance(entry, dict):
        raise bad
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise bad from None
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise bad
        return Credentials(username, password)
    user, secret = entry.get("username"), entry.get("password")
    if isinstance(user, str) and user and isinstance(secret, str):
        return Credentials(user, secret)
    raise bad


def load_credentials(
    registry: str, *, creds: str | None = None, auth_file: str | os.PathLike[str] | None = None
) -> Credentials | None:
    """Find credentials for ``registry`` (``host[:port]``, ``docker.io`` for Docker Hub).

    ``creds`` (``USER:PASSWORD``) wins; then ``auth_file``, which must exist when given;
    then ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json`` if present.
    Returns ``None`` for anonymous access.
    """
    if creds is not None:
        return Credentials.parse(creds)
    path = Path(auth_file) if auth_file is not None else _default_auth_file()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if auth_file is not None:
            raise InvalidArgument(
                f"auth file {path} does not exist", hint="pass a docker-style config.json"
            ) from None
        return None
    except OSError as exc:
        raise RegistryAuthError(
            f"cannot read auth file {path}: {exc.strerror}", path=str(path)
        ) from exc
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RegistryAuthError(
            f"auth file {path} is not valid JSON",
            hint="fix or remove the file, or pass --creds",
            path=str(path),
        ) from None
    auths = document.get("auths", {}) if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        raise RegistryAuthError(f"'auths' in {path} is not an object", path=str(path))
    wanted = _config_key(registry)
    for key, entry in auths.items():
        if isinstance(key, str) and _config_key(key) == wanted:
            return _entry_credentials(entry, path, key)
    return None


@dataclass(slots=True)
class _Token:
    value: str
    expires: float


class Authenticator:
    """Answers one registry's challenges and remembers the answer per scope.

    The registry client asks ``header(scope)`` before each request to the registry's
    own origin and calls ``answer(...)`` on a 401, then retries once.
    """

    def __init__(self, registry: str, credentials: Credentials | None) -> None:
        self.registry = registry
        self.credentials = credentials
        self._tokens: dict[str, _Token] = {}
        self._basic = False

    def header(self, scope: str) -> str | None:
        """The ``Authorization`` value to send for ``scope``, if we have one."""
        token = self._tokens.get(scope)
        if token is not None and token.expires > time.monotonic():
            return f"Bearer {token.value}"
        if self._basic and self.credentials is not None:
            return self.credentials.basic()
        return None

    async def answer(self, fetch: TokenFetch, header: str | None, scope: str) -> None:
        """Obtain what the ``WWW-Authenticate`` ``header`` of a 401 asks for ``scope``."""
        challenges = {c.scheme: c for c in parse_challenges(header or "")}
        if "bearer" in challenges:
            await self._fetch_token(fetch, challenges["bearer"], scope)
        elif "basic" in challenges:
            if self.credentials is None:
                raise RegistryAuthError(
                    f"registry {self.registry} requires a user name and password",
                    registry=self.registry,
                )
            self._basic = True
        else:
            raise RegistryAuthError(
                f"registry {self.registry} asks for an authentication scheme magikrun does not "
                f"support: {(header or '(none)')[:200]!r}",
                hint="magikrun supports Basic and Bearer token authentication",
                registry=self.registry,
            )

    async def _fetch_token(self, fetch: TokenFetch, challenge: Challenge, scope: str) -> None:
        realm = challenge.params.get("realm", "")
        url = httpx.URL(realm) if realm else None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise RegistryAuthError(
                f"registry {self.registry} names an unusable token realm {realm[:200]!r}",
                registry=self.registry,
            )
        params = dict(url.params)
        if "service" in challenge.params:
            params["service"] = challenge.params["service"]
        params["scope"] = challenge.params.get("scope") or scope
        headers = {}
        if self.credentials is not None:
            if url.scheme != "https" and not is_loopback_host(url.netloc.decode()):
                raise RegistryAuthError(
                    f"registry {self.registry} asks to send credentials over plain HTTP to "
                    f"{url.host}",
                    hint="the token realm must use https unless it is on this machine",
                    registry=self.registry,
                )
            headers["Authorization"] = self.credentials.basic()
        status, body = await fetch(url.copy_with(params=params), headers)
        if status in (401, 403):
            raise RegistryAuthError(
                f"token server {url.host} refused the credentials for {self.registry}"
                if self.credentials is not None
                else f"registry {self.registry} requires a user name and password",
                registry=self.registry,
            )
        if status != 200:
            raise RegistryAuthError(
                f"token server {url.host} answered HTTP {status}",
                hint="check the registry's token service",
                registry=self.registry,
            )
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        value = None
        if isinstance(document, dict):
            value = document.get("token") or document.get("access_token")
        if not isinstance(value, str) or not value:
            raise RegistryAuthError(
                f"token server {url.host} sent no token", registry=self.registry
            )
        lifetime = document.get("expires_in") if isinstance(document, dict) else None
        if not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = _DEFAULT_TOKEN_LIFETIME
        expires = time.monotonic() + max(float(lifetime) - _TOKEN_LEEWAY, 1.0)
        self._tokens[scope] = _Token(value, expires)
