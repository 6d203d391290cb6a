"""Where a 64-byte packet's CPU time goes, gatepeer against the same job done by hand: `perf`
samples of the whole machine while one `iperf3 -u -l 64 -b 0` stream crosses the gate peer.

bench_packet_rate.py says how much slower gatepeer's path is; this says where the difference
is spent. Per mode and direction one stream runs through a gatepeer lab (as bench_packet_rate's
`--alternate` does) while the lab is put, round by round, in two states: gatepeer as applied,
and the hand-made path emulated in the same lab (gatepeer's table deleted, `rp_filter` 0 as
the hand-made lab has it; nat: the one masquerade rule instead). In each state `perf record -a`
samples every CPU for --seconds; the receiver's interface counters give the packets.

Reported per state, per packet received:
- the busiest CPU's time (the sender's CPU, which also runs the whole forwarding path in its
  softirq: the one that sets the rate);
- the time in netfilter (nf_*/nft_* functions, conntrack and NAT hooks) on every CPU;
- the netfilter functions that take most of it.

`--variant PATH` adds a third state: the table in PATH loaded in place of gatepeer's (the
fixtures' `route_*.nft` / `nat_*.nft`), to see what a candidate ruleset saves per packet, which
is steadier than the rate it buys.

    sudo .venv/bin/python bench/profile_packet_path.py [--rounds 2] [--seconds 4]
        [--only route|nat] [--direction up|down] [--variant PATH ...] [--json out.json]

Needs `perf` (Debian's linux-perf). Builds one lab per mode under a fresh prefix and removes it
at the end (also on failure or Ctrl-C); stops what it started by pid.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from bench_packet_rate import (  # noqa: E402
    lean_vpg,
    replaced_table,
    rx_packets,
    stop,
    sysctls_set,
    without_table,
)
from bench_throughput import DEVICE, VPC_HOST, lab, set_mode  # noqa: E402

FREQUENCY = 1999  # Hz per CPU: not a multiple of the kernel's tick
IDLE = {"pv_native_safe_halt", "native_safe_halt", "default_idle", "acpi_safe_halt",
        "intel_idle", "poll_idle", "cpu_idle_poll", "mwait_idle_with_hints"}  # fmt: skip
NETFILTER = re.compile(r"^_*(nft_|nf_|ipv4_conntrack|ipv4_confirm|nft\b|nf\b)")
HAND_RP = {"net.ipv4.conf.vxlan0.rp_filter": 0, "net.ipv4.conf.eth0.rp_filter": 0}


def samples(data: Path) -> list[tuple[int, str]]:
    """(cpu, symbol) of every sample in a `perf record` file."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "cpu,ip,sym"], capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    got = []
    for line in out.splitlines():
        m = re.match(r"\s*\[(\d+)\]\s+\S+\s+(\S+)", line)
        if m:
            got.append((int(m.group(1)), m.group(2)))
    return got


def profile(receiver: int, seconds: int, data: Path) -> dict[str, Any]:
    """Sample every CPU for `seconds`; packets received by `receiver`'s namespace meanwhile."""
    before, t0 = rx_packets(receiver), time.monotonic()
    subprocess.run(
        ["perf", "record", "-a", "-F", str(FREQUENCY), "-o", str(data), "--", "sleep",
         str(seconds)],
        capture_output=True, check=True,
    )  # fmt: skip
    packets = rx_packets(receiver) - before
    elapsed = time.monotonic() - t0
    busy: Counter[int] = Counter()
    netfilter: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    for cpu, sym in samples(data):
        if sym not in IDLE:
            busy[cpu] += 1
            functions[sym] += 1
            if NETFILTER.match(sym):
                netfilter[sym] += 1
    per_sample_us = 1e6 / FREQUENCY
    return {
        "kpps": packets / elapsed / 1e3,
        "busiest_cpu_us": busy.most_common(1)[0][1] * per_sample_us / packets if busy else 0.0,
        "all_cpus_us": sum(busy.values()) * per_sample_us / packets,
        "netfilter_us": sum(netfilter.values()) * per_sample_us / packets,
        "netfilter_top": {s: n * per_sample_us / packets for s, n in netfilter.most_common(8)},
        "functions": {s: n * per_sample_us / packets for s, n in functions.items()},
    }


