"""A VM's NIC as a tap device in a pod's network namespace, joined to the pod's ``eth0``.

QEMU stays in the host's namespaces. A short-lived thread enters the pod's namespace
(``setns`` moves only the calling thread, and the thread ends with it), opens
``/dev/net/tun``, makes the tap there and brings it up; QEMU gets the tap's fd. The tap
is not persistent: it vanishes when the last fd on it (QEMU's) is closed.

Two tc ingress filters (a u32 match of every frame with a mirred egress redirect) pass
frames between the CNI's ``eth0`` and the tap, both ways, as Kata's ``tcfilter`` mode
does. ``eth0`` keeps the address the CNI gave it: the redirect takes each frame at
ingress, before the namespace's IP stack sees it, so the namespace never answers for
the pod IP itself (the guest does), while the CNI plugins' CHECK and DEL find the
interface as ADD left it. The guest's NIC takes ``eth0``'s MAC, so the bridge and the
neighbours' ARP caches see one station.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import shutil
import socket
import struct
import threading
from pathlib import Path

from .. import _process
from .._threads import finish_in_thread
from ..errors import BackendFailed

__all__ = ["TAP_NAME", "open_tap", "tap_unavailable_reason"]

TAP_NAME = "tap0"
TUN_DEVICE = Path("/dev/net/tun")
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_CLONE_NEWNET = 0x40000000
_TC_TIMEOUT = 10.0

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_probed: list[str | None] = []


def _redirect(source: str, target: str) -> list[str]:
    """``tc -batch`` lines moving every frame that enters ``source`` out of ``target``."""
    return [
        f"qdisc add dev {source} ingress",
        f"filter add dev {source} parent ffff: protocol all u32 match u8 0 0 "
        f"action mirred egress redirect dev {target}",
    ]


def _batch(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _make_tap(netns: Path, name: str) -> int:
    """In a thread of its own that ends afterwards: enter ``netns``, make ``name`` up."""
    if threading.current_thread() is threading.main_thread():
        raise RuntimeError("_make_tap changes its thread's network namespace for good")
    ns = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(ns, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns: {os.strerror(code)}", str(netns))
    finally:
        os.close(ns)
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH22x", name.encode(), 0)
            flags = struct.unpack("16sH22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags | _IFF_UP))
    except BaseException:
        os.close(fd)
        raise
    return fd


async def open_tap(netns: Path, peer: str = "eth0", name: str = TAP_NAME) -> int:
    """A tap ``name`` in ``netns``, up, with all traffic redirected to and from ``peer``.

    Returns the tap's fd for QEMU (``-netdev tap,fd=N``); the caller closes its copy
    once QEMU has it. Raises ``BackendFailed`` with nothing left in the namespace but
    the tc filters (they go with the namespace).
    """
    try:
        fd = await finish_in_thread(_make_tap, netns, name)
    except OSError as exc:
        raise BackendFailed(
            f"cannot make tap {name} in network namespace {netns}: {exc.strerror or exc}",
            hint="microVM pods on the bridge need /dev/net/tun and root",
            netns=str(netns),
        ) from exc
    try:
        done = await _process.run(
            ["nsenter", f"--net={netns}", "tc", "-batch", "-"],
            input=_batch(_redirect(peer, name) + _redirect(name, peer)),
            timeout=_TC_TIMEOUT,
        )
        if done.returncode != 0:
            raise BackendFailed(
                f"cannot redirect {peer} to {name} in {netns}: "
                f"{done.stderr.decode(errors='replace').strip()}",
                hint="the kernel needs tc's u32 classifier and mirred action",
                netns=str(netns),
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


async def tap_unavailable_reason() -> str | None:
    """Why a VM's NIC cannot be a tap in a pod netns here, or None; probed once a process.

    The probe adds the same kind of filter on ``lo`` of a throwaway namespace, so a kernel
    without u32 or mirred is found before a pod is half made.
    """
    if not _probed:
        _probed.append(await _probe())
    return _probed[0]


async def _probe() -> str | None:
    try:
        os.close(os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"{TUN_DEVICE} cannot be opened ({exc.strerror})"
    for tool in ("tc", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    done = await _process.run(
        ["unshare", "--net", "tc", "-batch", "-"],
        input=_batch(_redirect("lo", "lo")),
        timeout=_TC_TIMEOUT,
    )
    if done.returncode != 0:
        return f"tc mirred redirects do not work: {done.stderr.decode(errors='replace').strip()}"
    return None
