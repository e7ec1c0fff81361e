"""Image references (``[host[:port]/]path[:tag][@sha256:hex]``) with Docker's normalisation.

Parsing follows the distribution project's reference grammar, so a name that Docker
or containerd rejects is rejected here too, and with the part that is wrong named.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from ..errors import InvalidDigest, InvalidReference
from ..platform import MAX_IMAGE_REF_LEN
from ..storage import validate_digest

__all__ = ["DEFAULT_REGISTRY", "DEFAULT_TAG", "Reference"]

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_MAX_NAME_LEN = 255
"""Bytes of ``host/path`` (the distribution spec's NameTotalLengthMax)."""

_HOST_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(
    rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[a-fA-F0-9:]+\])(?::(?P<port>[0-9]+))?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")


def _bad(text: str, why: str) -> InvalidReference:
    return InvalidReference(f"invalid image reference {text[:100]!r}: {why}", reference=text[:100])


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed, normalised image reference.

    ```python
    ref = Reference.parse("busybox")
    ref.normalized   # 'docker.io/library/busybox:latest'
    ref.registry     # 'docker.io'
    ```
    """

    registry: str
    """The registry as written (``docker.io`` for Docker Hub), with ``:port`` if any."""
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``text``, filling in Docker's defaults; raise InvalidReference if malformed."""
        if not isinstance(text, str) or not text:
            raise _bad(str(text), "it is empty")
        if len(text.encode()) > MAX_IMAGE_REF_LEN:
            raise _bad(text, f"it is longer than {MAX_IMAGE_REF_LEN} bytes")
        if text != text.strip() or any(c.isspace() or ord(c) < 0x20 for c in text):
            raise _bad(text, "it contains whitespace or control characters")
        rest, digest = text, None
        if "@" in rest:
            rest, _, digest = rest.partition("@")
            try:
                validate_digest(digest)
            except InvalidDigest:
                raise _bad(text, f"digest {digest[:80]!r} is not sha256:<64 hex>") from None
        tag = None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if _TAG.fullmatch(tag) is None:
                raise _bad(text, f"tag {tag!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
            registry, path = first, remainder
            match = _HOST.fullmatch(registry)
            if match is None:
                raise _bad(text, f"registry {registry!r} is not a valid host[:port]")
            port = match.group("port")
            if port is not None and not 0 < int(port) < 65536:
                raise _bad(text, f"port {port} is out of range")
        else:
            registry, path = DEFAULT_REGISTRY, rest
        if registry in _DOCKER_HUB_ALIASES:
            registry = DEFAULT_REGISTRY
            if "/" not in path:
                path = f"library/{path}"
        if not path:
            raise _bad(text, "the repository name is empty")
        for component in path.split("/"):
            if _PATH_COMPONENT.fullmatch(component) is None:
                raise _bad(
                    text,
                    f"repository component {component!r} must be lowercase letters and digits "
                    "separated by '.', '_', '__' or '-'",
                )
        if len(registry) + 1 + len(path) > _MAX_NAME_LEN:
            raise _bad(text, f"the name is longer than {_MAX_NAME_LEN} characters")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, path, tag, digest)

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def normalized(self) -> str:
        """The fully qualified form, as images are stored under."""
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/`` in a registry request: the digest if pinned."""
        return self.digest if self.digest is not None else (self.tag or DEFAULT_TAG)

    @property
    def host(self) -> str:
        """The ``host[:port]`` to connect to (Docker Hub's API lives on another name)."""
        return _DOCKER_HUB_API if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def is_loopback(self) -> bool:
        """Whether the registry is on this machine, where Docker defaults to plain HTTP."""
        return is_loopback_host(self.registry)

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=validate_digest(digest))

    def __str__(self) -> str:
        return self.normalized


def is_loopback_host(hostport: str) -> bool:
    """Whether ``host[:port]`` names ``localhost`` or a loopback IP address."""
    host = hostport
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
