"""The image boots for real: a Debian 12 root filesystem, provisioned by scripts/provision.sh
exactly as the AMI is, booted with systemd-nspawn as the lab's gate peer.

The booted system's `host0` is the instance's ENI: nspawn makes a veth pair (--network-veth)
and the test moves the host side into the lab's fabric, on the VPC bridge, where the lab's own
peer namespace was plugged in; the lab's peer namespace gives up its address. The issue asked for
`--network-namespace-path=` instead; in this sandbox that gives a container without
CAP_NET_ADMIN and with /proc/sys read-only (nft: "cache initialization failed: Operation not
permitted"), so the agent cannot work there; see docs/image.md.

One story, three boots: the first brings the peer up and a VPC host pings a device through it;
the machine is powered off and booted again and the peer comes back by itself; then it boots
while the emulator refuses every API call and the gate view kept in /var/lib/gatepeer brings the
tunnel up. The debootstrap result is cached as a tarball (CACHE_DIR) so a warm run takes well
under a minute of set-up.

The rehearsal (the last test) boots the image as EC2 does: the user-data the CloudFormation
stack renders (deployed into moto), written by the image's own cloud-init from a NoCloud seed,
the key from SSM, instance facts from a fake IMDSv2; then a replacement instance takes over the
registration and the VPC route by itself. docs/image.md describes both.
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
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
    # Debian's AMIs carry cloud-init: at first boot it writes the config from user-data.
    "cloud-init",
    # An HA pair's connection sync and election (provision.sh installs them; the boot has no
    # package mirror).
    "conntrackd",
    "keepalived",
    # debootstrap resolves no virtual packages: python3-cryptography (cloud-init's, through
    # oauthlib) needs python3-cffi-backend-api-*, which this one provides.
    "python3-cffi-backend",
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

    def __init__(
        self, root: Path, name: str, lab: LabHandle, log: Path, nspawn_args: tuple[str, ...] = ()
    ) -> None:
        self.root, self.name, self.lab, self.log_path = root, name, lab, log
        self.nspawn_args = nspawn_args
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
                    *self.nspawn_args,
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
             "-u", "gatepeer.service", "-u", "lab-eni.service", "-u", "cloud-init.service",
             "-u", "cloud-init-local.service", "-u", "cloud-final.service", "-n", "80"],
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


def assert_peer_up(
    machine: Machine, lab: LabHandle, health: str, address: str = PEER_ADDR
) -> dict[str, Any]:
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
    assert link["linkinfo"]["info_data"]["local"] == address
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
        # keepalived is in the image, off. A start gets past Debian's condition on its config
        # (the drop-in clears it: nothing writes the file before the render) and stops at the
        # render, which this single peer's config (no [ha]) refuses.
        enabled = machine.run("systemctl", "is-enabled", "keepalived.service", check=False)
        assert enabled.stdout.strip() == "disabled", enabled.stdout + enabled.stderr
        assert machine.run("systemctl", "start", "keepalived.service", check=False).returncode
        shown = machine.run(
            "systemctl", "show", "keepalived.service", "-pConditionResult", "-pResult"
        ).stdout.split()
        assert sorted(shown) == ["ConditionResult=yes", "Result=exit-code"], shown
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

        # Boot as one peer of an HA pair whose partner is not up yet, as the stack's user-data
        # makes it: [ha] in the config, keepalived enabled. The image's drop-in renders
        # keepalived's config from [ha] at its start; alone, keepalived makes this peer master,
        # and gatepeer claims the gateway.
        lab.control("reset_faults")
        config = root / "etc" / "gatepeer" / "gatepeer.toml"
        config.write_text(
            config.read_text() + '\n[ha]\npeer_address = "198.18.0.99"\nconntrack_sync = false\n'
        )
        nspawn_run(root, "systemctl", "enable", "keepalived.service")
        machine.boot()
        state = machine.wait_state(
            lambda s: (
                (s.get("ha") or {}).get("role") == "master"
                and ((s.get("ha") or {}).get("claims") or 0) >= 1
            ),
            "master alone, the gateway claimed",
        )
        shown = machine.run("systemctl", "show", "keepalived.service", "-pActiveState").stdout
        assert shown.strip() == "ActiveState=active", shown
        rendered = machine.run("cat", "/etc/keepalived/keepalived.conf").stdout
        assert "198.18.0.99" in rendered, rendered
        assert machine.power_off() == 0
    finally:
        machine.power_off()


# ---- the rehearsal: the stack's user-data, cloud-init, SSM, IMDS, and a replacement ----------
#
# The image boots as it boots on EC2. What stands in for AWS, all in the lab's fabric namespace:
# - moto's server (EC2, SSM, CloudFormation, Auto Scaling) on 0.0.0.0:5000 there: the booted
#   image reaches it at MOTO_ADDR on the VPC bridge (AWS_ENDPOINT_URL), the lab's VPC router
#   (gatepeer.lab.processes.vpc_routes) at its own 203.0.113.11, the test through
#   netns.call_in_netns;
# - a fake IMDSv2 (tests/helpers/rehearsal_imds.py) at IMDS_ADDR
#   (AWS_EC2_METADATA_SERVICE_ENDPOINT);
# - EC2 detection (gatepeer.aws.detect, from sysfs): this host's kernel has no DMI, and nspawn
#   mounts the container's /sys/class (and block, bus, dev, devices, kernel) from a fresh sysfs
#   after any bind of ours, so DMI cannot be faked there. /sys/hypervisor is left to us: nspawn
#   binds a directory there with type = "xen" and uuid = "ec2...", which is what a Xen-based
#   EC2 instance shows and one of the two kinds of evidence gatepeer accepts. The image's code
#   then takes its EC2 path unchanged.
# The two variables and moto's dummy credentials (on EC2: the instance profile, through IMDS)
# reach gatepeer.service from a drop-in, the lab's stand-in for AWS's real endpoints.

MOTO_ADDR = "198.18.0.2"
MOTO_PORT = 5000
IMDS_ADDR = "198.18.0.3"
IMDS_PORT = 80
REPLACEMENT_ADDR = "198.18.0.12"
FORWARDING_TIMEOUT_S = 60.0

LAB_AWS_DROP_IN = f"""\
# The lab's stand-in for AWS's endpoints (tests/delivery/test_boot_lab.py); not part of the image.
[Service]
Environment=AWS_ENDPOINT_URL=http://{MOTO_ADDR}:{MOTO_PORT}
Environment=AWS_EC2_METADATA_SERVICE_ENDPOINT=http://{IMDS_ADDR}:{IMDS_PORT}
Environment=AWS_ACCESS_KEY_ID=lab AWS_SECRET_ACCESS_KEY=lab
"""
# The lab's stand-in for the Ec2 data source and for the AMI's own DHCP networking.
LAB_CLOUD_CFG = "datasource_list: [NoCloud, None]\nnetwork: {config: disabled}\n"


def ec2_hypervisor(tmp_path: Path) -> Path:
    """What the container sees as /sys/hypervisor: a Xen-based EC2 instance's."""
    top = tmp_path / "sys-hypervisor"
    top.mkdir()
    (top / "type").write_text("xen\n")
    (top / "uuid").write_text("ec2e1916-9099-7caf-fd21-0123456789ab\n")
    return top


