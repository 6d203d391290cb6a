"""Traffic that must survive a failover, as a program of its own (stdlib only, run by path inside
a lab namespace with `ip netns exec NS python3 flow_probe.py ...`, started and stopped by pid).

- `server` (the VPC host): echoes TCP and UDP on one port until SIGTERM.
- `client` (a device): N TCP connections, each sending SIZE bytes every INTERVAL and reading
  the echo, and optionally one UDP flow (a numbered datagram every UDP_INTERVAL, echoed). On
  SIGTERM or after DURATION it stops sending, waits DRAIN seconds for the echoes still on their
  way, and writes what it saw as JSON: per TCP connection the longest stall (the longest time
  between two echoes), resets, other errors, and whether every byte sent came back; for UDP the
  datagrams sent, answered and lost, and the longest silence.

`write_ready` files tell the test when the sockets are up; the test never guesses with sleeps.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import json
import os
import resource
import selectors
import signal
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

RESETS = (errno.ECONNRESET, errno.EPIPE)


def raise_fd_limit() -> None:
    """1,000 connections need more descriptors than the usual soft limit of 1,024 on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def write_ready(path: str | None, data: dict[str, Any]) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)


class Stop:
    """SIGTERM/SIGINT set a flag the loops look at (the process ends itself, cleanly)."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: object) -> None:
        self.requested = True


# ---- server ---------------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    raise_fd_limit()
    stop = Stop()
    sel = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.bind, args.port))
    listener.listen(4096)
    listener.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((args.bind, args.port))
    udp.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(udp, selectors.EVENT_READ, "udp")
    pending: dict[socket.socket, bytearray] = {}
    accepted = 0
    write_ready(args.ready, {"pid": os.getpid()})
    while not stop.requested:
        for key, mask in sel.select(timeout=0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "accept":
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pending[conn] = bytearray()
                sel.register(conn, selectors.EVENT_READ, "tcp")
                accepted += 1
            elif key.data == "udp":
                try:
                    data, peer = sock.recvfrom(2048)
                    sock.sendto(data, peer)
                except OSError:
                    pass
            else:
                out = pending[sock]
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(sock)
                        del pending[sock]
                        sock.close()
                        continue
                    out += data
                if out:
                    try:
                        sent = sock.send(out)
                        del out[:sent]
                    except BlockingIOError:
                        pass
                    except OSError:
                        sel.unregister(sock)
                        del pending[sock]
                        sock.close()
                        continue
                sel.modify(
                    sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0), "tcp"
                )
    print(json.dumps({"accepted": accepted}), flush=True)
    return 0


# ---- client ---------------------------------------------------------------------------------


class Flow:
    """One TCP connection's bookkeeping."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.out = bytearray()
        self.sent = 0
        self.echoed = 0
        self.last_echo = now
        self.longest_stall = 0.0
        self.stall_began = 0.0  # wall clock of the echo before the longest stall
        self.error: str | None = None
        self.error_at: float | None = None  # wall clock

    def echo(self, n: int, now: float, wall: float) -> None:
        gap = now - self.last_echo
        if gap > self.longest_stall:
            self.longest_stall = gap
            self.stall_began = wall - gap
        self.last_echo = now
        self.echoed += n


def connect_all(args: argparse.Namespace, payload: bytes) -> list[Flow]:
    flows = []
    for _ in range(args.tcp):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if args.bind:
            sock.bind((args.bind, 0))
        sock.settimeout(10)
        sock.connect((args.target, args.port))
        sock.setblocking(False)
        flows.append(Flow(sock, time.monotonic()))
    return flows


