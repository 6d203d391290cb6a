"""64-byte packet rate of gatepeer against the same job done by hand, both modes, both
directions, in the same run (issue 18, "The packet rate, both modes").

Pairs, each gatepeer case measured right next to its baseline (the baseline first in every
other round):

| case            | direction                           | what carries it                          |
|-----------------|-------------------------------------|------------------------------------------|
| hand_route_down | VPC host -> device                  | the hand-made tunnel + ip_forward        |
| route_down      | VPC host -> device                  | gatepeer `mode = "route"`                |
| hand_route_up   | device -> VPC host                  | the hand-made tunnel + ip_forward        |
| route_up        | device -> VPC host                  | gatepeer `mode = "route"`                |
| hand_nat_up     | device -> VPC host                  | tunnel + one masquerade rule (fck-nat's) |
| nat_up          | device -> VPC host                  | gatepeer `mode = "nat"`                  |
| hand_nat_down   | VPC host -> device, replies         | tunnel + one masquerade rule             |
| nat_down        | VPC host -> device, replies         | gatepeer `mode = "nat"`                  |

In nat mode the VPC cannot open anything towards a device (it does not know the devices'
addresses), so "VPC host -> device" is the reply half of a flow the device opened: iperf3 `-R`
from the device, the VPC host sending. Every one of those packets is de-NATed by conntrack,
which is the job a NAT does in that direction.

`--counters` adds, per mode and direction, gatepeer with `packet_path.device_counters = true`
(`*_counters`, compared with gatepeer without them in the same round: the counters' cost).

`--ablation` adds, per mode and direction, the gatepeer lab with its nftables table deleted and
its sysctls kept (nat: plus the one masquerade rule, or nothing would be translated): what the
table itself costs (`*_notable`, compared with the same hand-made baseline).

Sizing: each measurement is `iperf3 -u -l 64 -b 0` for --seconds, packets/s received (sent -
lost). On these veth labs one sender drives the whole path in its own softirq, so every hop's
work adds up on one CPU: the lab's VPG stand-in carries an nftables table with conntrack (its
NAT to the internet) that the tunnel's packets cross too. That dilutes the peer's share of the
per-packet cost and pushes every ratio towards 1, so by default the bench deletes that table
from the VPG stand-ins of all labs (the device <-> VPC path does not use it); `--keep-vpg-nat`
keeps it, to reproduce the earlier figures.

    sudo .venv/bin/python bench/bench_packet_rate.py [--rounds 7] [--seconds 3] [--ablation]
        [--counters] [--only route|nat] [--json out.json]

Builds three labs under fresh prefixes and removes them at the end (also on failure/Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from bench_throughput import DEVICE, VPC_HOST, config_path, gatepeer, lab, set_mode  # noqa: E402

from gatepeer.lab.network.layout import VPG_NAT_TABLE  # noqa: E402

# gatepeer case -> its baseline; the ablation cases share the baseline of their mode/direction.
PAIRS = {
    "route_down": "hand_route_down",
    "route_up": "hand_route_up",
    "nat_up": "hand_nat_up",
    "nat_down": "hand_nat_down",
}
ABLATION = {f"{case}_notable": base for case, base in PAIRS.items()}
COUNTERS = {f"{case}_counters": case for case in PAIRS}
TARGET = 0.95
MASQUERADE = """
table ip fcknat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "eth0" masquerade
    }
}
"""


def nft(ns: str, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args], input=stdin, text=True, check=True,
        capture_output=True,
    ).stdout  # fmt: skip


@contextmanager
def masquerade(ns: str) -> Iterator[None]:
    nft(ns, "-f", "-", stdin=MASQUERADE)
    try:
        yield
    finally:
        nft(ns, "delete", "table", "ip", "fcknat")


@contextmanager
def without_table(ns: str, nat: bool) -> Iterator[None]:
    """gatepeer's table deleted (its sysctls stay), put back as it was listed."""
    listed = nft(ns, "list", "table", "inet", "gatepeer")
    nft(ns, "delete", "table", "inet", "gatepeer")
    try:
        if nat:
            with masquerade(ns):
                yield
        else:
            yield
    finally:
        nft(ns, "-f", "-", stdin=listed)