@dataclass(frozen=True)
class Instance:
    """One EC2 instance of the rehearsal: its id, ENI and VPC address."""

    instance_id: str
    mac: str
    address: str
    eni_id: str = ""


class AwsStandIn:
    """moto, the fake IMDS and the VPC router in the lab's fabric; stopped by their pids."""

    def __init__(self, lab: LabHandle, folder: Path) -> None:
        self.lab, self.folder = lab, folder
        self.fabric = lab.ns("fabric")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.imds_data = folder / "imds.json"
        self.url = f"http://{MOTO_ADDR}:{MOTO_PORT}"

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.folder / f"{name}.log", "ab") as log:
            self.procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", self.fabric, *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})},
                    start_new_session=True,
                )  # fmt: skip
            )

    def in_fabric(self, fn: Callable[[], Any]) -> Any:
        from gatepeer.lab.network import netns

        return netns.call_in_netns(self.fabric, fn)

    def start(self) -> None:
        from gatepeer.lab.processes import vpc_routes

        for address in (f"{MOTO_ADDR}/24", f"{IMDS_ADDR}/24"):
            _run(["ip", "-n", self.fabric, "address", "add", address, "dev", "vpcbr"])
        _run(["ip", "-n", self.fabric, "address", "replace", f"{vpc_routes.EC2_ADDR}/32",
              "dev", "lo"])  # fmt: skip
        self._start("moto", [sys.executable, "-m", "moto.server", "-H", "0.0.0.0",
                             "-p", str(MOTO_PORT)])  # fmt: skip
        self.imds_data.write_text("{}")
        self._start("imds", [sys.executable, str(REPO / "tests" / "helpers" / "rehearsal_imds.py"),
                             "--listen", f"{IMDS_ADDR}:{IMDS_PORT}",
                             "--data", str(self.imds_data)])  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                self.in_fabric(lambda: self.client("ec2").describe_vpcs())
                break
            except Exception:  # noqa: BLE001 - still starting
                assert time.monotonic() < deadline, (self.folder / "moto.log").read_text()[-2000:]
                time.sleep(0.3)

    def client(self, service: str) -> Any:
        from helpers.stack_moto import client

        return client(self.url, service)

    def follow_routes(self, table: str, enis: dict[str, str]) -> None:
        """The lab's VPC router: the VPC host's route to the devices follows moto's table."""
        self._start(
            "vpc-router",
            [sys.executable, "-m", "gatepeer.lab.processes.vpc_routes", "--table", table,
             "--subnet", str(self.lab.layout.device_subnet), "--vpc-ns", self.lab.ns("vpc"),
             *(f"--eni={eni}={address}" for eni, address in enis.items())],
        )  # fmt: skip

    def set_instance(self, instance: Instance, vpc: Any) -> None:
        from helpers.rehearsal_imds import instance_data
        from helpers.stack_moto import REGION, SUBNET_CIDRS, VPC_CIDR

        data = instance_data(
            instance_id=instance.instance_id, mac=instance.mac, eni_id=instance.eni_id,
            address=instance.address, subnet_id=vpc.subnet_ids[0], subnet_cidr=SUBNET_CIDRS[0],
            vpc_id=vpc.vpc_id, vpc_cidr=VPC_CIDR, region=REGION,
        )  # fmt: skip
        self.imds_data.write_text(json.dumps(data))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        self.procs = []


