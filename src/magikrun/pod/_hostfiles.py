"""The pod's ``/etc/hosts``, ``/etc/resolv.conf`` and ``/etc/hostname``, as the kubelet makes them.

Every container of a pod bind-mounts the same three files, so they are written once per pod.
A pod on the bridge gets the host's resolvers minus loopback ones (``127.0.0.53`` of
systemd-resolved is unreachable from another network namespace); ``dnsPolicy: None`` uses
only ``dnsConfig``; a ``hostNetwork`` pod shares the host's network and so its files.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from ..image import Mount
from ._spec import DnsPolicy, PodSpec

__all__ = ["etc_hostname", "etc_hosts", "etc_mounts", "etc_resolv_conf", "write_etc_files"]

HOST_HOSTS = Path("/etc/hosts")
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
_MAX_NAMESERVERS = 3
"""glibc reads no more than three nameserver lines."""


def etc_hostname(spec: PodSpec) -> str:
    name = socket.gethostname() if spec.host_network else spec.effective_hostname
    return f"{name}\n"


def etc_hosts(spec: PodSpec, pod_ip: str | None, *, host_hosts: str | None = None) -> str:
    """``/etc/hosts``: loopback, the pod's own name on its IP, then ``hostAliases``.

    ``host_hosts`` is the host's file, used as the base for ``hostNetwork`` pods.
    """
    if spec.host_network:
        base = host_hosts if host_hosts is not None else HOST_HOSTS.read_text()
        lines = [base.rstrip("\n")]
    else:
        lines = [
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
        ]
        if pod_ip:
            lines.append(f"{pod_ip}\t{spec.effective_hostname}")
    if spec.host_aliases:
        lines.append("# Entries added by HostAliases.")
        lines += [f"{alias.ip}\t{' '.join(alias.hostnames)}" for alias in spec.host_aliases]
    return "\n".join(lines) + "\n"


def etc_resolv_conf(spec: PodSpec, *, host_resolv_conf: str | None = None) -> str:
    """``/etc/resolv.conf`` from the pod's ``dnsPolicy`` and ``dnsConfig``.

    ``host_resolv_conf`` is the host's file (read from ``/etc/resolv.conf`` when omitted).
    """
    nameservers: list[str] = []
    searches: list[str] = []
    options: dict[str, str | None] = {}
    if spec.dns_policy is not DnsPolicy.NONE:
        host = host_resolv_conf if host_resolv_conf is not None else HOST_RESOLV_CONF.read_text()
        _read_resolv_conf(host, nameservers, searches, options, keep_loopback=spec.host_network)
    config = spec.dns_config
    if config is not None:
        nameservers = _unique([*config.nameservers, *nameservers])
        searches = _unique([*config.searches, *searches])
        for option in config.options:
            options[option.name] = option.value
    lines = [f"nameserver {server}" for server in nameservers[:_MAX_NAMESERVERS]]
    if searches:
        lines.append("search " + " ".join(searches))
    if options:
        lines.append(
            "options "
            + " ".join(
                name if value is None else f"{name}:{value}" for name, value in options.items()
            )
        )
    return "\n".join(lines) + "\n"


def _read_resolv_conf(
    text: str,
    nameservers: list[str],
    searches: list[str],
    options: dict[str, str | None],
    *,
    keep_loopback: bool,
) -> None:
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith(("#", ";")):
            continue
        keyword, values = words[0], words[1:]
        if keyword == "nameserver" and values:
            try:
                address = ipaddress.ip_address(values[0].split("%")[0])
            except ValueError:
                continue  # glibc ignores a malformed nameserver line too.
            if keep_loopback or not address.is_loopback:
                nameservers.append(values[0])
        elif keyword in ("search", "domain"):
            searches[:] = values
        elif keyword == "options":
            for value in values:
                name, sep, arg = value.partition(":")
                options[name] = arg if sep else None


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def etc_mounts(directory: Path) -> list[Mount]:
    """Read-only binds of the files :func:`write_etc_files` wrote in ``directory``."""
    return [
        Mount(destination=f"/etc/{name}", source=str(directory / name), options=("bind", "ro"))
        for name in ("hosts", "resolv.conf", "hostname")
    ]


def write_etc_files(
    spec: PodSpec,
    directory: Path,
    *,
    pod_ip: str | None,
    host_hosts: str | None = None,
    host_resolv_conf: str | None = None,
) -> dict[str, Path]:
    """Write ``hosts``, ``resolv.conf`` and ``hostname`` into the pod's ``directory``.

    Each file is written under a temporary name and renamed, so a container never bind-mounts
    a half-written file. Returns the paths by file name.
    """
    contents = {
        "hosts": etc_hosts(spec, pod_ip, host_hosts=host_hosts),
        "resolv.conf": etc_resolv_conf(spec, host_resolv_conf=host_resolv_conf),
        "hostname": etc_hostname(spec),
    }
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name, text in contents.items():
            temp = f".{name}.tmp"
            fd = os.open(
                temp,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=dir_fd,
            )
            with open(fd, "w", encoding="utf-8") as file:
                file.write(text)
                os.fchmod(file.fileno(), 0o644)
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    return {name: directory / name for name in contents}
