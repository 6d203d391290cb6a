"""New TCP connections per second, as a program of its own (stdlib only, run by path inside a lab
namespace with `ip netns exec NS python3 new_connections_probe.py ...`, stopped by pid).

- `server`: accepts and closes, on every core, until SIGTERM.
- `client`: PROCS processes, each keeping INFLIGHT non-blocking connects open at once; every
  completed handshake counts, and the socket is closed at once with a reset (SO_LINGER 0: no
  TIME_WAIT, so the source ports never run out). Counts the handshakes completed during
  SECONDS after a short warm-up and prints one JSON line: connections/s, failures.

Each connection is a new conntrack entry on the NAT in between (and, with conntrackd, a NEW,
an update and a DESTROY event to copy to the other peer): the figure a NAT is sized by.
"""

from __future__ import annotations

import argparse
import errno
import json
import multiprocessing
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: the port is chosen at connect, per destination
LINGER_RESET = struct.pack("ii", 1, 0)


def serve(bind: str, port: int) -> int:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((bind, port))
    listener.listen(65535)
    workers = []
    for _ in range(max(os.cpu_count() or 1, 1)):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                try:
                    conn, _ = listener.accept()
                    conn.close()
                except OSError:
                    pass
        workers.append(pid)

    def stop(*_: object) -> None:
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        for pid in workers:
            os.waitpid(pid, 0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        signal.pause()


def connect_loop(target: str, port: int, bind: str, inflight: int, warmup: float, seconds: float,
                 out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]  # fmt: skip
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()

    def start() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((bind, 0))
        err = s.connect_ex((target, port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            raise OSError(err, os.strerror(err))
        sel.register(s, selectors.EVENT_WRITE)

    for _ in range(inflight):
        start()
    begin = time.monotonic() + warmup
    end = begin + seconds
    done = failed = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            sel.unregister(s)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            counted = time.monotonic() >= begin
            if err == 0:
                done += counted
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            else:
                failed += counted
            s.close()
            start()
    out.put((done, failed))


def client(args: argparse.Namespace) -> int:
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [
        multiprocessing.Process(
            target=connect_loop,
            args=(
                args.target,
                args.port,
                args.bind,
                args.inflight,
                args.warmup,
                args.seconds,
                queue,
            ),
        )  # fmt: skip
        for _ in range(args.procs)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=args.warmup + args.seconds + 60) for _ in procs]
    for p in procs:
        p.join()
    done = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    print(json.dumps({"per_second": done / args.seconds, "completed": done, "failed": failed}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=7100)
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--port", type=int, default=7100)
    c.add_argument("--bind", required=True)
    c.add_argument("--procs", type=int, default=2)
    c.add_argument("--inflight", type=int, default=32)
    c.add_argument("--warmup", type=float, default=0.5)
    c.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    return serve(args.bind, args.port) if args.role == "server" else client(args)


if __name__ == "__main__":
    sys.exit(main())
