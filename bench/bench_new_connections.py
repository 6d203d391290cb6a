"""New TCP connections per second through nat mode, with and without conntrackd's sync, against
the hand-made NAT in the same run (issue 18): the figure a NAT is sized by.

- handmade_masq: the hand-made tunnel (`lab up --baseline`) plus one masquerade rule out of the
                 ENI, as fck-nat does: what nat mode replaces.
- nat:           gatepeer nat mode on peer 1 of a two-peer lab (`gatepeer apply` with the
                 lab's HA config: `snat ip to` the pair's NAT address, which the bench puts on
                 the peer's eth0 as keepalived would), no conntrackd.
- nat_sync:      the same with conntrackd running on both peers (the config `gatepeer ha render
                 --conntrackd` writes, FTFW over unicast): every connection's NEW, its update on
                 becoming assured and DESTROY go through conntrackd on peer 1 to peer 2's
                 external cache (gatepeer's table limits a synced flow's events to those).
- nat_sync_every_event: the same with that limit taken out of the table: conntrackd also gets
                 every TCP state change (SYN_RECV, ESTABLISHED, CLOSE), as before the limit.

The load is new_connections_probe.py: a device opens TCP connections to the VPC host as fast as
two processes with 32 connects in flight each can, and closes each with a reset as soon as the
handshake completes (every connection a new conntrack entry). Rounds are interleaved, the
order reversed every other round; the report gives medians, min-max, and the per-round ratios to
the baseline. conntrackd's CPU time over each nat_sync round and peer 2's external cache
(`conntrackd -s`) show that the sync did the work.

    sudo .venv/bin/python bench/bench_new_connections.py [--rounds 7] [--seconds 3] [--json F]

Builds two labs under fresh prefixes and removes them at the end (also on failure/Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from bench_packet_rate import MASQUERADE, nft, replaced_table  # noqa: E402
from bench_throughput import DEVICE, VPC_HOST, gatepeer, lab  # noqa: E402

from gatepeer.lab.network import netns  # noqa: E402
from gatepeer.lab.processes import ha_pair  # noqa: E402
from gatepeer.lab.record import LabRecord, Paths  # noqa: E402
from gatepeer.ruleset import SYNC_EVENTS  # noqa: E402

PROBE = str(Path(__file__).with_name("new_connections_probe.py"))
CASES = ("handmade_masq", "nat", "nat_sync", "nat_sync_every_event")
BASELINE = "handmade_masq"


@contextlib.contextmanager
def pair_lab() -> Iterator[str]:
    """`lab up --peers 2` under a fresh prefix; always removed (its conntrackds by pid first)."""
    prefix = f"bc{secrets.token_hex(2)}"
    try:
        gatepeer("lab", "up", "--peers", "2", "--prefix", prefix)
        yield prefix
    finally:
        gatepeer("lab", "down", "--prefix", prefix)


class Server:
    """new_connections_probe.py's accept-and-close server in the VPC host namespace, by pid."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, PROBE, "server", "--bind", VPC_HOST],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"connection server in {ns} did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 15)  # it stops its own workers
            self.proc.wait(10)


