"""The image boots for real: a Debian 12 root filesystem, provisioned by scripts/provision.sh
exactly as the AMI is, booted with systemd-nspawn as the lab's gate peer.

The booted system's `host0` is the instance's ENI: nspawn makes a veth pair (--network-veth)
and the test moves the host side into the lab's fabric, on the VPC bridge, where the lab's own
peer namespace was plugged in; the lab's peer namespace gives up its address. The issue asked for
`--network-namespace-path=` instead; in this sandbox that gives a container without
CAP_NET_ADMIN and with /proc/sys read-only (nft: "cache initialization failed: Operation not
permitted"), so the agent cannot work there; see README "The boot test".

One story, three boots: the first brings the peer up and a VPC host pings a device through it;
the machine is powered off and booted again and the peer comes back by itself; then it boots
while the emulator refuses every API call and the gate view kept in /var/lib/gatepeer brings the
tunnel up. The debootstrap result is cached as a tarball (CACHE_DIR) so a warm run takes well
under a minute of set-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LabHandle

pytestmark = [pytest.mark.slow, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("GATEPEER_CI_CACHE", "/var/cache/gatepeer-ci"))
MIRROR = os.environ.get("GATEPEER_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the AMI's base image has that minbase lacks, and what provision.sh would install anyway.
ROOTFS_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "nftables",
    "python3",
    "python3-venv",
    "procps",
    "ca-certificates",
)
# The lab's addresses (gatepeer/lab/network/layout.py): the peer's ENI address and the VPC router.
PEER_ADDR = "198.18.0.10"
VPC_ROUTER = "198.18.0.1"
UNDERLAY_MTU = 9001
BOOT_TIMEOUT_S = 60.0
# Every API call fails while this many are left (the emulator counts them down).
REFUSE_EVERY_CALL = 1_000_000

# The lab's stand-in for what gives an EC2 instance its address (DHCP on the ENI). It is not
# part of the image: provision.sh leaves the network to the base image.
LAB_ENI_UNIT = f"""\
[Unit]
Description=Lab stand-in for the instance's network setup: host0 is the ENI
ConditionPathExists=/sys/class/net/host0
DefaultDependencies=no
After=local-fs.target
Before=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip link set host0 mtu {UNDERLAY_MTU} up
ExecStart=/sbin/ip address replace {PEER_ADDR}/24 dev host0
ExecStart=/sbin/ip route replace default via {VPC_ROUTER} dev host0

[Install]
WantedBy=network-online.target
"""


def _missing_tools() -> str | None:
    for tool, package in (
        ("debootstrap", "debootstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("systemd-analyze", "systemd"),
        ("nsenter", "util-linux"),
        ("zstd", "zstd"),
    ):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian package {package})"
    return None


def _run(argv: list[str], timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}"
    return proc


# ---- the root filesystem ---------------------------------------------------------------------


def rootfs_tarball() -> Path:
    """The debootstrapped bookworm, built once per package list and kept in CACHE_DIR."""
    key = hashlib.sha256(("bookworm minbase " + ",".join(ROOTFS_PACKAGES)).encode()).hexdigest()
    tarball = CACHE_DIR / f"bookworm-minbase-{key[:12]}.tar.zst"
    if tarball.exists():
        return tarball
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel run builds it only once
        if tarball.exists():
            return tarball
        build = CACHE_DIR / f"build-{os.getpid()}"
        partial = tarball.with_suffix(".partial")
        try:
            _run(
                [
                    "debootstrap", "--variant=minbase", f"--include={','.join(ROOTFS_PACKAGES)}",
                    "bookworm", str(build), MIRROR,
                ],
                timeout=900,
            )  # fmt: skip
            _run(
                [
                    "tar", "--numeric-owner", "--xattrs", "--zstd", "-C", str(build),
                    "-cf", str(partial), ".",
                ],
            )  # fmt: skip
            partial.rename(tarball)
        finally:
            shutil.rmtree(build, ignore_errors=True)
            partial.unlink(missing_ok=True)
    return tarball


def nspawn_run(root: Path, *argv: str, binds: tuple[str, ...] = (), timeout: float = 300) -> str:
    """Run a command inside `root` (not booted): what a chroot does, with /proc, /dev and /sys
    set up and torn down by nspawn. A clean environment: the host's pip settings stay out."""
    proc = _run(
        [
            "systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit",
            *(f"--bind-ro={b}" for b in binds), *argv,
        ],
        timeout=timeout,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )  # fmt: skip
    return proc.stdout


