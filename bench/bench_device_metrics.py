"""The per-device metrics' cost: the daemon's memory and one /metrics scrape with 10,000 and
100,000 devices, against the same scrape without devices, in one run (issue 19; goals: under
80 MB, a scrape under 50 ms).

    .venv/bin/python bench/bench_device_metrics.py --rounds 5
    .venv/bin/python bench/bench_device_metrics.py --rounds 5 --devices 10000 100000 --json F

Each measurement is a fresh interpreter (so memory is one process's, not the sum of earlier
rounds) that imports what the daemon imports, builds the daemon's registry (every collector,
the process collector included) over the tests' fake agent and kernel, and, for N > 0, a
device source with N devices (each with counters and a SIM record in one of 20 groups) that,
as the daemon's, makes a fresh reading per call, writes it to disk joined with the SIM map
for `gatepeer devices` (`device_reading.keep`, into a temporary directory; in the timed
reading) and keeps none in memory between readings. It
scrapes once (the tracker meets every device), then advances the clock 30 s with fresh
counters (about a third of the devices active) and times `--scrapes` scrapes: the median is
that N's scrape time. Memory: VmRSS after the scrapes and VmHWM (the peak), from
/proc/self/status. Rounds interleave the sizes (baseline first, then rotating) and the report
gives medians with min-max. No root, no lab.

With --kernel (root), each reading is the netlink reader's (`kernel.device_sets`) of N
addresses in both sets of a namespace the bench fills: the daemon's whole reading path, its
transient memory included (the counters stay zero: it is the size that costs).

Else not measured here: reading the kernel's counters (`kernel.device_sets`: netlink dumps of the
two sets, decoded into columns); the source hands the collector the columns such a reading
makes (`DeviceReading`), built from a generator as the reader builds them from the kernel's
answer (the reader's own time and memory: bench/README.md, measured in a namespace).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, shutil, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/tests")
n, scrapes = int(sys.argv[2]), int(sys.argv[3])
netns = sys.argv[4] if len(sys.argv) > 4 else ""  # --kernel: the sets to read, over netlink
import gatepeer.daemon  # noqa: F401 - what the daemon has imported before any scrape
from ipaddress import IPv4Address
from prometheus_client import ProcessCollector, generate_latest
from prometheus_client.registry import CollectorRegistry
from helpers.device_fakes import SimMap
from gatepeer.sims import SimRecords
from gatepeer.device_traffic import DeviceReading
from gatepeer import device_reading
from helpers.metrics_sources import FULL_COUNTERS, FakeAgent, FakeKernel, FakePacketPath
from gatepeer.metrics.collectors import collectors

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB

now = [1_800_000_000.0]
base = int(IPv4Address("10.128.0.0"))
# Nothing of the inputs kept but the SIM map: each reading makes its own addresses, as the
# daemon's parser does.
# The map as the daemon loads it from its cache: packed row by row (gatepeer.sims.SimRecords).
sims = SimMap(SimRecords.from_rows(
    [base + 10 + i, f"4401032{i:08d}", f"sim-{i:06d}", f"device-{i:06d}",
     f"group-{i % 20:02d}", True, "session"]
    for i in range(n)
))

def reading(round_):
    # As kernel.device_sets hands it on: columns made straight from the kernel's answer,
    # no object per device.
    return DeviceReading(
        (base + 10 + i, 10 * i + round_ * (i % 3 == 0), 1000 * i, 5 * i, 500 * i,
         0.5 if i % 3 == 0 else 30.0 + round_)
        for i in range(n)
    )

kept = Path(tempfile.mkdtemp(prefix="bench-devices-")) / device_reading.FILE_NAME

class Source:  # as the daemon's LiveDevices: a fresh reading per call, kept joined on disk
    round = 0
    def traffic(self):
        if netns:
            from gatepeer.kernel import device_sets
            found = device_sets.device_reading(netns)
        else:
            found = reading(self.round)
        device_reading.keep(kept, found, now[0], sims)
        return found
    def sims(self):
        return sims

source = Source() if n else None
inputs_mb = status("VmRSS")  # the SIM map: what the daemon holds before any reading
# What build_registry makes (the device collector reading in the background, as in the
# daemon), on the bench's clock.
registry = CollectorRegistry(auto_describe=False)
found = collectors(FakeAgent(), FakeKernel(), FakePacketPath(FULL_COUNTERS), "bench",
                   devices=source, clock=lambda: now[0], devices_in_background=True)
for collector in found.values():
    registry.register(collector)
ProcessCollector(registry=registry)
generate_latest(registry)  # the first scrape waits for the first reading
scrape_ms, read_ms = [], []
for k in range(scrapes):
    now[0] += 30
    if source is not None:
        source.round = k + 1
        start = time.perf_counter()
        found["devices"].refresh()  # what the background thread does every 15 s or more
        read_ms.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    text = generate_latest(registry)
    scrape_ms.append((time.perf_counter() - start) * 1000)
shutil.rmtree(kept.parent)
print(json.dumps({"n": n, "scrape_ms": scrape_ms, "read_ms": read_ms or [0.0],
                  "rss_mb": status("VmRSS"), "hwm_mb": status("VmHWM"),
                  "inputs_mb": inputs_mb, "bytes": len(text)}))
"""


