"""What the flow log costs route mode: the 64-byte packet rate through a route-mode peer with
the table gatepeer loads when `[flow_log] enabled` (device flows tracked by conntrack,
`PacketPathSpec.track_flows`) against the table without it (device <-> VPC untracked), both
directions, interleaved round by round in one lab (issue 19).

    sudo .venv/bin/python bench/bench_flow_tracking.py --rounds 5 --seconds 3

The two tables are loaded by `gatepeer apply` with and without `[flow_log]` and swapped in one
nft transaction before each sample (the method bench_packet_rate.py used for the device counters).
One UDP flow per sample (iperf3 -u -l 64 -b 0), so this is the per-packet cost of tracking,
not of logging: a flow's two records cost microseconds each, bounded by the rate limit.
`net.netfilter.nf_conntrack_acct` stays 1 for both (apply sets it, only `down` restores it).
Builds one lab and removes it at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from bench_packet_rate import iperf_server, lean_vpg, nft, udp64  # noqa: E402
from bench_throughput import DEVICE, VPC_HOST, config_path, gatepeer, lab, set_mode  # noqa: E402


@contextmanager
def table_swapped(ns: str, table: str, back: str) -> Iterator[None]:
    """`table` loaded in place of gatepeer's (one transaction), `back` put back after."""
    replace = "add table inet gatepeer\ndelete table inet gatepeer\n"
    nft(ns, "-f", "-", stdin=replace + table)
    try:
        yield
    finally:
        nft(ns, "-f", "-", stdin=replace + back)


def table_variants(prefix: str) -> tuple[str, str]:
    """The lab's route-mode table without and with the flow log's tracking."""
    path = config_path(prefix)
    plain = path.read_text()
    env = {"GATEPEER_CONFIG": str(path)}
    path.write_text(plain + "\n[flow_log]\nenabled = true\n")
    gatepeer("apply", ns=f"{prefix}-peer", env=env)
    tracked = nft(f"{prefix}-peer", "list", "table", "inet", "gatepeer")
    path.write_text(plain)
    gatepeer("apply", ns=f"{prefix}-peer", env=env)
    untracked = nft(f"{prefix}-peer", "list", "table", "inet", "gatepeer")
    assert tracked != untracked, "the flow log changed nothing in the table"
    return untracked, tracked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3)
    opts = ap.parse_args()
    results: dict[str, list[float]] = {}
    with lab(baseline=False) as p:
        set_mode(p, "route")
        lean_vpg(p)
        untracked, tracked = table_variants(p)
        peer = f"{p}-peer"
        cases = [(d, v) for d in ("up", "down") for v in ("untracked", "tracked")]
        for rnd in range(opts.rounds):
            for direction, variant in cases if rnd % 2 == 0 else list(reversed(cases)):
                if direction == "up":  # the device sends to the VPC host
                    client, server_ns, server, bind = f"{p}-dev", f"{p}-vpc", VPC_HOST, DEVICE
                else:  # the VPC host sends to the device
                    client, server_ns, server, bind = f"{p}-vpc", f"{p}-dev", DEVICE, VPC_HOST
                table = tracked if variant == "tracked" else untracked
                with iperf_server(server_ns, server), table_swapped(peer, table, untracked):
                    value = udp64(client, server, bind, opts.seconds, reverse=False)
                results.setdefault(f"{direction}_{variant}", []).append(value)
                print(f"round {rnd + 1} {direction:4} {variant:9} {value / 1e3:8.1f} kpps")
    print(f"\n# {benchlib.machine()}")
    print("| direction | untracked kpps | tracked kpps | tracked / untracked (median, min-max) |")
    print("|---|---:|---:|---:|")
    for direction in ("up", "down"):
        plain, track = results[f"{direction}_untracked"], results[f"{direction}_tracked"]
        ratios = [t / u for t, u in zip(track, plain, strict=True)]
        print(
            f"| {direction} | {statistics.median(plain) / 1e3:.1f} | "
            f"{statistics.median(track) / 1e3:.1f} | {statistics.median(ratios):.1%} "
            f"({min(ratios):.1%} - {max(ratios):.1%}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
