"""Reading the two device sets: over netlink into columns (`kernel.device_sets`, what the
daemon and `gatepeer devices --live` use) against nft's listing and its JSON
(`kernel.nftables.device_traffic`: `nft -j list set`, the reader before), in one run.

    sudo .venv/bin/python bench/bench_device_sets.py --devices 10000 100000 --rounds 5

For each size a namespace of its own holds a device table with both sets filled with N
addresses (`nft add element`, no traffic: counters zero, which costs the readers the same).
Each round reads with each reader once, the order alternating; each read is timed, and its
peak of Python memory is measured with tracemalloc in a separate, untimed read (the kernel's
and nft's own memory are not Python's). Prints medians (min-max); --json FILE keeps every
sample. Needs root (namespaces); removes its namespaces on the way out.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from gatepeer.kernel import device_sets
from gatepeer.kernel import nftables as nf
from gatepeer.ruleset import DEVICE_SETS

FIRST = int(IPv4Address("198.19.128.1"))
BATCH = 5000  # elements per `add element` line


def _nft(ns: str, script: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True
    )


def fill(ns: str, count: int) -> None:
    sets = "".join(
        f"\tset {name} {{\n\t\ttype ipv4_addr\n\t\tsize 131072\n\t\tflags dynamic,timeout\n"
        "\t\tcounter\n\t\ttimeout 1h\n\t}\n"
        for name in DEVICE_SETS
    )
    _nft(ns, f"table inet gatepeer_dev_bench {{\n{sets}}}\n")
    lines = []
    for name in DEVICE_SETS:
        for start in range(0, count, BATCH):
            elements = ", ".join(
                str(IPv4Address(FIRST + i)) for i in range(start, min(count, start + BATCH))
            )
            lines.append(f"add element inet gatepeer_dev_bench {name} {{ {elements} }}")
    _nft(ns, "\n".join(lines) + "\n")


def timed(read: Callable[[], Any]) -> tuple[float, int]:
    start = time.perf_counter()
    found = read()
    return (time.perf_counter() - start) * 1000, len(found)


def peak_mb(read: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        read()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args()
    samples: dict[str, dict[str, Any]] = {}
    for count in args.devices:
        ns = f"bnds{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            fill(ns, count)
            readers: dict[str, Callable[[], Any]] = {
                "netlink": lambda ns=ns: device_sets.device_reading(ns),
                "nft -j": lambda ns=ns: nf.device_traffic(ns),
            }
            ms: dict[str, list[float]] = {name: [] for name in readers}
            for r in range(args.rounds):
                for name in list(readers) if r % 2 == 0 else list(reversed(readers)):
                    took, seen = timed(readers[name])
                    if seen != count:
                        sys.exit(f"{name} read {seen} devices, not {count}")
                    ms[name].append(took)
            peaks = {name: peak_mb(read) for name, read in readers.items()}
            samples[str(count)] = {"ms": ms, "peak_mb": peaks}
        finally:
            subprocess.run(["ip", "netns", "delete", ns], check=False)
    print(f"# {args.rounds} rounds, order alternating; medians (min-max)")
    print(f"{'devices':>8} {'reader':>8} {'ms':>26} {'Python peak MB':>15}")
    for count, found in samples.items():
        for name, values in found["ms"].items():
            spread = f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"
            print(f"{count:>8} {name:>8} {spread:>26} {found['peak_mb'][name]:>15.1f}")
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
