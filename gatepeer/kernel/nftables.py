"""The packet path's nftables I/O: load the table `gatepeer.ruleset` renders atomically with
`nft -f -`, read it back, read its counters. Nothing here touches another table.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address
from pathlib import Path

# FAMILY, TABLE and counters_from_listing are named through this module by its callers too.
from gatepeer.device_traffic import DeviceTraffic
from gatepeer.ruleset import (
    DEVICE_SETS,
    DEVICE_TABLE_PREFIX,
    DEVICE_TIMEOUT_S,
    ENDPOINT_SET,
    FAMILY,
    FLOWTABLE,
    REMOVE_TRANSACTION,
    TABLE,
    PacketPathSpec,
    change_needed,
    counters_from_json,
    counters_from_listing,
    device_tables_line,
    device_traffic_from_json,
    devices_transaction,
    endpoints_transaction,
    sets_transaction,
    transaction,
)

__all__ = [
    "FAMILY",
    "TABLE",
    "NftError",
    "PacketPathSpec",
    "counters",
    "counters_from_listing",
    "current",
    "device_tables",
    "device_traffic",
    "flowtable_supported",
    "is_converged",
    "load",
    "nft_available",
    "remove",
    "unwritable",
    "update_endpoints",
    "update_sets",
]

_TIMEOUT = 30.0


class NftError(RuntimeError):
    """`nft` failed; the message carries nft's own stderr."""

    def __init__(self, what: str, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip() or f"exit status {returncode}"
        super().__init__(f"{what}: {detail}")


def nft_available() -> bool:
    return shutil.which("nft") is not None


def _run(
    args: Sequence[str], netns: str | None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    # In a named namespace through iproute2, as `ip netns exec` sets up /sys and /etc too.
    argv = (["ip", "netns", "exec", netns] if netns else []) + ["nft", *args]
    try:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, check=False, timeout=_TIMEOUT
        )
    except FileNotFoundError as exc:
        raise NftError(" ".join(argv), argv, 127, f"{exc.filename}: not installed") from exc
    except subprocess.TimeoutExpired:
        raise NftError(" ".join(argv), argv, -1, f"no answer within {_TIMEOUT:g}s") from None
    except OSError as exc:
        raise NftError(" ".join(argv), argv, -1, exc.strerror or str(exc)) from None


def _absent(proc: subprocess.CompletedProcess[str]) -> bool:
    # nft's own ENOENT, not `ip netns exec` failing to find a namespace or nft.
    return proc.returncode != 0 and "Error: No such file or directory" in proc.stderr


def _apply(text: str, what: str, netns: str | None) -> None:
    proc = _run(["-f", "-"], netns, stdin=text)
    if proc.returncode != 0:
        raise NftError(what, proc.args, proc.returncode, proc.stderr)


def load(
    spec: PacketPathSpec,
    netns: str | None = None,
    counters: Mapping[str, tuple[int, int]] | None = None,
) -> None:
    """Replace our table with `spec`'s in one transaction (also the very first load).

    On failure nothing changed: the old table, if any, is still loaded. Pass
    `counters_from_listing(current_text)` as `counters` to carry the counters over.
    """
    what = f"loading table {FAMILY} {TABLE} failed"
    if spec.flowtable:
        what += " (it has a flowtable: does this kernel have one? see flowtable_supported())"
    # The device table in the same transaction: created when missing, kept with its counts
    # when it is already the right one, removed when counting is off.
    text = transaction(spec, counters) + devices_transaction(spec, device_tables(netns))
    _apply(text, what, netns)


def remove(netns: str | None = None) -> None:
    """Delete our table, if it is there; nothing else."""
    text = REMOVE_TRANSACTION + devices_transaction(None, device_tables(netns))
    _apply(text, f"removing table {FAMILY} {TABLE} failed", netns)


def current(netns: str | None = None) -> str | None:
    """Our table as the kernel has it (`nft list table`), then the line naming the device
    tables loaded (never listed: see `ruleset.DEVICE_TABLE_PREFIX`); None when our table is
    absent."""
    proc = _run(["list", "table", FAMILY, TABLE], netns)
    if _absent(proc):
        return None
    if proc.returncode != 0:
        raise NftError(
            f"listing table {FAMILY} {TABLE} failed", proc.args, proc.returncode, proc.stderr
        )
    return proc.stdout + device_tables_line(device_tables(netns))


def device_tables(netns: str | None = None) -> list[str]:
    """The device counters' tables loaded (one, or none), from `nft list tables` alone."""
    proc = _run(["-j", "list", "tables", FAMILY], netns)
    if proc.returncode != 0:
        raise NftError("listing tables failed", proc.args, proc.returncode, proc.stderr)
    names = []
    for item in json.loads(proc.stdout).get("nftables", []):
        table = item.get("table")
        name = str(table.get("name", "")) if table else ""
        if table and table.get("family") == FAMILY and name.startswith(DEVICE_TABLE_PREFIX):
            names.append(name)
    return sorted(names)


def is_converged(spec: PacketPathSpec, netns: str | None = None) -> bool:
    """Whether the loaded table is exactly `spec`'s, read without reloading anything."""
    return change_needed(spec, current(netns)) == "none"


def update_endpoints(endpoints: Iterable[IPv4Address], netns: str | None = None) -> None:
    """Set `vpg_endpoints` to exactly `endpoints`, atomically, without reloading the table."""
    _apply(endpoints_transaction(endpoints), f"updating set {ENDPOINT_SET} failed", netns)


def update_sets(spec: PacketPathSpec, netns: str | None = None) -> None:
    """Refill `vpg_endpoints` and `allowed_destinations` from `spec` in one transaction, without
    reloading the table (counters and device sets kept). A packet sees the old elements or the
    new ones, never an empty set: a flow to an address in both loses nothing."""
    _apply(sets_transaction(spec), f"updating the sets of table {FAMILY} {TABLE} failed", netns)


def device_traffic(netns: str | None = None) -> dict[IPv4Address, DeviceTraffic]:
    """Per-device traffic counted by the kernel (`device_counters`), by device address; empty
    when no device table is loaded. Lists every device: about 2.5 s per 100,000 here."""
    found: dict[IPv4Address, DeviceTraffic] = {}
    for table in device_tables(netns):
        for name in DEVICE_SETS:
            proc = _run(["-j", "list", "set", FAMILY, table, name], netns)
            if _absent(proc):
                return {}
            if proc.returncode != 0:
                raise NftError(
                    f"listing set {name} failed", proc.args, proc.returncode, proc.stderr
                )
            for address, seen in device_traffic_from_json(proc.stdout, DEVICE_TIMEOUT_S).items():
                found[address] = _merge(found.get(address), seen)
    return found  # unsorted: callers order what they show (by the address's integer)


def _merge(a: DeviceTraffic | None, b: DeviceTraffic) -> DeviceTraffic:
    if a is None:
        return b
    ages = [x for x in (a.last_packet_age_s, b.last_packet_age_s) if x is not None]
    return DeviceTraffic(
        a.address,
        a.packets_from_device + b.packets_from_device,
        a.bytes_from_device + b.bytes_from_device,
        a.packets_to_device + b.packets_to_device,
        a.bytes_to_device + b.bytes_to_device,
        min(ages) if ages else None,
    )


def counters(netns: str | None = None) -> dict[str, tuple[int, int]]:
    """Our named counters, name -> (packets, bytes); empty when the table is absent."""
    proc = _run(["-j", "list", "counters", "table", FAMILY, TABLE], netns)
    if _absent(proc):
        return {}
    if proc.returncode != 0:
        raise NftError("listing counters failed", proc.args, proc.returncode, proc.stderr)
    return counters_from_json(proc.stdout)


@functools.cache
def flowtable_supported(netns: str | None = None) -> bool:
    """Whether this kernel takes a flowtable, asked once with a throwaway table in check mode.

    `nft -c` sends the transaction and has the kernel abort it, so the kernel validates the
    flowtable (this is where a kernel without CONFIG_NF_FLOW_TABLE refuses it) while nothing is
    ever created: safe during a dry run. It uses `lo`, the one device every namespace has.
    """
    probe = f"{TABLE}_ftprobe_{os.getpid()}"
    flowtable = (
        f"\tflowtable {FLOWTABLE} {{\n"
        "\t\thook ingress priority filter\n\t\tdevices = { lo }\n\t}\n"
    )
    with_flowtable = f"table {FAMILY} {probe} {{\n{flowtable}}}\n"
    if _run(["-c", "-f", "-"], netns, stdin=with_flowtable).returncode == 0:
        return True
    # Same table without the flowtable: if that fails too, nft itself is the problem
    # (no permission, say), and that is an error rather than a missing feature.
    proc = _run(["-c", "-f", "-"], netns, stdin=f"table {FAMILY} {probe} {{\n}}\n")
    if proc.returncode != 0:
        raise NftError("probing nftables failed", proc.args, proc.returncode, proc.stderr)
    return False


# ---- conntrack: can its sysctls be written here ---------------------------------------------

PROC_SYS = Path("/proc/sys")


def unwritable(settings: Iterable[tuple[str, int]], root: Path = PROC_SYS) -> list[str]:
    """Why each setting cannot be written here (one line each); empty when all can.

    procfs enforces a sysctl's mode even for root, so access(2) answers truthfully; with the
    effective ids, since a non-root caller's capabilities (CAP_NET_ADMIN) count only there.
    """
    problems = []
    for path, _value in settings:
        full = root / path
        if not full.exists():
            problems.append(f"{path}: absent (no conntrack in this kernel?)")
        elif not os.access(full, os.W_OK, effective_ids=True):
            problems.append(
                f"{path}: read-only in this network namespace (global: set it from the "
                "initial namespace)"
            )
    return problems