def measure(n: int, scrapes: int, netns: str | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), str(n), str(scrapes), *([netns] if netns else [])],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return dict(json.loads(proc.stdout))


def _spread(values: list[float]) -> str:
    """median (min-max)"""
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scrapes", type=int, default=5, help="timed scrapes per process")
    parser.add_argument("--devices", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument(
        "--kernel",
        action="store_true",
        help="read N addresses from both device sets in a namespace over netlink, as the "
        "daemon does, instead of making the columns (root; the counters stay zero)",
    )
    args = parser.parse_args()
    namespaces: dict[int, str] = {}
    try:
        if args.kernel:
            from bench_device_sets import fill

            for n in args.devices:
                namespaces[n] = f"bndm{secrets.token_hex(4)}"
                subprocess.run(["ip", "netns", "add", namespaces[n]], check=True)
                fill(namespaces[n], n)
        return _run(args, namespaces)
    finally:
        for ns in namespaces.values():
            subprocess.run(["ip", "netns", "delete", ns], check=False)


def _run(args: argparse.Namespace, namespaces: dict[int, str]) -> int:
    sizes = [0, *args.devices]
    samples: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for r in range(args.rounds):
        rest = args.devices[r % len(args.devices) :] + args.devices[: r % len(args.devices)]
        for n in [0, *rest]:
            result = measure(n, args.scrapes, namespaces.get(n))
            samples[n].append(result)
            scrape = statistics.median(result["scrape_ms"])
            print(
                f"round {r + 1}: {n:>7} devices: scrape {scrape:.1f} ms, reading"
                f" {statistics.median(result['read_ms']):.1f} ms, RSS {result['rss_mb']:.1f} MB",
                file=sys.stderr,
            )
    print(
        f"{'devices':>8} {'scrape ms':>20} {'reading ms (thread)':>22} {'RSS MB':>16}"
        f" {'peak MB':>16} {'inputs MB':>10}"
    )
    baseline_rss = statistics.median(s["rss_mb"] for s in samples[0])
    for n in sizes:
        scrape = [statistics.median(s["scrape_ms"]) for s in samples[n]]
        read = [statistics.median(s["read_ms"]) for s in samples[n]]
        rss = [s["rss_mb"] for s in samples[n]]
        hwm = [s["hwm_mb"] for s in samples[n]]
        inputs = statistics.median(s["inputs_mb"] for s in samples[n])
        print(
            f"{n:>8} {_spread(scrape):>20} {_spread(read):>22} {_spread(rss):>16}"
            f" {_spread(hwm):>16} {inputs - baseline_rss:>+10.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps({str(n): s for n, s in samples.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