def device_table(prefix: str) -> tuple[str, str]:
    """(name, definition) of the device counters' table gatepeer loads with
    `device_counters = true` (a table of its own); the lab is put back without it."""
    path = config_path(prefix)
    plain = path.read_text()
    env = {"GATEPEER_CONFIG": str(path)}
    path.write_text(plain.replace("[packet_path]\n", "[packet_path]\ndevice_counters = true\n"))
    gatepeer("apply", ns=f"{prefix}-peer", env=env)
    tables = nft(f"{prefix}-peer", "list", "tables").split()
    name = next(t for t in tables if t.startswith("gatepeer_dev_"))
    definition = nft(f"{prefix}-peer", "list", "table", "inet", name)
    path.write_text(plain)
    gatepeer("apply", ns=f"{prefix}-peer", env=env)
    assert name not in nft(f"{prefix}-peer", "list", "tables")
    return name, definition


@contextmanager
def with_device_table(ns: str, name: str, definition: str) -> Iterator[None]:
    nft(ns, "-f", "-", stdin=definition)
    try:
        yield
    finally:
        nft(ns, "delete", "table", "inet", name)


@contextmanager
def iperf_server(ns: str, addr: str) -> Iterator[None]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "iperf3", "-s", "-B", addr],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # `ip netns exec` execs: this is iperf3's pid
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def udp64(ns: str, server: str, bind: str, seconds: int, reverse: bool) -> float:
    """Packets/s received: `iperf3 -u -l 64 -b 0`, the server sending when `reverse`."""
    args = ["iperf3", "-c", server, "-B", bind, "-t", str(seconds), "-J"]
    args += ["-u", "-l", "64", "-b", "0"] + (["-R"] if reverse else [])
    for _attempt in range(3):
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, *args], capture_output=True, text=True,
            timeout=seconds + 30,
        )  # fmt: skip
        if proc.returncode == 0:
            break
        time.sleep(1)  # the server may still be finishing the previous test
    else:
        raise SystemExit(f"iperf3 in {ns} failed:\n{proc.stdout[-1500:]}{proc.stderr}")
    s = json.loads(proc.stdout)["end"]["sum"]
    return float((s["packets"] - s["lost_packets"]) / s["seconds"])


