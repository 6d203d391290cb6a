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

`--variant NAME` (repeatable) adds, per mode and direction, the gatepeer lab changed one way
for the measurement and put back after it (`*_NAME`, compared with the hand-made baseline and
with gatepeer unchanged in the same round), to find where the points go:

    aa            nothing changed: gatepeer against itself, the noise floor of a ratio
    rpf0          rp_filter 0 on the tunnel and the underlay (gatepeer sets 2: loose)
    stateless     route mode only: the table of `outside_vpc = "route"` (no `ct`, no NAT)
    noinput       the input chain deleted (the VXLAN checks and the host protection)
    noprerouting  the prerouting chain deleted (spoof check, outer fragments, `notrack`s)
    noforward     the forward chain deleted (MSS clamp, allow-list, closed)
    nooutput      the output chain deleted (the outer packets' `notrack` on their way out)
    nonat         the postrouting (NAT) chain deleted
    emptychains   every filter base chain kept with no rule, every other chain deleted; nat
                  mode keeps its masquerade chain, route mode has none (so no conntrack): what
                  the hooks cost without the rules
    file:PATH     the table in PATH loaded in place of gatepeer's (`table inet gatepeer`), to
                  try a candidate ruleset against the loaded one before rendering it

Sizing: each measurement is `iperf3 -u -l 64 -b 0` for --seconds, packets/s received (sent -
lost). On these veth labs one sender drives the whole path in its own softirq, so every hop's
work adds up on one CPU: the lab's VPG stand-in carries an nftables table with conntrack (its
NAT to the internet) that the tunnel's packets cross too. That dilutes the peer's share of the
per-packet cost and pushes every ratio towards 1, so by default the bench deletes that table
from the VPG stand-ins of all labs (the device <-> VPC path does not use it); `--keep-vpg-nat`
keeps it, to reproduce the earlier figures.

    sudo .venv/bin/python bench/bench_packet_rate.py [--rounds 7] [--seconds 3] [--ablation]
        [--counters] [--variant NAME ...] [--only route|nat] [--direction up|down]
        [--alternate SLICE] [--json out.json]

`--alternate SLICE` measures differently, for effects smaller than this machine's noise between
separate runs: per mode and direction one iperf3 stream runs through the gatepeer lab while the
lab is switched between its states every SLICE seconds (gatepeer as applied; the hand-made
setup in the same lab: gatepeer's table removed, nat: the one masquerade rule instead, and
`rp_filter` as the hand-made lab has it; the `--counters`, `--ablation` and `--variant` states),
each state's rate read from the receiver's interface counters; --rounds cycles through all
states, the order reversed every other cycle, and each ratio is the median of per-cycle ratios.
Both states of a ratio then share the sender, the lab and the moment.

