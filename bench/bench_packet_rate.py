"""64-byte packet rate of gatepeer against the setups it replaces, in the same run (issue 9,
"Must show" 7):

- handmade:      the hand-made tunnel (`lab up --baseline`), VPC host -> device. route's baseline.
- handmade_masq: the same tunnel plus one masquerade rule out of the ENI, as fck-nat does
                 (`iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE`, here in nftables),
                 device -> VPC host. nat's baseline: what nat mode really replaces.
- handmade_up:   the hand-made tunnel without the rule, device -> VPC host (reference: the
                 cost of NAT itself).
- route:         gatepeer `mode = "route"` (default `outside_vpc = "masquerade"`: conntrack
                 is on for flows leaving the VPC, device <-> VPC traffic is `notrack`ed),
                 VPC host -> device.
- route_plain:   gatepeer route mode with `outside_vpc = "route"`: no conntrack at all (the
                 route mode table before issue 16), VPC host -> device. route / route_plain
                 per round is what keeping the VPC path stateless costs or saves.
- nat:           gatepeer `mode = "nat"`, device -> VPC host, masqueraded.

Each measurement is `iperf3 -u -l 64 -b 0` for --seconds, packets/s received (sent - lost over
the test's duration). Four labs (hand-made, gatepeer route, route_plain, nat), so nothing is
applied between measurements. Rounds are interleaved, each case measured right next to its
baseline (which goes first in every other round), so that load from elsewhere on a shared
machine hits a case and its baseline alike. Reports the median and min-max per case, the ratios
of medians nat / handmade_masq and route / handmade (targets: both >= 95 %), and the median of
the per-round ratios (pairs measured seconds apart: the steadier figure on a busy machine).

    sudo .venv/bin/python bench/bench_packet_rate.py [--rounds 7] [--seconds 3] [--json out.json]

Builds three labs under fresh prefixes and removes them at the end (also on failure/Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from bench_throughput import DEVICE, VPC_HOST, iperf, iperf_server, lab, set_mode  # noqa: E402

CASES = ("handmade", "handmade_masq", "handmade_up", "route", "route_plain", "nat")
BASELINE = {"route": "handmade", "nat": "handmade_masq"}
TARGET = 0.95
MASQUERADE = """
table ip fcknat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "eth0" masquerade
    }
}
"""


def nft(ns: str, *args: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=stdin, text=True, check=True)


def ruleset(ns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument(
        "--only", choices=("route", "nat"), help="measure this mode and its baseline only"
    )
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    started = time.monotonic()
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    results: dict[str, list[float]] = {c: [] for c in CASES}
    rulesets: dict[str, str] = {}
    # One lab per gatepeer mode: no apply runs between the measurements.
    with (
        lab(baseline=True) as hand,
        lab(baseline=False) as gpr,
        lab(baseline=False) as gpp,
        lab(baseline=False) as gpn,
    ):
        set_mode(gpr, "route")
        set_mode(gpp, "route", outside_vpc="route")
        set_mode(gpn, "nat")
        rulesets["route"], rulesets["nat"] = ruleset(f"{gpr}-peer"), ruleset(f"{gpn}-peer")
        rulesets["route_plain"] = ruleset(f"{gpp}-peer")
        # (client ns, server ns, server address, client source) per case.
        where = {
            "handmade": (f"{hand}-vpc", f"{hand}-dev", DEVICE, VPC_HOST),
            "handmade_masq": (f"{hand}-dev", f"{hand}-vpc", VPC_HOST, DEVICE),
            "handmade_up": (f"{hand}-dev", f"{hand}-vpc", VPC_HOST, DEVICE),
            "route": (f"{gpr}-vpc", f"{gpr}-dev", DEVICE, VPC_HOST),
            "route_plain": (f"{gpp}-vpc", f"{gpp}-dev", DEVICE, VPC_HOST),
            "nat": (f"{gpn}-dev", f"{gpn}-vpc", VPC_HOST, DEVICE),
        }
        for rnd in range(opts.rounds):
            # Each case right next to its baseline, which goes first in every other round.
            pairs = [
                ["handmade", "route", "route_plain"],
                ["handmade_masq", "nat"],
                ["handmade_up"],
            ]
            if rnd % 2:
                pairs = [list(reversed(p)) for p in reversed(pairs)]
            if opts.only:
                pairs = [p for p in pairs if opts.only in p]
            for case in [c for p in pairs for c in p]:
                if case == "handmade_masq":
                    nft(f"{hand}-peer", "-f", "-", stdin=MASQUERADE)
                    rulesets.setdefault(case, ruleset(f"{hand}-peer"))
                try:
                    client, server_ns, server, bind = where[case]
                    with iperf_server(server_ns, server):
                        value = iperf(client, server, bind, "udp64", opts.seconds)
                finally:
                    if case == "handmade_masq":
                        nft(f"{hand}-peer", "delete", "table", "ip", "fcknat")
                results[case].append(value)
                print(f"round {rnd + 1} {case:14} {value / 1e3:8.1f} kpps", flush=True)

    load_end = Path("/proc/loadavg").read_text().split()[:3]
    results = {c: v for c, v in results.items() if v}
    med = {c: statistics.median(v) for c, v in results.items()}
    print(f"\n# {benchlib.machine()}")
    print(f"# load average at start {' '.join(load_start)}, at end {' '.join(load_end)}")
    print(f"# {opts.rounds} rounds of {opts.seconds} s, iperf3 -u -l 64 -b 0, kpps received\n")
    print("| case | median kpps | min - max | vs baseline | target |")
    print("|---|---:|---:|---:|---|")
    verdict = {}
    for case in results:
        values = results[case]
        ratio = ""
        target = ""
        if case in BASELINE and BASELINE[case] in results:
            r = med[case] / med[BASELINE[case]]
            verdict[case] = r >= TARGET
            ratio = f"{r:.1%} of {BASELINE[case]}"
            target = f"≥ {TARGET:.0%}: {'met' if verdict[case] else 'MISSED'}"
        print(
            f"| {case} | {med[case] / 1e3:.1f} | {min(values) / 1e3:.1f} - "
            f"{max(values) / 1e3:.1f} | {ratio} | {target} |"
        )
    for case, base in BASELINE.items():
        if case not in results:
            continue
        per_round = [a / b for a, b in zip(results[case], results[base], strict=True)]
        print(
            f"\n{case} / {base} per round: "
            + ", ".join(f"{r:.0%}" for r in per_round)
            + f" (median {statistics.median(per_round):.1%})"
        )
    if results.get("route") and results.get("route_plain"):
        per_round = [a / b for a, b in zip(results["route"], results["route_plain"], strict=True)]
        print(
            "\nroute / route_plain per round: "
            + ", ".join(f"{r:.0%}" for r in per_round)
            + f" (median {statistics.median(per_round):.1%})"
        )
    print(f"\ntargets met: {verdict}; took {time.monotonic() - started:.0f} s")
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    "samples": results,
                    "median": med,
                    "rulesets": rulesets,
                    "load": [load_start, load_end],
                    "machine": benchlib.machine(),
                },
                indent=1,
            )  # fmt: skip
        )
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