@pytest.fixture
def provisioned_root(tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of the cached root, provisioned from this checkout's wheel by the same
    script the AMI runs; removed afterwards."""
    missing = _missing_tools()
    if missing:
        pytest.skip(missing)
    tarball = rootfs_tarball()
    root = tmp_path / "root"
    root.mkdir()
    try:
        _run(["tar", "--numeric-owner", "--xattrs", "--zstd", "-C", str(root), "-xf", str(tarball)])
        bundle = tmp_path / "bundle"
        _run(
            ["bash", str(REPO / "scripts" / "bundle.sh"), str(bundle), "--with-dependencies"],
            env={**os.environ, "PYTHON": sys.executable},
        )
        out = nspawn_run(
            root,
            "--setenv=PIP_NO_INDEX=1",  # everything comes from the bundle
            "/bin/bash", "/run/gatepeer-bundle/provision.sh", "/run/gatepeer-bundle",
            binds=(f"{bundle}:/run/gatepeer-bundle",),
        )  # fmt: skip
        assert "provision: done" in out, out
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- the booted machine ----------------------------------------------------------------------


class Machine:
    """One boot of the root with systemd-nspawn; its host0 plugged into the lab's VPC bridge."""

    def __init__(self, root: Path, name: str, lab: LabHandle, log: Path) -> None:
        self.root, self.name, self.lab, self.log_path = root, name, lab, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    @property
    def host_link(self) -> str:
        return f"ve-{self.name}"[:15]

    def boot(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "systemd-nspawn", "-q", "-D", str(self.root), "-b", "--register=no",
                    "--keep-unit", "-M", self.name, "--network-veth", "--console=pipe",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )  # fmt: skip
        self.wait(lambda: _link_exists(self.host_link), f"{self.host_link} on the host", 10)
        # The ENI's other end: the VPC bridge in the lab's fabric.
        fabric = self.lab.ns("fabric")
        _run(["ip", "link", "set", self.host_link, "netns", fabric])
        _run(["ip", "-n", fabric, "link", "set", self.host_link, "mtu", str(UNDERLAY_MTU)])
        _run(["ip", "-n", fabric, "link", "set", self.host_link, "master", "vpcbr", "up"])
        self.wait(self._find_leader, "the container's systemd", 10)

    def _find_leader(self) -> bool:
        assert self.proc is not None
        kids = subprocess.run(
            ["ps", "-o", "pid=,comm=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        ).stdout.split("\n")
        for line in kids:
            parts = line.split()
            if len(parts) == 2 and parts[1] == "systemd":
                self.leader = int(parts[0])
                return True
        return False

    def wait(self, done: Callable[[], bool], what: str, timeout: float = BOOT_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert self.proc is not None and self.proc.poll() is None, (
                f"systemd-nspawn exited {self.proc and self.proc.returncode}:\n{self.console()}"
            )
            assert time.monotonic() < deadline, f"no {what} within {timeout:g}s\n{self.debug()}"
            time.sleep(0.2)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command inside the booted machine (its mount, PID and network namespaces)."""
        assert self.leader is not None
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", *argv],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check:
            assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}\n{self.debug()}"
        return proc

    def state(self) -> dict[str, Any] | None:
        """The agent's /run/gatepeer/state.json inside the machine."""
        assert self.leader is not None
        try:
            return dict(
                json.loads(Path(f"/proc/{self.leader}/root/run/gatepeer/state.json").read_text())
            )
        except (OSError, ValueError):
            return None

    def wait_state(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def check() -> bool:
            state = self.state()
            if state is not None and predicate(state):
                found.update(state)
                return True
            return False

        self.wait(check, what)
        return found

    def unit(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "gatepeer.service", *(f"-p{p}" for p in props))
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def console(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def debug(self) -> str:
        if self.leader is None or self.proc is None or self.proc.poll() is not None:
            return self.console()
        journal = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-m", "-p", "journalctl", "-b", "--no-pager",
             "-u", "gatepeer.service", "-u", "lab-eni.service", "-n", "60"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return f"journal:\n{journal.stdout[-4000:]}"

    def power_off(self, timeout: float = 60) -> int:
        """SIGTERM to the nspawn we started: the container's systemd shuts down cleanly."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        code = int(self.proc.returncode)
        self.proc, self.leader = None, None
        return code


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def assert_redirection_set_by_peer(lab: LabHandle, machine: Machine) -> None:
    """The booted agent (route example: redirection = "self") pointed the VPG's Junction
    redirection at its own inner address, so devices' replies to the VPC host come back
    through it; nobody set it by hand."""
    del machine
    redirection = lab.state().get("redirection") or {}
    inner = next(p["inner_ip"] for p in lab.state()["peers"] if p["outer_ip"] == PEER_ADDR)
    assert redirection.get("enabled") is True, redirection
    assert redirection.get("gateway") == inner, (redirection, inner)


def write_user_data_equivalent(root: Path, lab: LabHandle) -> None:
    """What the route-mode cloud-init example writes, pointed at the lab's emulator: the config
    (underlay and local address left to their defaults, as on EC2) and the auth key file owned
    by the service user with mode 0600. Plus the lab's stand-in for the ENI's DHCP."""
    import re
    import tomllib

    import yaml

    lab_config = tomllib.loads(lab.paths.config.read_text())["soracom"]
    user_data = yaml.safe_load((REPO / "cloud-init" / "route.yaml").read_text())
    toml = next(
        f["content"] for f in user_data["write_files"] if f["path"] == "/etc/gatepeer/gatepeer.toml"
    )
    # The example itself, with the three values a user replaces aimed at the lab's emulator.
    for key in ("endpoint", "auth_key_id", "vpg_id"):
        toml, found = re.subn(rf"(?m)^{key} = .*$", f'{key} = "{lab_config[key]}"', toml)
        assert found == 1, f"cloud-init/route.yaml sets soracom.{key} once"
    etc = root / "etc" / "gatepeer"
    (etc / "gatepeer.toml").write_text(
        "# The lab boot's user-data: cloud-init/route.yaml aimed at the emulator.\n"
        + toml
        + '\n[agent]\nreconcile_interval = "5s"\n'
    )
    uid = gid = None
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "gatepeer":
            uid, gid = int(fields[2]), int(fields[3])
    assert uid is not None and gid is not None, "provision.sh made no gatepeer user"
    key = etc / "auth-key"
    key.write_text(lab.paths.auth_key.read_text())
    os.chown(key, uid, gid)
    key.chmod(0o600)
    unit = root / "etc" / "systemd" / "system" / "lab-eni.service"
    unit.write_text(LAB_ENI_UNIT)
    wants = root / "etc" / "systemd" / "system" / "network-online.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "lab-eni.service").symlink_to("/etc/systemd/system/lab-eni.service")


def hand_over_peer_address(lab: LabHandle) -> None:
    """The lab's peer namespace steps aside: the booted machine is the gate peer now."""
    lab.run("peer", "ip", "address", "flush", "dev", "eth0")
    lab.run("peer", "ip", "link", "set", "eth0", "down")


def ping_device(lab: LabHandle, machine: Machine) -> None:
    device = str(lab.layout.devices[0])
    ping = lab.run("vpc", "ping", "-c", "3", "-i", "0.2", "-W", "2", device, check=False)
    assert ping.returncode == 0, (
        f"VPC host cannot reach {device}:\n{ping.stdout}\n{machine.debug()}"
    )


def assert_peer_up(machine: Machine, lab: LabHandle, health: str) -> dict[str, Any]:
    """gatepeer.service active as its own user, vxlan0 up, state.json with this health."""
    state = machine.wait_state(lambda s: s.get("health") == health, f"health {health}")
    # state.json is written by the first reconcile, READY=1 right after it.
    machine.wait(lambda: machine.unit("ActiveState")["ActiveState"] != "activating", "READY=1")
    unit = machine.unit("ActiveState", "SubState", "User", "NRestarts", "StatusText")
    assert unit["ActiveState"] == "active" and unit["SubState"] == "running", unit
    assert unit["User"] == "gatepeer", unit
    assert unit["NRestarts"] == "0", unit  # never crashed under the unit's restrictions
    link = json.loads(machine.run("ip", "-j", "-d", "link", "show", "vxlan0").stdout)[0]
    assert link["linkinfo"]["info_data"]["id"] == lab.layout.vni
    assert link["linkinfo"]["info_data"]["local"] == PEER_ADDR
    assert "UP" in link["flags"]
    # What an operator types on the instance (provision.sh links it into /usr/local/bin).
    status = machine.run("gatepeer", "status", check=False)
    assert status.returncode == (0 if health == "ok" else 1), status.stdout + status.stderr
    return state


def assert_sandboxed(machine: Machine) -> None:
    """The unit's restrictions are in force on the running agent (not silently skipped by a
    container that could not set them up): seccomp, no new privileges, two capabilities, and
    a read-only system with only its own directories and the net sysctls writable."""
    pid = machine.unit("MainPID")["MainPID"]
    status = dict(
        line.split(":\t", 1)
        for line in machine.run("cat", f"/proc/{pid}/status").stdout.splitlines()
        if ":\t" in line
    )
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
    net_admin_and_raw = (1 << 12) | (1 << 13)
    assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == net_admin_and_raw, status
    # The last mount listed for a point is the one the process sees.
    options = {}
    for line in machine.run("cat", f"/proc/{pid}/mountinfo").stdout.splitlines():
        fields = line.split()
        options[fields[4]] = fields[5].split(",")
    for path, mode in (
        ("/", "ro"),
        ("/proc/sys", "ro"),
        ("/proc/sys/net", "rw"),
        ("/run/gatepeer", "rw"),
        ("/var/lib/gatepeer", "rw"),
    ):
        assert mode in options.get(path, []), f"{path}: {options.get(path)} (want {mode})"


def test_provisioned_image_boots_as_gate_peer(
    provisioned_root: Path, make_lab: Callable[..., LabHandle], tmp_path: Path
) -> None:
    root = provisioned_root
    enabled = root / "etc/systemd/system/multi-user.target.wants/gatepeer.service"
    assert enabled.is_symlink(), "provision.sh did not enable gatepeer.service"

    lab = make_lab()
    hand_over_peer_address(lab)
    write_user_data_equivalent(root, lab)
    # The units as installed verify against the image's own systemd and files.
    verify = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "gatepeer.service", "lab-eni.service"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    machine = Machine(root, f"gp{lab.prefix}", lab, tmp_path / "console.log")
    try:
        # First boot: registers, builds the tunnel, carries traffic.
        machine.boot()
        state = assert_peer_up(machine, lab, "ok")
        assert state["host"]["underlay"] == "host0"
        assert [p["outer_ip"] for p in lab.state()["peers"]] == [PEER_ADDR]
        assert_redirection_set_by_peer(lab, machine)
        ping_device(lab, machine)
        processes = machine.run("ps", "-o", "user=", "-C", "gatepeer").stdout.split()
        assert processes == ["gatepeer"], processes  # not root
        assert_sandboxed(machine)
        assert machine.power_off() == 0

        # Power on again: nothing by hand, the peer comes back.
        assert not _link_exists(machine.host_link)
        machine.boot()
        assert_peer_up(machine, lab, "ok")
        ping_device(lab, machine)
        assert machine.power_off() == 0

        # Boot while the API refuses every call: the kept gate view brings the tunnel up.
        lab.control("faults", {"fail_next": REFUSE_EVERY_CALL, "fail_status": 503})
        machine.boot()
        state = assert_peer_up(machine, lab, "degraded")
        assert any("SORACOM API" in r for r in state["reasons"]), state["reasons"]
        ping_device(lab, machine)
        refused = REFUSE_EVERY_CALL - lab.state()["faults"]["fail_next"]
        assert refused > 0, "the agent never called the API during the outage boot"
        journal = machine.run("journalctl", "-b", "-u", "gatepeer.service", "--no-pager").stdout
        assert "starting from the gate view kept in /var/lib/gatepeer/gate.json" in journal
        assert machine.power_off() == 0
    finally:
        machine.power_off()