Builds three labs under fresh prefixes and removes them at the end (also on failure/Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

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
    """gatepeer's table deleted (its sysctls stay), put back as it was listed; nat: the one
    masquerade rule instead, in the same transaction (flows keep being translated)."""
    listed = nft(ns, "list", "table", "inet", "gatepeer")
    nft(ns, "-f", "-", stdin="delete table inet gatepeer\n" + (MASQUERADE if nat else ""))
    try:
        yield
    finally:
        nft(ns, "-f", "-", stdin=("delete table ip fcknat\n" if nat else "") + listed)


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
def replaced_table(ns: str, text: str) -> Iterator[None]:
    """`table inet gatepeer` replaced by `text` (one transaction), put back as it was listed."""
    listed = nft(ns, "list", "table", "inet", "gatepeer")
    swap = "add table inet gatepeer\ndelete table inet gatepeer\n"
    nft(ns, "-f", "-", stdin=swap + text)
    try:
        yield
    finally:
        nft(ns, "-f", "-", stdin=swap + listed)


@contextmanager
def without_chain(ns: str, chain: str) -> Iterator[None]:
    """One chain of `table inet gatepeer` deleted (its hook unregistered with it)."""
    listed = nft(ns, "list", "table", "inet", "gatepeer")
    text = re.sub(rf"\n\tchain {chain} {{\n.*?\n\t}}\n", "\n", listed, flags=re.S)
    if text == listed:
        raise SystemExit(f"no chain {chain} in the table of {ns}")
    with replaced_table(ns, text):
        yield


@contextmanager
def sysctls_set(ns: str, values: dict[str, int]) -> Iterator[None]:
    read = ["ip", "netns", "exec", ns, "sysctl", "-n"]
    before = {k: subprocess.run([*read, k], capture_output=True, text=True, check=True).stdout
              for k in values}  # fmt: skip
    write = ["ip", "netns", "exec", ns, "sysctl", "-q", "-w"]
    subprocess.run([*write, *(f"{k}={v}" for k, v in values.items())], check=True)
    try:
        yield
    finally:
        subprocess.run([*write, *(f"{k}={v.strip()}" for k, v in before.items())], check=True)


def config_table(prefix: str, extra: str) -> str:
    """`table inet gatepeer` as gatepeer renders it with `extra` lines in [packet_path]; the
    lab is put back as it was."""
    path = config_path(prefix)
    plain = path.read_text()
    env = {"GATEPEER_CONFIG": str(path)}
    path.write_text(plain.replace("[packet_path]\n", f"[packet_path]\n{extra}"))
    try:
        gatepeer("apply", ns=f"{prefix}-peer", env=env)
        return nft(f"{prefix}-peer", "list", "table", "inet", "gatepeer")
    finally:
        path.write_text(plain)
        gatepeer("apply", ns=f"{prefix}-peer", env=env)


CHAIN_VARIANTS = {
    "noinput": "input",
    "noprerouting": "prerouting",
    "noforward": "forward",
    "nooutput": "output",
    "nonat": "postrouting",
}
VARIANTS = ("aa", "rpf0", "stateless", "emptychains", *CHAIN_VARIANTS)


def empty_chains(listed: str, nat: bool) -> str:
    """The table `listed` with its base chains emptied and its other chains deleted (nat: the
    postrouting chain kept whole)."""

    def chain(m: re.Match[str]) -> str:
        name, body = m.group(1), m.group(2)
        hook = re.search(r"\t\ttype .*\n", body)
        if name == "postrouting":  # route: no NAT chain, or conntrack would track everything
            return m.group(0) if nat else "\n"
        return f"\n\tchain {name} {{\n{hook.group(0)}\t}}\n" if hook else "\n"

    return re.sub(r"\n\tchain (\w+) \{\n(.*?)\n\t\}\n", chain, listed, flags=re.S)


@contextmanager
def emptied(ns: str, nat: bool) -> Iterator[None]:
    listed = nft(ns, "list", "table", "inet", "gatepeer")
    with replaced_table(ns, empty_chains(listed, nat)):
        yield


def variant_name(spec: str) -> str:
    """The case suffix of a --variant: its name, or the file's stem for file:PATH."""
    if spec.startswith("file:"):
        return "file_" + Path(spec[5:]).stem.replace("-", "_")
    if spec not in VARIANTS:
        raise SystemExit(f"--variant: {spec!r} is none of {', '.join(VARIANTS)}, file:PATH")
    return spec


def variant(spec: str, ns: str, prefix: str, kind: str, tables: dict[str, str]) -> Any:
    """The context manager that changes the gatepeer lab `prefix` for one measurement."""
    if spec == "aa":
        return nullcontext()
    if spec == "rpf0":
        names = ("vxlan0", "eth0")
        return sysctls_set(ns, {f"net.ipv4.conf.{n}.rp_filter": 0 for n in names})
    if spec in CHAIN_VARIANTS:
        return without_chain(ns, CHAIN_VARIANTS[spec])
    if spec == "emptychains":
        return emptied(ns, nat=kind == "nat")
    return replaced_table(ns, tables[f"{kind}:{spec}"])


def applies(spec: str, case: str, tables: dict[str, str]) -> bool:
    """Whether a --variant has a meaning for `case`: the table variants only for a mode they
    have a table for (`stateless`: route; `file:PATH`: the mode PATH's name starts with)."""
    if spec == "stateless" or spec.startswith("file:"):
        return f"{case.split('_')[0]}:{spec}" in tables
    return True


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
        stop(proc)


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


def rx_packets(pid: int) -> int:
    """Packets received on every interface but lo of the network namespace `pid` is in."""
    total = 0
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]:
        name, counters = line.split(":", 1)
        if name.strip() != "lo":
            total += int(counters.split()[1])
    return total


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)  # `ip netns exec` execs: this is iperf3's pid
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def alternate(
    states: dict[str, Any],
    client: str,
    server_ns: str,
    server: str,
    bind: str,
    reverse: bool,
    cycles: int,
    slice_s: float,
) -> dict[str, list[float]]:
    """One stream, the lab switched between `states` (name -> context manager factory) every
    `slice_s`: packets/s received in each state, one value per cycle."""
    rates: dict[str, list[float]] = {name: [] for name in states}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-B", server],
                           **quiet)  # type: ignore[call-overload]  # fmt: skip
    time.sleep(0.3)
    args = ["iperf3", "-c", server, "-B", bind, "-t", "3600", "-u", "-l", "64", "-b", "0"]
    cli = subprocess.Popen(["ip", "netns", "exec", client, *args, *(["-R"] if reverse else [])],
                           **quiet)  # type: ignore[call-overload]  # fmt: skip
    receiver = cli.pid if reverse else srv.pid
    try:
        time.sleep(1)
        names = list(states)
        for cycle in range(cycles):
            for name in names if cycle % 2 == 0 else names[::-1]:
                with states[name]():
                    time.sleep(0.1)  # the switch done, the queues refilled
                    before, t0 = rx_packets(receiver), time.monotonic()
                    time.sleep(slice_s)
                    after, t1 = rx_packets(receiver), time.monotonic()
                rates[name].append((after - before) / (t1 - t0))
            if cli.poll() is not None:
                raise SystemExit(f"the iperf3 stream in {client} stopped")
            line = " ".join(f"{n} {rates[n][-1] / 1e3:.1f}" for n in names)
            print(f"cycle {cycle + 1}: {line} kpps", flush=True)
    finally:
        stop(cli)
        stop(srv)
    return rates


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