def measure(dev_ns: str, seconds: float) -> dict[str, float]:
    proc = subprocess.run(
        ["ip", "netns", "exec", dev_ns, sys.executable, PROBE, "client", "--target", VPC_HOST,
         "--bind", DEVICE, "--seconds", str(seconds)],
        capture_output=True, text=True, timeout=seconds + 90,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"connection client failed:\n{proc.stdout}{proc.stderr[-1500:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def external_entries(paths: Paths, ns: str, index: int) -> str:
    conf = paths.peer_file(index, "conntrackd.conf")
    out = netns.run(netns.exec_in(ns, [ha_pair.conntrackd_binary(), "-C", str(conf), "-s"]))
    return " ".join(ln.strip() for ln in out.stdout.splitlines() if "current active" in ln)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    started = time.monotonic()
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    results: dict[str, list[float]] = {c: [] for c in CASES}
    failed: dict[str, int] = dict.fromkeys(CASES, 0)
    sync_cpu: dict[str, list[float]] = {}
    caches: list[str] = []
    with lab(baseline=True) as hand, pair_lab() as gp:
        paths = Paths.for_prefix(gp)
        record = LabRecord.load(paths.lab_json)
        assert record is not None
        layout = record.layout
        peer1, peer2 = layout.gate_peers
        config = paths.peer_config(1)
        # nat mode on peer 1 as `gatepeer run` would leave it, then the devices' traffic to it.
        gatepeer("apply", ns=peer1.ns, env={"GATEPEER_CONFIG": str(config)})
        gatepeer("apply", ns=peer2.ns, env={"GATEPEER_CONFIG": str(paths.peer_config(2))})
        gatepeer("lab", "redirect", "peer", "--prefix", gp)
        snat = snat_address(config)
        if snat:
            # keepalived's virtual address on the master.
            netns.ip(peer1.ns, "addr", "add", f"{snat}/32", "dev", "eth0")
        where = {
            "handmade_masq": (f"{hand}-dev", f"{hand}-vpc"),
            "nat": (layout.dev_ns, layout.vpc_ns),
            "nat_sync": (layout.dev_ns, layout.vpc_ns),
            "nat_sync_every_event": (layout.dev_ns, layout.vpc_ns),
        }
        listed = nft(peer1.ns, "list", "table", "inet", "gatepeer")
        limit = f"ct state new ct event set {SYNC_EVENTS}"
        assert limit in listed, "gatepeer's table does not limit the synced flows' events"
        every_event = "\n".join(ln for ln in listed.splitlines() if limit not in ln) + "\n"
        for rnd in range(opts.rounds):
            order = list(CASES) if rnd % 2 == 0 else list(reversed(CASES))
            for case in order:
                dev_ns, vpc_ns = where[case]
                sync_pids: list[int] = []
                if case == "handmade_masq":
                    nft(f"{hand}-peer", "-f", "-", stdin=MASQUERADE)
                if case.startswith("nat_sync"):
                    sync_pids = [ha_pair.start_conntrackd(paths, p) for p in (peer2, peer1)]
                server = Server(vpc_ns)
                try:
                    with (
                        replaced_table(peer1.ns, every_event)
                        if case == "nat_sync_every_event"
                        else contextlib.nullcontext()
                    ):
                        cpu0 = [cpu_seconds(p) for p in sync_pids]
                        got = measure(dev_ns, opts.seconds)
                        if sync_pids:
                            used = cpu_seconds(sync_pids[1]) - cpu0[1]
                            sync_cpu.setdefault(case, []).append(used)
                            caches.append(external_entries(paths, peer2.ns, 2))
                finally:
                    server.stop()
                    if case == "handmade_masq":
                        nft(f"{hand}-peer", "delete", "table", "ip", "fcknat")
                    if case.startswith("nat_sync"):
                        for p in (peer1, peer2):
                            ha_pair.stop_conntrackd(paths, p.index)
                results[case].append(got["per_second"])
                failed[case] += int(got["failed"])
                print(
                    f"round {rnd + 1} {case:20} {got['per_second']:8.0f} conn/s "
                    f"({got['failed']} failed)",
                    flush=True,
                )
            # Each round's connections leave conntrack entries (CLOSE, 10 s): let them go.
            time.sleep(1)
    load_end = Path("/proc/loadavg").read_text().split()[:3]
    med = {c: statistics.median(v) for c, v in results.items()}
    print(f"\n# {benchlib.machine()}")
    print(f"# load average at start {' '.join(load_start)}, at end {' '.join(load_end)}")
    print(
        f"# {opts.rounds} rounds of {opts.seconds:g} s; a device opens TCP connections to the VPC "
        "host (2 processes x 32 in flight), each closed with a reset after its handshake\n"
    )
    print("| case | median conn/s | min - max | vs handmade_masq (median of per-round ratios) |")
    print("|---|---:|---:|---:|")
    for case in CASES:
        values = results[case]
        ratios = [a / b for a, b in zip(values, results[BASELINE], strict=True)]
        print(
            f"| {case} | {med[case]:.0f} | {min(values):.0f} - {max(values):.0f} | "
            f"{statistics.median(ratios):.1%} ({min(ratios):.0%} - {max(ratios):.0%}) |"
        )
    per_round = [a / b for a, b in zip(results["nat_sync"], results["nat"], strict=True)]
    print(
        "\nnat_sync / nat per round: "
        + ", ".join(f"{r:.0%}" for r in per_round)
        + f" (median {statistics.median(per_round):.1%}: the cost of the sync)"
    )
    every = [a / b for a, b in zip(results["nat_sync"], results["nat_sync_every_event"],
                                   strict=True)]  # fmt: skip
    print(
        "nat_sync / nat_sync_every_event per round: "
        + ", ".join(f"{r:.0%}" for r in every)
        + f" (median {statistics.median(every):.1%}: what limiting the events gains)"
    )
    for case, used in sync_cpu.items():
        print(f"conntrackd on peer 1, CPU seconds per {case} round: "
              + ", ".join(f"{c:.2f}" for c in used))  # fmt: skip
    print(f"peer 2's caches after each nat_sync round: {caches[-1] if caches else 'n/a'}")
    print(f"failed connects: {failed}; took {time.monotonic() - started:.0f} s")
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    "samples": results,
                    "median": med,
                    "failed": failed,
                    "sync_cpu_s": sync_cpu,
                    "peer2_caches": caches,
                    "load": [load_start, load_end],
                    "machine": benchlib.machine(),
                },
                indent=1,
            )
        )
    return 0


def snat_address(config: Path) -> str | None:
    from gatepeer.config import load

    ha = load(config).ha
    address = getattr(ha, "snat_address", None) if ha is not None else None
    return str(address) if address is not None else None


if __name__ == "__main__":
    sys.exit(main())
