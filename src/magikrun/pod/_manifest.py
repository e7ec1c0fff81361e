"""Loading Kubernetes manifests safely, and reading their fields with exact error paths.

YAML is hostile input here: the bytes are capped before parsing, and the parsed structure
is walked once, counting every alias use again, before any field is read. An alias bomb
(``a: &a [..]``, ``b: [*a, *a, ...]``) is cheap for PyYAML to build, because it shares the
objects, but every consumer that walks it pays for the full expansion; the walk refuses it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import InvalidPodSpec, PodSpecTooLarge
from ..platform._limits import (
    MAX_POD_SPEC_DEPTH,
    MAX_POD_SPEC_EXPANDED,
    MAX_POD_SPEC_NODES,
    MAX_POD_SPEC_SIZE,
    MAX_POD_STRING_LEN,
)

__all__ = ["Obj", "load_documents"]

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def load_documents(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    """Parse a (multi-document) YAML file into its non-empty documents, with their index."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("manifest data must be bytes")
    if len(data) > MAX_POD_SPEC_SIZE:
        raise PodSpecTooLarge(
            f"manifest is {len(data)} bytes, over the limit of {MAX_POD_SPEC_SIZE}",
            field="",
        )
    import yaml  # PyYAML only where a manifest is parsed (not for ``pod ls``, say)

    loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        loaded = list(yaml.load_all(bytes(data), Loader=loader))
    except yaml.YAMLError as exc:
        raise InvalidPodSpec(f"manifest is not valid YAML: {exc}", field="") from exc
    except RecursionError as exc:
        raise PodSpecTooLarge("manifest is nested too deeply", field="") from exc
    documents: list[tuple[int, dict[str, Any]]] = []
    for index, document in enumerate(loaded):
        if document is None:
            continue
        check_structure(document)
        if not isinstance(document, dict):
            raise InvalidPodSpec(
                f"document {index}: expected a mapping, got {type_name(document)}", field=""
            )
        documents.append((index, document))
    return documents


def check_structure(root: object) -> None:
    """Refuse structures over the node, depth or expanded-size limits (alias bombs)."""
    nodes = 0
    chars = 0
    stack: list[tuple[object, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_POD_SPEC_NODES:
            raise PodSpecTooLarge(
                f"manifest expands to more than {MAX_POD_SPEC_NODES} values"
                " (YAML aliases count each time they are used)",
                field="",
            )
        if depth > MAX_POD_SPEC_DEPTH:
            raise PodSpecTooLarge(
                f"manifest is nested deeper than {MAX_POD_SPEC_DEPTH} levels", field=""
            )
        if isinstance(value, str | bytes):
            if len(value) > MAX_POD_STRING_LEN:
                raise PodSpecTooLarge(
                    f"a string of {len(value)} characters is over the limit of"
                    f" {MAX_POD_STRING_LEN}",
                    field="",
                )
            chars += len(value)
            if chars > MAX_POD_SPEC_EXPANDED:
                raise PodSpecTooLarge(
                    f"manifest expands to more than {MAX_POD_SPEC_EXPANDED} characters"
                    " (YAML aliases count each time they are used)",
                    field="",
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, depth + 1))
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def type_name(value: object) -> str:
    """The YAML name of a parsed value's type, for error messages."""
    names: dict[type, str] = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "mapping",
        bytes: "binary",
    }
    if value is None:
        return "null"
    return names.get(type(value), type(value).__name__)


def fail(path: str, message: str, **extra: Any) -> InvalidPodSpec:
    """An ``InvalidPodSpec`` whose message starts with the field path."""
    return InvalidPodSpec(f"{path}: {message}" if path else message, field=path, **extra)


def is_dns_label(value: str) -> bool:
    return len(value) <= 63 and _DNS_LABEL.fullmatch(value) is not None


def is_dns_subdomain(value: str) -> bool:
    return len(value) <= 253 and all(is_dns_label(part) for part in value.split("."))


def is_hostname(value: str) -> bool:
    """A host name as /etc/hosts and resolv.conf take it (one trailing dot allowed)."""
    name = value[:-1] if value.endswith(".") else value
    return bool(name) and is_dns_subdomain(name.lower())