def seed_instance(root: Path, user_data: str, instance: Instance) -> None:
    """What EC2 hands a new instance: user-data and an instance id, here as a NoCloud seed for
    the image's own cloud-init; plus the lab's stand-ins (ENI address, AWS endpoints)."""
    seed = root / "var" / "lib" / "cloud" / "seed" / "nocloud"
    seed.mkdir(parents=True, exist_ok=True)
    (seed / "meta-data").write_text(
        f"instance-id: {instance.instance_id}\nlocal-hostname: gatepeer-{instance.instance_id}\n"
    )
    (seed / "user-data").write_text(user_data)
    (root / "etc" / "cloud" / "cloud.cfg.d" / "90-gatepeer-lab.cfg").write_text(LAB_CLOUD_CFG)
    drop_in = root / "etc" / "systemd" / "system" / "gatepeer.service.d"
    drop_in.mkdir(parents=True, exist_ok=True)
    (drop_in / "lab-aws.conf").write_text(LAB_AWS_DROP_IN)
    units = root / "etc" / "systemd" / "system"
    # The ENI's MAC is the one IMDS names (gatepeer finds the underlay by it).
    set_mac = f"ExecStart=/sbin/ip link set host0 address {instance.mac}\n"
    eni_unit = LAB_ENI_UNIT.replace(PEER_ADDR, instance.address).replace(
        "ExecStart=/sbin/ip link set host0 mtu", set_mac + "ExecStart=/sbin/ip link set host0 mtu"
    )
    assert instance.mac in eni_unit
    (units / "lab-eni.service").write_text(eni_unit)
    wants = units / "network-online.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "lab-eni.service").symlink_to("/etc/systemd/system/lab-eni.service")
    assert not (root / "etc" / "gatepeer" / "gatepeer.toml").exists(), "the image has a config"


def wait_forwarding(lab: LabHandle, machine: Machine) -> float:
    """The first moment (time.monotonic) a VPC host's ping reaches a device and comes back."""
    device = str(lab.layout.devices[0])
    deadline = time.monotonic() + FORWARDING_TIMEOUT_S
    while True:
        ping = lab.run("vpc", "ping", "-c", "1", "-W", "0.3", device, check=False)
        if ping.returncode == 0:
            return time.monotonic()
        assert machine.proc is not None and machine.proc.poll() is None, machine.console()
        assert time.monotonic() < deadline, (
            f"no forwarding to {device}\n{forwarding_report(lab, machine)}\n{machine.debug()}"
        )
        time.sleep(0.05)