def run_case(kind: str, direction: str, prefix: str, rounds: int, seconds: int, tmp: Path,
             tables: dict[str, str], rpf0: bool) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    ns = f"{prefix}-peer"
    reverse = kind == "nat" and direction == "down"
    if direction == "down" and not reverse:
        client, server_ns, server, bind = f"{prefix}-vpc", f"{prefix}-dev", DEVICE, VPC_HOST
    else:
        client, server_ns, server, bind = f"{prefix}-dev", f"{prefix}-vpc", VPC_HOST, DEVICE
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-B", server],
                           **quiet)  # type: ignore[call-overload]  # fmt: skip
    cli = None
    try:
        time.sleep(0.3)
        args = ["iperf3", "-c", server, "-B", bind, "-t", "3600", "-u", "-l", "64", "-b", "0"]
        cli = subprocess.Popen(["ip", "netns", "exec", client, *args, *(["-R"] if reverse else [])],
                               **quiet)  # type: ignore[call-overload]  # fmt: skip
        time.sleep(1)
        receiver = cli.pid if reverse else srv.pid

        @contextmanager
        def hand() -> Any:
            with without_table(ns, nat=kind == "nat"), sysctls_set(ns, HAND_RP):
                yield

        states = {"gatepeer": nullcontext, "hand": hand}
        for name, text in tables.items():  # candidate tables in place of gatepeer's
            states[name] = lambda text=text: replaced_table(ns, text)
        if rpf0:  # gatepeer's table, `rp_filter` 0 as the hand-made path has it
            states["rpf0"] = lambda: sysctls_set(ns, HAND_RP)
        got: dict[str, list[dict[str, Any]]] = {name: [] for name in states}
        for rnd in range(rounds):
            order = list(states) if rnd % 2 == 0 else list(states)[::-1]
            for name in order:
                with states[name]():
                    time.sleep(0.2)  # the switch done, the queues refilled
                    one = profile(receiver, seconds, tmp / f"{kind}_{direction}_{name}_{rnd}.data")
                got[name].append(one)
                print(f"{kind}_{direction} round {rnd + 1} {name:8} {one['kpps']:6.1f} kpps "
                      f"busiest CPU {one['busiest_cpu_us']:.2f} us/packet, netfilter "
                      f"{one['netfilter_us']:.2f} us/packet", flush=True)  # fmt: skip
            if cli.poll() is not None:
                raise SystemExit(f"the iperf3 stream in {client} stopped")
        return got
    finally:
        for proc in (cli, srv):
            if proc is not None:
                stop(proc)


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(case: str, got: dict[str, list[dict[str, Any]]]) -> None:
    gp, hand = got["gatepeer"], got["hand"]
    ratio = median(gp, "busiest_cpu_us") / median(hand, "busiest_cpu_us")
    print(
        f"\n## {case}: gatepeer's busiest CPU spends {ratio:.2f}x the hand-made path's per packet"
    )
    print("| state | kpps | busiest CPU us/packet | all CPUs us/packet | netfilter us/packet |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in got.items():
        cells = [median(rows, k) for k in ("kpps", "busiest_cpu_us", "all_cpus_us", "netfilter_us")]
        print(f"| {name} | {cells[0]:.1f} | {cells[1]:.2f} | {cells[2]:.2f} | {cells[3]:.2f} |")
    for name, rows in got.items():
        if name == "hand":
            continue
        top: Counter[str] = Counter()
        for row in rows:
            top.update({s: v / len(rows) for s, v in row["netfilter_top"].items()})
        print(f"{name}'s netfilter functions, us/packet: "
              + ", ".join(f"{s} {v:.3f}" for s, v in top.most_common(8)))  # fmt: skip
    # Every function's mean time per packet in each state: what grew, netfilter or not.
    means = {}
    for name, rows in got.items():
        total: Counter[str] = Counter()
        for row in rows:
            total.update({s: v / len(rows) for s, v in row["functions"].items()})
        means[name] = total
    grew = Counter({s: means["gatepeer"][s] - means["hand"].get(s, 0.0) for s in means["gatepeer"]})
    print("grew most per packet (gatepeer - hand), us: "
          + ", ".join(f"{s} {v:+.3f}" for s, v in grew.most_common(12)))  # fmt: skip
    fell = sorted(((v, s) for s, v in grew.items()))[:6]
    print("fell most: " + ", ".join(f"{s} {v:+.3f}" for v, s in fell))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--only", choices=("route", "nat"))
    ap.add_argument("--direction", choices=("up", "down"))
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="PATH",
        help="also a candidate table (`table inet gatepeer`) from PATH in place of gatepeer's, "
        "for the mode PATH's file name starts with; `rpf0`: gatepeer with rp_filter 0",
    )
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    results: dict[str, Any] = {}
    kinds = [opts.only] if opts.only else ["route", "nat"]
    directions = [opts.direction] if opts.direction else ["up", "down"]
    with tempfile.TemporaryDirectory(prefix="gatepeer-perf-") as tmp:
        for kind in kinds:
            with lab(baseline=False) as prefix:
                set_mode(prefix, kind)
                lean_vpg(prefix)
                for direction in directions:
                    case = f"{kind}_{direction}"
                    tables = {Path(v).stem: Path(v).read_text() for v in opts.variant
                              if Path(v).name.startswith(kind)}  # fmt: skip
                    results[case] = run_case(kind, direction, prefix, opts.rounds, opts.seconds,
                                             Path(tmp), tables, "rpf0" in opts.variant)  # fmt: skip
    print(f"\n# {benchlib.machine()}; perf at {FREQUENCY} Hz per CPU, medians of "
          f"{opts.rounds} rounds of {opts.seconds} s per state")  # fmt: skip
    for case, got in results.items():
        report(case, got)
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
