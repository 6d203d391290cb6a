"""Small helpers for the lab: iproute2 commands inside named network namespaces.

The lab shells out to `ip` and `bridge` (its steps read like the commands a person would type,
and `ip -n NS` enters the namespace for one command only). Python's own code enters a namespace
only in a short-lived thread (`call_in_netns`), so the calling process never leaves the root
namespace.
"""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gatepeer.kernel import netns as kernel_netns
from gatepeer.kernel.netns import NETNS_DIR

T = TypeVar("T")


class LabError(RuntimeError):
    """A lab step failed; the message says which command and what the kernel answered."""


def run(
    cmd: Sequence[str], *, check: bool = True, input: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise LabError with the command line and its stderr."""
    try:
        proc = subprocess.run(
            list(cmd), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise LabError(f"{cmd[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(cmd)}: no answer after {timeout:g}s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"{' '.join(cmd)}: exit {proc.returncode}: {detail}")
    return proc


def ip(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip [-n NS] ARGS...`."""
    return run(["ip", *(["-n", ns] if ns else []), *args], check=check)


def ip_json(ns: str | None, *args: str) -> list[dict[str, Any]]:
    """`ip -j [-n NS] ARGS...` decoded; an empty answer is an empty list."""
    out = run(["ip", "-j", *(["-n", ns] if ns else []), *args]).stdout.strip()
    return list(json.loads(out)) if out else []


def bridge(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`bridge [-n NS] ARGS...`."""
    return run(["bridge", *(["-n", ns] if ns else []), *args], check=check)


def bridge_json(ns: str | None, *args: str) -> list[dict[str, Any]]:
    out = run(["bridge", "-j", *(["-n", ns] if ns else []), *args]).stdout.strip()
    return list(json.loads(out)) if out else []


def exec_in(ns: str, cmd: Sequence[str]) -> list[str]:
    """The argv that runs `cmd` inside namespace `ns` (`ip netns exec` execs in place, so the
    pid of a process started this way is the pid of `cmd` itself)."""
    return ["ip", "netns", "exec", ns, *cmd]


def list_netns() -> list[str]:
    """Names of the namespaces in /run/netns (what `ip netns list` shows)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def add_netns(name: str) -> bool:
    """Create the namespace unless it exists; True when it was created."""
    if netns_exists(name):
        return False
    run(["ip", "netns", "add", name])
    return True


def delete_netns(name: str) -> None:
    """Delete the namespace; links inside it (and the other ends of its veth pairs) go with it."""
    if netns_exists(name):
        run(["ip", "netns", "delete", name])


def netns_pids(name: str) -> list[int]:
    """Processes still running inside the namespace (they keep it alive after deletion)."""
    proc = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def link_exists(ns: str, name: str) -> bool:
    return ip(ns, "link", "show", "dev", name, check=False).returncode == 0


def link_details(ns: str, name: str) -> dict[str, Any] | None:
    """`ip -d -j link show dev NAME`, or None when there is no such link."""
    proc = ip(ns, "-d", "-j", "link", "show", "dev", name, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    links = json.loads(proc.stdout)
    return dict(links[0]) if links else None


def link_stats(ns: str, name: str) -> dict[str, int]:
    """rx/tx packet and byte counters of one link."""
    links = ip_json(ns, "-s", "link", "show", "dev", name)
    stats = links[0].get("stats64", {}) if links else {}
    return {
        "rx_packets": int(stats.get("rx", {}).get("packets", 0)),
        "rx_bytes": int(stats.get("rx", {}).get("bytes", 0)),
        "tx_packets": int(stats.get("tx", {}).get("packets", 0)),
        "tx_bytes": int(stats.get("tx", {}).get("bytes", 0)),
    }


def call_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a fresh thread that has entered namespace `name` (kernel.netns), and return
    its result; the calling process never leaves the root namespace."""
    try:
        return kernel_netns.call_in_netns(name, fn)
    except kernel_netns.NamespaceMissing as exc:
        raise LabError(str(exc)) from None


def write_sysctls(ns: str, values: Mapping[str, str | int]) -> None:
    """Write sysctls (dotted names, net.* only) inside namespace `ns`, in the given order."""

    def write() -> None:
        for key, value in values.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            try:
                path.write_text(f"{value}\n")
            except OSError as exc:
                reason = "no such key" if exc.errno == errno.ENOENT else exc.strerror
                raise LabError(f"sysctl {key}={value} in {ns}: {reason}") from None

    call_in_netns(ns, write)


def read_sysctl(ns: str, key: str) -> str:
    path = Path("/proc/sys") / key.replace(".", "/")
    return call_in_netns(ns, lambda: path.read_text().strip())