def forwarding_report(lab: LabHandle, machine: Machine) -> str:
    """What a failed forwarding wait needs to be understood: both ends' routes and tunnel."""
    out = [
        f"emulator: peers {lab.state().get('peers')}, redirection {lab.state().get('redirection')}"
    ]
    for argv in (["ip", "route"], ["ip", "neigh"]):
        out.append(f"vpc host {' '.join(argv)}: {lab.run('vpc', *argv, check=False).stdout}")
    for argv in (
        ["ip", "-s", "-br", "link"],
        ["ip", "neigh"],
        ["ip", "route", "show", "table", "all"],
        ["bridge", "fdb", "show", "dev", "vxlan0"],
    ):
        proc = lab.run("vpg1", *argv, check=False)
        out.append(f"vpg1 {' '.join(argv)}: {proc.stdout[-1500:]}{proc.stderr[-200:]}")
    for argv in (
        ["ip", "-br", "address"],
        ["ip", "-s", "link", "show", "vxlan0"],
        ["ip", "-s", "link", "show", "host0"],
        ["ip", "neigh"],
        ["ip", "route"],
        ["bridge", "fdb", "show", "dev", "vxlan0"],
        ["sysctl", "net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter"],
        ["nft", "list", "counters"],
    ):
        proc = machine.run(*argv, check=False)
        out.append(f"peer {' '.join(argv)}: {proc.stdout[-2500:]}{proc.stderr[-300:]}")
    return "\n".join(out)


def unit_started_at(machine: Machine) -> float:
    """gatepeer.service's start, on the host's CLOCK_MONOTONIC (the container shares it)."""
    value = machine.unit("ExecMainStartTimestampMonotonic")["ExecMainStartTimestampMonotonic"]
    return int(value) / 1e6


