"""Running a function inside a named network namespace without the process leaving its own.

setns(CLONE_NEWNET) changes only the calling thread, so `call_in_netns` runs the function in a
short-lived thread that enters the namespace and ends. Sockets the function makes stay in that
namespace whichever thread uses them later; /proc/sys/net opened there is that namespace's.
Used by the device-set reader (a namespace per lab peer) and by the lab itself.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

NETNS_DIR = Path("/run/netns")  # where `ip netns add` pins a namespace by name
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class NamespaceMissing(FileNotFoundError):
    """No namespace by that name (the message names it)."""


def _setns(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(name: str, fn: Callable[[], T]) -> T:
    """`fn()` run in a fresh thread that has entered namespace `name`; its result, or what it
    raised, in the caller's thread."""
    path = NETNS_DIR / name
    if not path.exists():
        raise NamespaceMissing(f"network namespace {name} does not exist")
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            _setns(path)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
