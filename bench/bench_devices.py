"""How long `gatepeer devices` takes with 10,000 devices, against `gatepeer status` measured in
the same run: the goal (issue 19) is under 1.5x status.

    sudo .venv/bin/python bench/bench_devices.py --devices 10000 --runs 20

A lab is built with per-device counters on (`packet_path.device_counters`), the peer set up
and `gatepeer run` started in its namespace. The emulator is given DEVICES named SIMs in session
on the lab's VPG; the daemon fetches them (100 pages of listSims) and keeps the map. Both device
sets of the nftables table get DEVICES elements, and conntrack holds --connections entries
from device addresses, so every part of the report has its full load. The daemon's metrics
listen on the peer's address; one scrape before the rounds (and an untimed one before each
round, as Prometheus would) makes it read the counters and keep the reading, which
`gatepeer devices` shows. Each round runs every variant once as a fresh process in the peer
namespace, the order alternating between rounds:

- devices         `gatepeer devices` (the daemon's kept reading)
- devices-json    `gatepeer devices --json`
- devices-live    `gatepeer devices --live` (reads both sets itself over netlink, as without a
                  daemon, and joins them with the SIM map)
- status          `gatepeer status` (the baseline)
- nft-list-sets, conntrack-L, python: the two nft listings `--live` made before it read the
  sets over netlink (`kernel.device_sets`), the conntrack dump and the interpreter's
  start-up, alone (where the time goes; not in the ratio)

Prints medians and quartiles and the ratios devices / status; --json FILE keeps every sample.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import ms, summary, timed  # noqa: E402

from gatepeer.lab.network.layout import PEER_ADDR  # noqa: E402
from gatepeer.ruleset import DEVICE_TABLE_PREFIX  # noqa: E402

METRICS_PORT = 8479
METRICS_URL = f"http://{PEER_ADDR}:{METRICS_PORT}/metrics"
FIRST_DEVICE = IPv4Address("198.19.128.1")  # the lab's device half starts here
VPC_HOST = "198.18.0.20"  # a destination for the conntrack entries (the lab's VPC side)
NFT_BATCH = 2_000  # elements per `nft add element` command
SIMS_PER_POST = 2_000


def post(url: str, doc: object) -> None:
    req = urllib.request.Request(
        url, data=json.dumps(doc).encode(), method="POST", headers={"Content-Type": "x"}
    )
    with urllib.request.urlopen(req, timeout=60) as answer:
        answer.read()


def load_sims(lab: benchlib.Lab, count: int) -> None:
    vpg_id = lab.info.credentials.vpg_id
    sims = [
        {
            "sim_id": f"89001{n:014d}",
            "imsi": f"00101{n:010d}",
            "name": f"bench-{n}",
            "group_id": "bench",
            "vpg_id": vpg_id,
            "address": str(FIRST_DEVICE + n),
        }
        for n in range(count)
    ]
    for start in range(0, count, SIMS_PER_POST):  # a control request holds at most 1 MiB
        batch = sims[start : start + SIMS_PER_POST]
        post(f"{lab.info.host_url}/_emulator/sims", {"sims": batch, "append": start > 0})


def device_table(lab: benchlib.Lab) -> str:
    """The device counters' table (`gatepeer_dev_<hash>`: the sets live in a table of their
    own, kept across reloads of the main one)."""
    listed = subprocess.run(
        lab.in_peer("nft", "list", "tables"), check=True, capture_output=True, text=True
    ).stdout.split()
    return next(word for word in listed if word.startswith(DEVICE_TABLE_PREFIX))


def fill_device_sets(lab: benchlib.Lab, count: int) -> None:
    table = device_table(lab)
    for name in ("devices_from", "devices_to"):
        for start in range(0, count, NFT_BATCH):
            elements = ", ".join(
                str(FIRST_DEVICE + n) for n in range(start, min(count, start + NFT_BATCH))
            )
            cmd = lab.in_peer("nft", "add", "element", "inet", table, name, f"{{ {elements} }}")
            subprocess.run(cmd, check=True, capture_output=True)


def fill_conntrack(lab: benchlib.Lab, count: int) -> None:
    for n in range(count):
        device = str(FIRST_DEVICE + n)
        subprocess.run(
            lab.in_peer(
                "conntrack", "-I", "-p", "tcp", "-s", device, "-d", VPC_HOST,
                "--sport", str(40000 + n % 20000), "--dport", "443",
                "--state", "ESTABLISHED", "-t", "3600", "-u", "ASSURED",
            ),
            check=True,
            capture_output=True,
        )  # fmt: skip


def wait_for_map(lab: benchlib.Lab, count: int, timeout: float = 120) -> float:
    started = time.monotonic()
    path = lab.paths.peer_sim_cache(1)
    while time.monotonic() - started < timeout:
        try:
            doc = json.loads(path.read_text())
            if len(doc.get("sims") or ()) == count:
                return time.monotonic() - started
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    sys.exit(f"the daemon did not keep {count} SIMs in {path} within {timeout:g}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=2_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args()

    names = (
        "devices",
        "devices-json",
        "devices-live",
        "status",
        "nft-list-sets",
        "conntrack-L",
        "python",
    )
    samples: dict[str, list[float]] = {k: [] for k in names}
    with benchlib.lab() as lab:
        config = lab.paths.config
        config.write_text(
            config.read_text()
            + "\n[packet_path]\ndevice_counters = true\n"
            + f'\n[metrics]\nlisten = "{PEER_ADDR}:{METRICS_PORT}"\n'
        )
        load_sims(lab, args.devices)
        timed(lab.gatepeer("apply"))
        daemon = benchlib.Daemon(lab, lab.paths.dir / "bench-daemon.log")
        try:
            fetch_s = wait_for_map(lab, args.devices)
            fill_device_sets(lab, args.devices)
            fill_conntrack(lab, args.connections)
            list_sets = "; ".join(
                f"nft -j list set inet {device_table(lab)} {name} >/dev/null"
                for name in ("devices_from", "devices_to")
            )
            scrape = lab.in_peer(
                sys.executable,
                "-c",
                f"import urllib.request; urllib.request.urlopen('{METRICS_URL}', timeout=60)",
            )
            subprocess.run(scrape, check=True)  # the first scrape waits for the first reading
            commands = {
                "devices": lab.gatepeer("devices"),
                "devices-json": lab.gatepeer("devices", "--json"),
                "devices-live": lab.gatepeer("devices", "--live"),
                "status": lab.gatepeer("status"),
                # Parts of `devices`, for where its time goes (not in the ratio):
                "nft-list-sets": lab.in_peer("sh", "-c", list_sets),
                "conntrack-L": lab.in_peer("sh", "-c", "conntrack -L -f ipv4 >/dev/null 2>&1"),
                "python": lab.in_peer(sys.executable, "-c", "pass"),
            }
            for command in commands.values():  # warm the page cache; not counted
                timed(command)
            shown = subprocess.run(commands["devices-json"], capture_output=True, text=True)
            report = json.loads(shown.stdout)
            seen, with_traffic = (
                len(report["devices"]),
                sum(1 for d in report["devices"] if d["packets_from_device"] is not None),
            )
            connections = sum(d["connections"] or 0 for d in report["devices"])
            traffic_source = report["traffic"]["source"]
            order = list(commands)
            for round_ in range(args.runs):
                subprocess.run(scrape, check=True)  # not timed; keeps the reading recent
                for name in order if round_ % 2 == 0 else reversed(order):
                    samples[name].append(timed(commands[name]))
        finally:
            daemon.stop()

    print(f"# {benchlib.machine()}")
    print(
        f"# {args.devices} SIMs (fetched in {fetch_s:.1f}s), {seen} devices shown, "
        f"{with_traffic} with counters ({traffic_source}'s), {connections} connections counted"
    )
    print(f"# {args.runs} runs each, every one a new process in the peer namespace, interleaved")
    print("# medians (p25 - p75)")
    stats = {name: summary(values) for name, values in samples.items()}
    for name, s in stats.items():
        print(f"{name:<14} {ms(s['median']):>9}   ({ms(s['p25'])} - {ms(s['p75'])})")
    base = stats["status"]["median"]
    print(f"\ndevices / status = {stats['devices']['median'] / base:.2f}")
    print(f"devices --json / status = {stats['devices-json']['median'] / base:.2f}")
    print(f"devices --live / status = {stats['devices-live']['median'] / base:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": benchlib.machine(), "samples": samples}))


if __name__ == "__main__":
    main()