def test_rehearsal_stack_user_data_boots_then_a_replacement_takes_over(
    provisioned_root: Path, make_lab: Callable[..., LabHandle], tmp_path: Path
) -> None:
    from helpers.stack_moto import AUTH_KEY_PARAMETER, deploy_stack, moto_network

    # The image as built: cloud-init (as Debian's AMIs) and the [aws] extra, no config.
    nspawn_run(provisioned_root, "/opt/gatepeer/venv/bin/python", "-c", "import boto3")
    nspawn_run(provisioned_root, "cloud-init", "--version")
    # keepalived's health script ships in the package, and the image's /bin/sh runs it.
    nspawn_run(provisioned_root, "/bin/sh", "-c",
               'script=$(/opt/gatepeer/venv/bin/python -c "from gatepeer.ha import verdict;'
               ' print(verdict.SCRIPT)") && echo "$(date +%s) 1 ok" > /tmp/verdict &&'
               ' /bin/sh "$script" /tmp/verdict 4 && ! /bin/sh "$script" /tmp/none 4')  # fmt: skip
    # A replacement launches from the same AMI: a second copy, taken before any boot.
    root2 = tmp_path / "root2"
    _run(["cp", "-a", "--reflink=auto", str(provisioned_root), str(root2)])

    lab = make_lab()
    hand_over_peer_address(lab)
    # The test pings from the moment the machine boots. Until gatepeer has built the tunnel,
    # the booted system forwards the VPC host's packets for the devices back out of its ENI
    # and tells the host so with an ICMP redirect, which Linux caches (to the fabric, which
    # has no route to the devices) and would keep using after the tunnel is up. In a VPC the
    # hosts' next hop is always the VPC router; the lab's VPC host ignores redirects likewise.
    lab.run("vpc", "sysctl", "-q", "-w", "net.ipv4.conf.all.accept_redirects=0",
            "net.ipv4.conf.eth0.accept_redirects=0")  # fmt: skip
    lab_soracom = tomllib.loads(lab.paths.config.read_text())["soracom"]
    aws = AwsStandIn(lab, tmp_path)
    machines: list[Machine] = []
    try:
        aws.start()

        def deploy() -> tuple[Any, Any, dict[str, str]]:
            vpc = moto_network(aws.url)
            aws.client("ssm").put_parameter(
                Name=AUTH_KEY_PARAMETER, Type="SecureString",
                Value=lab.paths.auth_key.read_text().strip(),
            )  # fmt: skip
            stack = deploy_stack(
                aws.url,
                vpc.parameters(
                    SoracomApiEndpoint=lab_soracom["endpoint"],
                    AuthKeyId=lab_soracom["auth_key_id"],
                    VpgId=lab_soracom["vpg_id"],
                    VpgEndpoints=",".join(str(e.outer) for e in lab.layout.endpoints),
                    Mode="route",
                    Redirection="self",
                    Peers="single",
                ),
            )
            ec2 = aws.client("ec2")
            held = {
                a["PrivateIpAddress"]
                for eni in ec2.describe_network_interfaces()["NetworkInterfaces"]
                for a in eni["PrivateIpAddresses"]
            }
            assert not {PEER_ADDR, REPLACEMENT_ADDR} & held, f"moto already holds {held}"
            enis = {
                address: ec2.create_network_interface(
                    SubnetId=vpc.subnet_ids[0], PrivateIpAddress=address
                )["NetworkInterface"]["NetworkInterfaceId"]
                for address in (PEER_ADDR, REPLACEMENT_ADDR)
            }
            return vpc, stack, enis

        vpc, stack, enis = aws.in_fabric(deploy)
        table = vpc.route_table_id
        aws.follow_routes(table, {eni: address for address, eni in enis.items()})
        first = Instance("i-0rehearsal00000001", "0a:00:00:00:00:01", PEER_ADDR, enis[PEER_ADDR])
        second = Instance(
            "i-0rehearsal00000002", "0a:00:00:00:00:02", REPLACEMENT_ADDR, enis[REPLACEMENT_ADDR]
        )
        seed_instance(provisioned_root, stack.user_data, first)
        seed_instance(root2, stack.user_data, second)
        nspawn_args = (f"--bind-ro={ec2_hypervisor(tmp_path)}:/sys/hypervisor",)

        def route_target() -> str | None:
            def ask() -> str | None:
                (answer,) = aws.client("ec2").describe_route_tables(RouteTableIds=[table])[
                    "RouteTables"
                ]
                for route in answer["Routes"]:
                    if route.get("DestinationCidrBlock") == str(lab.layout.device_subnet):
                        return str(route.get("NetworkInterfaceId"))
                return None

            return str(aws.in_fabric(ask))

        figures = []
        for n, (root, instance) in enumerate(((provisioned_root, first), (root2, second)), 1):
            aws.set_instance(instance, vpc)
            machine = Machine(
                root, f"gp{lab.prefix}{n}", lab, tmp_path / f"console{n}.log", nspawn_args
            )
            machines.append(machine)
            booted = time.monotonic()
            machine.boot()
            forwarding = wait_forwarding(lab, machine)
            started = unit_started_at(machine)
            figures.append((instance.instance_id, forwarding - booted, forwarding - started))

            # cloud-init itself wrote the stack's config, and the key came from SSM.
            config = (root / "etc" / "gatepeer" / "gatepeer.toml").read_text()
            assert "auth_key_ssm_parameter" in config and f'route_tables = ["{table}"]' in config
            assert "auth_key_file" not in config
            state = assert_peer_up(machine, lab, "ok", instance.address)
            assert state["host"]["underlay"] == "host0"
            assert state["host"]["local_address"] == instance.address
            aws_state = machine.wait_state(
                lambda s: bool(
                    (s.get("aws") or {}).get("stale_registrations", {}).get("checked_at")
                    and s["aws"].get("route_tables", {}).get("tables")
                ),
                "the route claim and the stale sweep in state.json",
            )
            # The peer is registered, alone: the replaced instance's registration was removed.
            peers = [p["outer_ip"] for p in lab.state()["peers"]]
            assert peers == [instance.address], peers
            inner = next(p["inner_ip"] for p in lab.state()["peers"])
            redirection = lab.state().get("redirection") or {}
            assert redirection.get("gateway") == inner and redirection.get("enabled"), redirection
            # The VPC route (moto) points at this instance's ENI, and status says so.
            machine.wait(lambda i=instance: route_target() == i.eni_id, "the route on our ENI", 20)
            claim = aws_state["aws"]["route_tables"]
            assert claim["eni_id"] == instance.eni_id and claim["error"] is None, claim
            expected = "created" if n == 1 else "replaced"
            assert claim["tables"] == {table: expected}, claim
            status = machine.run("gatepeer", "status", check=False).stdout
            assert f"-> {instance.eni_id}" in status, status
            ping_device(lab, machine)
            if n == 1:
                assert aws_state["aws"]["stale_registrations"]["removed"] == []
                # The instance goes away as Auto Scaling replaces it: powered off, its ENI
                # deleted with it (DeleteOnTermination). Nobody unregisters it by hand.
                assert machine.power_off() == 0
                aws.in_fabric(
                    lambda: aws.client("ec2").delete_network_interface(
                        NetworkInterfaceId=first.eni_id
                    )
                )
            else:
                removed = aws_state["aws"]["stale_registrations"]["removed"]
                assert removed == [PEER_ADDR], aws_state["aws"]
                journal = machine.run("journalctl", "-b", "-u", "gatepeer.service",
                                      "--no-pager").stdout  # fmt: skip
                assert f"unregistering {PEER_ADDR} from VPG" in journal
        print("\nrehearsal: boot to forwarding (VPC host pings a device)")
        for instance_id, from_boot, from_unit in figures:
            print(
                f"  {instance_id}: {from_boot:.2f} s after the boot began, "
                f"{from_unit:.2f} s after gatepeer.service started"
            )
    finally:
        for machine in machines:
            machine.power_off()
        aws.stop()
