"""The emulator's one process entry, `python -m gatepeer.lab.emulator`, in two modes:

- `--listen HOST:PORT [--vni N ...]`: a standalone emulator (tests, manual use; the options are
  listed in `gatepeer.lab.emulator`'s docstring);
- `--lab-dir DIR [--foreground]`: the lab's emulator, as `gatepeer lab up` starts it: settings
  from the lab's record, served inside the fabric namespace and on 127.0.0.1, with the VPG
  endpoints following the API (`lab_process`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gatepeer.lab.emulator.model import EmulatorSettings, default_auth_key
from gatepeer.lab.emulator.service import Emulator

log = logging.getLogger("gatepeer.lab.emulator")  # one logger for the whole emulator


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _read_or_create_key(path: str) -> str:
    """Read the AuthKey secret; create the file (0600) with a random one when missing."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except FileNotFoundError:
        key = default_auth_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
        log.warning("wrote a new random auth key to %s", path)
    if not key:
        raise SystemExit(f"auth key file {path} is empty")
    return key


# The options of a standalone emulator; the lab's emulator refuses them (--listen has a default,
# so it cannot be told apart from an explicit one and is not listed).
STANDALONE_OPTIONS = (
    "vni",
    "device_subnet",
    "endpoint",
    "operator_id",
    "auth_key_id",
    "auth_key_file",
    "vpg_id",
    "token_lifetime",
    "wrapped_errors",
    "gate_closed",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gatepeer.lab.emulator", description="SORACOM API emulator for the lab."
    )
    parser.add_argument("--listen", type=_parse_listen, default=("127.0.0.1", 8080))
    parser.add_argument("--vni", type=int, help="gateVxlanId (default 10)")
    parser.add_argument("--device-subnet", help="device subnet CIDR (default 198.19.0.0/16)")
    parser.add_argument(
        "--endpoint",
        action="append",
        metavar="OUTER=INNER",
        help="a VPG tunnel endpoint; repeat; replaces the two default endpoints",
    )
    parser.add_argument("--operator-id")
    parser.add_argument("--auth-key-id")
    parser.add_argument(
        "--auth-key-file",
        help="file holding the AuthKey secret; created with a random key when missing "
        "(default: a new file in the temporary directory)",
    )
    parser.add_argument("--vpg-id")
    parser.add_argument("--token-lifetime", type=float, metavar="SECONDS")
    parser.add_argument("--wrapped-errors", action="store_true")
    parser.add_argument("--gate-closed", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    lab = parser.add_argument_group("the lab's emulator (settings from the lab's record)")
    lab.add_argument("--lab-dir", type=Path, help="the lab's folder, as `gatepeer lab up` wrote it")
    lab.add_argument("--foreground", action="store_true", help="with --lab-dir: do not fork")
    args = parser.parse_args(argv)
    if args.lab_dir is not None:
        standalone = [
            f"--{name.replace('_', '-')}"
            for name in STANDALONE_OPTIONS
            if getattr(args, name) not in (None, False)
        ]
        if standalone:
            parser.error(f"--lab-dir takes its settings from the lab: drop {' '.join(standalone)}")
        # Imported here: the lab's side (namespaces, VPG endpoints) is not the standalone's.
        from gatepeer.lab.emulator.lab_process import run

        return run(args.lab_dir.resolve(), foreground=args.foreground)
    if args.foreground:
        parser.error("--foreground goes with --lab-dir")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )

    changes: dict[str, Any] = {}
    for name, value in (
        ("vxlan_id", args.vni),
        ("device_subnet", args.device_subnet),
        ("endpoints", args.endpoint),
        ("operator_id", args.operator_id),
        ("auth_key_id", args.auth_key_id),
        ("vpg_id", args.vpg_id),
        ("token_lifetime_s", args.token_lifetime),
    ):
        if value is not None:
            changes[name] = value
    if args.wrapped_errors:
        changes["wrapped_errors"] = True
    if args.gate_closed:
        changes["gate_opened"] = False
    try:
        settings = EmulatorSettings(**changes)
    except ValueError as exc:
        parser.error(str(exc))

    # Only now, with the settings valid, touch the file system for the key.
    key_file = args.auth_key_file
    if key_file is None:
        fd, key_file = tempfile.mkstemp(prefix="soracom-emulator-", suffix=".key")  # 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(settings.auth_key + "\n")
    else:
        settings = dataclasses.replace(settings, auth_key=_read_or_create_key(key_file))

    emulator = Emulator(settings)
    host, port = args.listen
    try:
        url = emulator.start(host, port)
    except OSError as exc:
        parser.error(f"cannot listen on {host}:{port}: {exc}")
    print(f"SORACOM API emulator: {url} (API under /v1, control under /_emulator/)", flush=True)
    print(f"auth key id {settings.auth_key_id}, secret in {key_file}", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