def lean_vpg(prefix: str) -> None:
    """Delete the lab's VPG NAT table (and with it conntrack) in every endpoint namespace."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    for line in names.stdout.splitlines():
        ns = line.split()[0]
        if ns.startswith(f"{prefix}-vpg"):
            subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "delete", "table", "ip", VPG_NAT_TABLE],
                capture_output=True, check=False,
            )  # fmt: skip


def spread(values: list[float]) -> str:
    return f"{min(values):.1%} - {max(values):.1%}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--only", choices=("route", "nat"), help="this mode and its baselines only")
    ap.add_argument("--ablation", action="store_true", help="also each mode without its table")
    ap.add_argument("--counters", action="store_true", help="also with device_counters on")
    ap.add_argument("--keep-vpg-nat", action="store_true", help="leave the VPG stand-in's table")
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    started = time.monotonic()
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    results: dict[str, list[float]] = {}
    rulesets: dict[str, str] = {}
    with lab(baseline=True) as hand, lab(baseline=False) as gpr, lab(baseline=False) as gpn:
        set_mode(gpr, "route")
        set_mode(gpn, "nat")
        if not opts.keep_vpg_nat:
            for prefix in (hand, gpr, gpn):
                lean_vpg(prefix)
        variants = {}
        if opts.counters:
            variants = {"route": device_table(gpr), "nat": device_table(gpn)}
        rulesets["route"] = nft(f"{gpr}-peer", "list", "ruleset")
        rulesets["nat"] = nft(f"{gpn}-peer", "list", "ruleset")
        peer = {"hand": f"{hand}-peer", "route": f"{gpr}-peer", "nat": f"{gpn}-peer"}
        prefix = {"hand": hand, "route": gpr, "nat": gpn}

        def measure(case: str) -> float:
            kind = case.split("_")[0 if not case.startswith("hand") else 1]
            lab_of = "hand" if case.startswith("hand") else kind
            p = prefix[lab_of]
            down = "_down" in case
            reverse = kind == "nat" and down
            if down and not reverse:  # route: the VPC host opens and sends
                client, server_ns, server, bind = f"{p}-vpc", f"{p}-dev", DEVICE, VPC_HOST
            else:  # the device opens; in nat's down direction the VPC host sends (-R)
                client, server_ns, server, bind = f"{p}-dev", f"{p}-vpc", VPC_HOST, DEVICE
            with iperf_server(server_ns, server):
                if lab_of == "hand" and kind == "nat":
                    with masquerade(peer["hand"]):
                        return udp64(client, server, bind, opts.seconds, reverse)
                if case.endswith("_notable"):
                    with without_table(peer[lab_of], nat=kind == "nat"):
                        return udp64(client, server, bind, opts.seconds, reverse)
                if case.endswith("_counters"):
                    with with_device_table(peer[lab_of], *variants[kind]):
                        return udp64(client, server, bind, opts.seconds, reverse)
                return udp64(client, server, bind, opts.seconds, reverse)

        groups = [
            [base, case]
            + ([f"{case}_counters"] if opts.counters else [])
            + ([f"{case}_notable"] if opts.ablation else [])
            for case, base in PAIRS.items()
            if not opts.only or case.startswith(opts.only)
        ]
        for rnd in range(opts.rounds):
            order = groups if rnd % 2 == 0 else [list(reversed(g)) for g in reversed(groups)]
            for case in (c for g in order for c in g):
                value = measure(case)
                results.setdefault(case, []).append(value)
                print(f"round {rnd + 1} {case:22} {value / 1e3:8.1f} kpps", flush=True)

    load_end = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\n# {benchlib.machine()}")
    print(f"# load average at start {' '.join(load_start)}, at end {' '.join(load_end)}")
    vpg = "kept" if opts.keep_vpg_nat else "deleted"
    print(
        f"# {opts.rounds} rounds of {opts.seconds} s, iperf3 -u -l 64 -b 0, kpps received; "
        f"VPG stand-in's NAT table {vpg}\n"
    )
    print("| case | median kpps | min - max | baseline | median of per-round ratios | spread |")
    print("|---|---:|---:|---|---:|---:|")
    ratios: dict[str, float] = {}
    for case, values in results.items():
        base = {**PAIRS, **ABLATION, **COUNTERS}.get(case)
        cells = ["", "", ""]
        if base and base in results:
            per_round = [a / b for a, b in zip(values, results[base], strict=True)]
            ratios[case] = statistics.median(per_round)
            cells = [base, f"{ratios[case]:.1%}", spread(per_round)]
        print(
            f"| {case} | {statistics.median(values) / 1e3:.1f} | {min(values) / 1e3:.1f} - "
            f"{max(values) / 1e3:.1f} | {' | '.join(cells)} |"
        )
    verdict = {c: ratios[c] >= TARGET for c in PAIRS if c in ratios}
    print(f"\ntargets (>= {TARGET:.0%}) met: {verdict}; took {time.monotonic() - started:.0f} s")
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    "samples": results,
                    "ratios": ratios,
                    "rulesets": rulesets,
                    "load": [load_start, load_end],
                    "machine": benchlib.machine(),
                    "vpg_nat": vpg,
                },
                indent=1,
            )  # fmt: skip
        )
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