class Obj:
    """A manifest mapping plus its path, so every error names the exact field."""

    def __init__(self, data: Mapping[Any, Any], path: str) -> None:
        self.data = data
        self.path = path

    @classmethod
    def of(cls, value: object, path: str) -> Obj:
        if not isinstance(value, dict):
            raise fail(path, f"expected a mapping, got {type_name(value)}")
        return cls(value, path)

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str) -> Any:
        """The raw value, with ``null`` and absence both meaning unset (as Kubernetes)."""
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def text(self, key: str, *, required: bool = False, default: str | None = None) -> str | None:
        value = self.get(key)
        if value is None:
            if required:
                raise fail(self.at(key), "is required")
            return default
        if not isinstance(value, str):
            raise fail(self.at(key), f"expected a string, got {type_name(value)}")
        if "\x00" in value:
            raise fail(self.at(key), "must not contain NUL bytes")
        return value

    def req_text(self, key: str) -> str:
        value = self.text(key, required=True)
        assert value is not None
        return value

    def integer(self, key: str, *, low: int, high: int) -> int | None:
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(self.at(key), f"expected an integer, got {type_name(value)}")
        if not low <= value <= high:
            raise fail(self.at(key), f"{value} is out of range")
        return value

    def flag(self, key: str) -> bool | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise fail(self.at(key), f"expected a boolean, got {type_name(value)}")
        return value

    def obj(self, key: str) -> Obj | None:
        value = self.get(key)
        return None if value is None else Obj.of(value, self.at(key))

    def items(self, key: str, *, limit: int | None = None) -> Iterator[tuple[str, Any]]:
        """The items of a list field with their paths (``key[i]``)."""
        value = self.get(key)
        if value is None:
            return iter(())
        if not isinstance(value, list):
            raise fail(self.at(key), f"expected a list, got {type_name(value)}")
        if limit is not None and len(value) > limit:
            raise PodSpecTooLarge(
                f"{self.at(key)}: {len(value)} items are over the limit of {limit}",
                field=self.at(key),
            )
        return ((f"{self.at(key)}[{i}]", item) for i, item in enumerate(value))

    def objs(self, key: str, *, limit: int | None = None) -> Iterator[Obj]:
        return (Obj.of(item, path) for path, item in self.items(key, limit=limit))

    def texts(self, key: str) -> tuple[str, ...] | None:
        if self.get(key) is None:
            return None
        items: list[str] = []
        for path, item in self.items(key):
            if not isinstance(item, str):
                raise fail(path, f"expected a string, got {type_name(item)}")
            if "\x00" in item:
                raise fail(path, "must not contain NUL bytes")
            items.append(item)
        return tuple(items)

    def text_map(self, key: str) -> dict[str, str]:
        value = self.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise fail(self.at(key), f"expected a mapping, got {type_name(value)}")
        result: dict[str, str] = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise fail(self.at(key), f"key {name!r} must be a string")
            if not isinstance(item, str):
                raise fail(f"{self.at(key)}.{name}", f"expected a string, got {type_name(item)}")
            result[name] = item
        return result


def check_label_map(values: Mapping[str, str], path: str, *, check_values: bool) -> None:
    """Label and annotation keys (``[prefix/]name``), and label values, as Kubernetes."""
    for key, value in values.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and not is_dns_subdomain(prefix)) or not (
            len(name) <= 63 and _LABEL_NAME.fullmatch(name)
        ):
            raise fail(f"{path}.{key}", "is not a valid label or annotation key")
        if check_values and value and not (len(value) <= 63 and _LABEL_NAME.fullmatch(value)):
            raise fail(f"{path}.{key}", f"{value!r} is not a valid label value")


def check_env_name(name: str, path: str) -> None:
    if _ENV_NAME.fullmatch(name) is None:
        raise fail(path, f"{name!r} is not a valid environment variable name")


def is_env_name(name: str) -> bool:
    return _ENV_NAME.fullmatch(name) is not None


def check_config_key(key: str, path: str) -> None:
    if len(key) > 253 or _CONFIG_KEY.fullmatch(key) is None or key.startswith(".."):
        raise fail(path, f"{key!r} is not a valid ConfigMap or Secret key")
    if key == ".":
        raise fail(path, f"{key!r} is not a valid ConfigMap or Secret key")


def check_port_name(name: str, path: str) -> None:
    ok = (
        len(name) <= 15
        and _PORT_NAME.fullmatch(name) is not None
        and "--" not in name
        and any(c.isalpha() for c in name)
    )
    if not ok:
        raise fail(path, f"{name!r} is not a valid port name")


def check_ip(value: str, path: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise fail(path, f"{value!r} is not an IP address") from exc


def check_relative_path(value: str, path: str) -> None:
    """A path inside a volume: relative, without ``..`` components."""
    if not value or value.startswith("/") or ".." in value.split("/"):
        raise fail(path, f"{value!r} must be a relative path without '..'")


def check_absolute_path(value: str, path: str) -> None:
    if not value.startswith("/") or ".." in value.split("/"):
        raise fail(path, f"{value!r} must be an absolute path without '..'")