def table(
    results: dict[str, list[float]], unit: str, baseline_of: dict[str, str], own_of: dict[str, str]
) -> dict[str, float]:
    """Print the medians and per-round ratios of `results` as a Markdown table; the ratios."""
    print(
        f"| case | median {unit} | min - max | baseline | median of per-round ratios | spread "
        "| vs gatepeer (spread) |"
    )
    print("|---|---:|---:|---|---:|---:|---:|")
    ratios: dict[str, float] = {}
    for case, values in results.items():
        base = baseline_of.get(case)
        cells = ["", "", "", ""]
        if base and base in results:
            per_round = [a / b for a, b in zip(values, results[base], strict=True)]
            ratios[case] = statistics.median(per_round)
            cells[:3] = [base, f"{ratios[case]:.1%}", spread(per_round)]
        own = own_of.get(case)
        if own in results:
            per_round = [a / b for a, b in zip(values, results[own], strict=True)]
            ratios[f"{case}/{own}"] = statistics.median(per_round)
            cells[3] = f"{statistics.median(per_round):.1%} ({spread(per_round)})"
        print(
            f"| {case} | {statistics.median(values) / 1e3:.1f} | {min(values) / 1e3:.1f} - "
            f"{max(values) / 1e3:.1f} | {' | '.join(cells)} |"
        )
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--only", choices=("route", "nat"), help="this mode and its baselines only")
    ap.add_argument("--ablation", action="store_true", help="also each mode without its table")
    ap.add_argument("--counters", action="store_true", help="also with device_counters on")
    ap.add_argument("--keep-vpg-nat", action="store_true", help="leave the VPG stand-in's table")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME",
        help=f"also gatepeer changed: {', '.join(VARIANTS)}, file:PATH",
    )
    ap.add_argument("--direction", choices=("up", "down"), help="this direction only")
    ap.add_argument("--alternate", type=float, metavar="SLICE", help="switch states in one stream")
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
        names = {variant_name(v): v for v in opts.variant}
        tables: dict[str, str] = {}
        for spec in names.values():
            if spec == "stateless":
                tables["route:stateless"] = config_table(gpr, 'outside_vpc = "route"\n')
            elif spec.startswith("file:"):
                text = Path(spec[5:]).read_text()
                for kind in ("route", "nat"):
                    if Path(spec[5:]).name.startswith(kind):
                        tables[f"{kind}:{spec}"] = text
        rulesets["route"] = nft(f"{gpr}-peer", "list", "ruleset")
        rulesets["nat"] = nft(f"{gpn}-peer", "list", "ruleset")
        peer = {"hand": f"{hand}-peer", "route": f"{gpr}-peer", "nat": f"{gpn}-peer"}
        prefixes = {"hand": hand, "route": gpr, "nat": gpn}

        def measure(case: str) -> float:
            kind = case.split("_")[0 if not case.startswith("hand") else 1]
            lab_of = "hand" if case.startswith("hand") else kind
            p = prefixes[lab_of]
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
                suffix = case.split("_", 2)[2] if case.count("_") >= 2 else ""
                if suffix in names:
                    with variant(names[suffix], peer[lab_of], p, kind, tables):
                        return udp64(client, server, bind, opts.seconds, reverse)
                return udp64(client, server, bind, opts.seconds, reverse)

        groups = [
            [base, case]
            + ([f"{case}_counters"] if opts.counters else [])
            + ([f"{case}_notable"] if opts.ablation else [])
            + [f"{case}_{n}" for n, v in names.items() if applies(v, case, tables)]
            for case, base in PAIRS.items()
            if (not opts.only or case.startswith(opts.only))
            and (not opts.direction or case.endswith(opts.direction))
        ]
        derived = {f"{case}_{n}": case for case in PAIRS for n in names}
        hand_rp = {
            k: subprocess.run(
                ["ip", "netns", "exec", peer["hand"], "sysctl", "-n", k],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
            for k in ("net.ipv4.conf.vxlan0.rp_filter", "net.ipv4.conf.eth0.rp_filter")
        }  # fmt: skip

        print(f"# the hand-made lab's rp_filter: {hand_rp}", flush=True)

        @contextmanager
        def hand_in_lab(ns: str, nat: bool) -> Iterator[None]:
            with without_table(ns, nat), sysctls_set(ns, {k: int(v) for k, v in hand_rp.items()}):
                yield

        def state(case: str) -> Any:
            """The context manager that puts the gatepeer lab of `case` in its state."""
            kind = case.split("_")[1 if case.startswith("hand") else 0]
            ns = peer[kind]
            if case.startswith("hand"):
                return lambda: hand_in_lab(ns, nat=kind == "nat")
            if case.endswith("_notable"):
                return lambda: without_table(ns, nat=kind == "nat")
            if case.endswith("_counters"):
                return lambda: with_device_table(ns, *variants[kind])
            suffix = case.split("_", 2)[2] if case.count("_") >= 2 else ""
            if suffix in names:
                return lambda: variant(names[suffix], ns, prefixes[kind], kind, tables)
            return nullcontext

        for group in groups if opts.alternate else []:
            case = group[1]
            kind, down = case.split("_")[0], case.endswith("_down")
            p = prefixes[kind]
            reverse = kind == "nat" and down
            if down and not reverse:
                client, server_ns, server, bind = f"{p}-vpc", f"{p}-dev", DEVICE, VPC_HOST
            else:
                client, server_ns, server, bind = f"{p}-dev", f"{p}-vpc", VPC_HOST, DEVICE
            print(f"# {case}: states {', '.join(group)}", flush=True)
            got = alternate(
                {c: state(c) for c in group}, client, server_ns, server, bind, reverse,
                opts.rounds, opts.alternate,
            )  # fmt: skip
            results.update(got)
        for rnd in range(0 if opts.alternate else opts.rounds):
            order = groups if rnd % 2 == 0 else [list(reversed(g)) for g in reversed(groups)]
            for case in (c for g in order for c in g):
                value = measure(case)
                results.setdefault(case, []).append(value)
                print(f"round {rnd + 1} {case:22} {value / 1e3:8.1f} kpps", flush=True)

    load_end = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\n# {benchlib.machine()}")
    print(f"# load average at start {' '.join(load_start)}, at end {' '.join(load_end)}")
    vpg = "kept" if opts.keep_vpg_nat else "deleted"
    how = (
        f"{opts.rounds} cycles of {opts.alternate} s per state in one stream (the hand-made "
        "state in gatepeer's lab)"
        if opts.alternate
        else f"{opts.rounds} rounds of {opts.seconds} s"
    )
    print(f"# {how}, iperf3 -u -l 64 -b 0, kpps received; VPG stand-in's NAT table {vpg}\n")
    hand_of = {v: PAIRS[c] for v, c in derived.items()}
    baseline_of = {**PAIRS, **ABLATION, **COUNTERS, **hand_of}
    own_of = {**derived, **{c: c[: -len("_notable")] for c in ABLATION}}
    ratios = table(results, "kpps received", baseline_of, own_of)
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