def run_client(args: argparse.Namespace) -> int:
    raise_fd_limit()
    stop = Stop()
    payload = b"x" * args.size
    flows = connect_all(args, payload)
    sel = selectors.DefaultSelector()
    for i, flow in enumerate(flows):
        sel.register(flow.sock, selectors.EVENT_READ, i)
    udp = None
    udp_sent = udp_received = 0
    udp_seen: set[int] = set()
    udp_last = udp_longest = 0.0
    udp_after = 0  # datagrams answered since the longest gap ended (the flow resumed)
    if args.udp_interval > 0:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if args.bind:
            udp.bind((args.bind, 0))
        udp.connect((args.target, args.port))
        udp.setblocking(False)
        sel.register(udp, selectors.EVENT_READ, "udp")
    start = time.monotonic()
    # Each connection sends on its own slot within the interval: an even load, not bursts.
    due = [(start + args.interval * i / max(len(flows), 1), i) for i in range(len(flows))]
    heapq.heapify(due)
    udp_due = start
    udp_last = start
    end = start + args.duration
    write_ready(args.ready, {"pid": os.getpid(), "connections": len(flows)})
    sending = True
    drain_until = None
    while True:
        now = time.monotonic()
        if sending and (stop.requested or now >= end):
            sending = False
            drain_until = now + args.drain
        if not sending and (now >= (drain_until or now) or all_home(flows, udp_sent, udp_seen)):
            break
        if sending:
            while due and due[0][0] <= now:
                _, i = heapq.heappop(due)
                flow = flows[i]
                if flow.error is None:
                    flow.out += payload
                    flow.sent += len(payload)
                    push(flow, sel, i)
                    heapq.heappush(due, (now + args.interval, i))
            if udp is not None and udp_due <= now:
                # A send the kernel refuses is counted as lost: it is never answered.
                with contextlib.suppress(OSError):
                    udp.send(struct.pack("!Q", udp_sent) + payload[8:])
                udp_sent += 1
                udp_due += args.udp_interval
        nxt = min([due[0][0] if due and sending else now + 0.05, udp_due if udp else now + 0.05])
        for key, mask in sel.select(timeout=max(0.0, min(nxt - time.monotonic(), 0.05))):
            now, wall = time.monotonic(), time.time()
            if key.data == "udp":
                assert udp is not None
                while True:
                    try:
                        data = udp.recv(2048)
                    except OSError:
                        break
                    seq = struct.unpack("!Q", data[:8])[0]
                    if seq not in udp_seen:
                        udp_seen.add(seq)
                        udp_received += 1
                        if now - udp_last > udp_longest:
                            udp_longest, udp_after = now - udp_last, 0
                        udp_after += 1
                        udp_last = now
                continue
            i = key.data
            flow = flows[i]
            if mask & selectors.EVENT_READ:
                try:
                    data = flow.sock.recv(65536)
                    if not data:
                        fail(flow, sel, "closed by the other side")
                        continue
                    flow.echo(len(data), now, wall)
                except BlockingIOError:
                    pass
                except OSError as e:
                    fail(flow, sel, "reset" if e.errno in RESETS else f"error: {e}")
                    continue
            if mask & selectors.EVENT_WRITE:
                push(flow, sel, i)
    result = summary(flows, udp, udp_sent, udp_received, udp_longest, udp_after)
    Path(args.out).write_text(json.dumps(result))
    return 0


def all_home(flows: list[Flow], udp_sent: int, udp_seen: set[int]) -> bool:
    return all(f.error is not None or f.echoed == f.sent for f in flows) and (
        len(udp_seen) == udp_sent
    )


def push(flow: Flow, sel: selectors.BaseSelector, i: int) -> None:
    try:
        sent = flow.sock.send(flow.out)
        del flow.out[:sent]
    except BlockingIOError:
        pass
    except OSError as e:
        fail(flow, sel, "reset" if e.errno in RESETS else f"error: {e}")
        return
    sel.modify(flow.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if flow.out else 0), i)


def fail(flow: Flow, sel: selectors.BaseSelector, why: str) -> None:
    flow.error = why
    flow.error_at = time.time()
    sel.unregister(flow.sock)
    flow.sock.close()


def summary(
    flows: list[Flow],
    udp: socket.socket | None,
    sent: int,
    received: int,
    longest: float,
    after_longest: int,
) -> dict[str, Any]:
    stalls = [f.longest_stall for f in flows]
    worst = max(flows, key=lambda f: f.longest_stall, default=None)
    errors: dict[str, int] = {}
    for f in flows:
        if f.error is not None:
            errors[f.error] = errors.get(f.error, 0) + 1
    return {
        "tcp": {
            "connections": len(flows),
            "survived": sum(1 for f in flows if f.error is None and f.echoed == f.sent),
            "resets": errors.get("reset", 0),
            "errors": errors,
            "longest_stall_s": max(stalls, default=0.0),
            "median_stall_s": statistics.median(stalls) if stalls else 0.0,
            "longest_stall_began": worst.stall_began if worst else None,
            "bytes_sent": sum(f.sent for f in flows),
            "bytes_echoed": sum(f.echoed for f in flows),
            "first_error_at": min((f.error_at for f in flows if f.error_at), default=None),
        },
        "udp": None
        if udp is None
        else {
            "sent": sent,
            "received": received,
            "lost": sent - received,
            "longest_gap_s": longest,
            "received_after_longest_gap": after_longest,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=7007)
    s.add_argument("--ready")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--port", type=int, default=7007)
    c.add_argument("--bind")
    c.add_argument("--tcp", type=int, default=1, help="TCP connections")
    c.add_argument("--interval", type=float, default=0.02, help="each connection's send period")
    c.add_argument("--size", type=int, default=32)
    c.add_argument("--udp-interval", type=float, default=0.0, help="0: no UDP flow")
    c.add_argument("--duration", type=float, default=3600.0)
    c.add_argument("--drain", type=float, default=10.0)
    c.add_argument("--out", required=True)
    c.add_argument("--ready")
    args = parser.parse_args(argv)
    return serve(args) if args.role == "server" else run_client(args)


if __name__ == "__main__":
    sys.exit(main())
