"""The image's side of an HA pair's connection sync: provision.sh installs conntrackd (disabled:
a single peer has no use for it) and the drop-in that orders it after gatepeer and before
keepalived and renders its config from [ha]; the bundle carries the drop-in; systemd accepts
Debian's conntrackd.service with it. The boot of a provisioned image is test_boot_lab.py."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DROP_IN = REPO / "systemd" / "conntrackd-gatepeer.conf"
KEEPALIVED_DROP_IN = REPO / "systemd" / "keepalived-gatepeer.conf"
DEBIAN_UNIT = Path("/lib/systemd/system/conntrackd.service")
DEBIAN_KEEPALIVED_UNIT = Path("/lib/systemd/system/keepalived.service")


def unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def values(path: Path, section: str, key: str) -> list[str]:
    """Every value of a key that may repeat (configparser keeps the last: read by hand)."""
    out, current = [], None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(f"{key}="):
            out.append(line.split("=", 1)[1])
    return out


def test_conntrackd_runs_after_gatepeer_and_before_keepalived() -> None:
    assert values(DROP_IN, "Unit", "After") == ["gatepeer.service"]
    assert values(DROP_IN, "Unit", "Wants") == ["gatepeer.service"]
    assert values(DROP_IN, "Unit", "Before") == ["keepalived.service"]
    assert "conntrackd.service" in values(KEEPALIVED_DROP_IN, "Unit", "After")


def test_conntrackd_config_is_rendered_from_ha_at_every_start() -> None:
    pre = unit(DROP_IN).get("Service", "ExecStartPre")
    # Debian's unit reads /etc/conntrackd/conntrackd.conf: the render writes exactly there.
    assert pre == (
        "/opt/gatepeer/venv/bin/gatepeer ha render --conntrackd -o /etc/conntrackd/conntrackd.conf"
    )
    if DEBIAN_UNIT.exists():
        start = unit(DEBIAN_UNIT).get("Service", "ExecStart")
        assert start.endswith("-C /etc/conntrackd/conntrackd.conf")


def verify(unit_dir: Path, name: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of the unit `name` as found in `unit_dir` (with its drop-ins),
    gatepeer's command standing in a private tmpfs over /opt."""
    script = (
        "set -e; mount -t tmpfs gatepeer-verify /opt; mkdir -p /opt/gatepeer/venv/bin; "
        "printf '#!/bin/sh\\n' > /opt/gatepeer/venv/bin/gatepeer; "
        "chmod 0755 /opt/gatepeer/venv/bin/gatepeer; "
        f"SYSTEMD_UNIT_PATH={unit_dir}: exec systemd-analyze verify --man=no {name}"
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("debian_unit", "drop_in", "key"),
    [(DEBIAN_UNIT, DROP_IN, "Before"), (DEBIAN_KEEPALIVED_UNIT, KEEPALIVED_DROP_IN,
      "ConditionFileNotEmpty")],
    ids=["conntrackd", "keepalived"],
)  # fmt: skip
def test_debians_unit_verifies_with_the_drop_in(
    tmp_path: Path, debian_unit: Path, drop_in: Path, key: str
) -> None:
    name = debian_unit.name
    if not debian_unit.exists() or not shutil.which("systemd-analyze"):
        pytest.skip(f"Debian's {name} or systemd-analyze is not installed")
    shutil.copy(debian_unit, tmp_path / name)
    (tmp_path / f"{name}.d").mkdir()
    installed = tmp_path / f"{name}.d" / "gatepeer.conf"
    shutil.copy(drop_in, installed)
    proc = verify(tmp_path, name)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    # The check can fail: a misspelt key in the drop-in is reported.
    installed.write_text(drop_in.read_text().replace(f"{key}=", f"{key}x="))
    assert f"Unknown key '{key}x'" in verify(tmp_path, name).stderr


def test_provision_installs_conntrackd_disabled_with_the_drop_in() -> None:
    text = (REPO / "scripts" / "provision.sh").read_text()
    packages = next(ln for ln in text.splitlines() if ln.startswith("packages=("))
    assert "conntrackd" in packages.split("(", 1)[1].rstrip(")").split()
    assert (
        'install -D -m 0644 "$bundle/systemd/conntrackd-gatepeer.conf" \\\n'
        "    /usr/lib/systemd/system/conntrackd.service.d/gatepeer.conf"
    ) in text
    assert "\nsystemctl disable conntrackd.service\n" in text


def test_provision_installs_keepalived_disabled_with_the_drop_in() -> None:
    """In the image, so a pair in a VPC without a way to Debian's mirrors can elect; off until
    the pair's user-data enables it (a single peer has no use for it)."""
    text = (REPO / "scripts" / "provision.sh").read_text()
    packages = next(ln for ln in text.splitlines() if ln.startswith("packages=("))
    assert "keepalived" in packages.split("(", 1)[1].rstrip(")").split()
    assert (
        'install -D -m 0644 "$bundle/systemd/keepalived-gatepeer.conf" \\\n'
        "    /usr/lib/systemd/system/keepalived.service.d/gatepeer.conf\n"
        "systemctl disable keepalived.service\n"
    ) in text


def test_keepalived_drop_in_clears_debians_condition_on_the_config() -> None:
    """Debian's unit starts only with a non-empty keepalived.conf, which only the drop-in's
    render writes: the drop-in must reset that condition, or keepalived never starts on a
    fresh instance (systemd skips the unit, render and all, without an error)."""
    assert values(KEEPALIVED_DROP_IN, "Unit", "ConditionFileNotEmpty") == [""]
    if DEBIAN_KEEPALIVED_UNIT.exists():
        assert values(DEBIAN_KEEPALIVED_UNIT, "Unit", "ConditionFileNotEmpty") == [
            "/etc/keepalived/keepalived.conf"
        ]
    pre = unit(KEEPALIVED_DROP_IN).get("Service", "ExecStartPre")
    assert pre.endswith(" ha render -o /etc/keepalived/keepalived.conf")


def test_provision_refuses_a_bundle_without_the_drop_in(tmp_path: Path) -> None:
    """Checked before anything is installed: exit 2 and one line naming the missing file."""

    if os.geteuid() != 0:
        pytest.skip("provision.sh refuses non-root first")
    systemd = tmp_path / "systemd"
    systemd.mkdir()
    for name in (
        "gatepeer.service",
        "gatepeer.sysusers",
        "gatepeer.sysctl.conf",
        "keepalived-gatepeer.conf",
    ):
        (systemd / name).write_text("")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "provision.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"provision: {tmp_path}/systemd/conntrackd-gatepeer.conf missing: not a bundle from "
        "scripts/bundle.sh"
    ]


def test_bundle_carries_the_drop_in(tmp_path: Path) -> None:

    out = tmp_path / "bundle"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "bundle.sh"), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "systemd" / "conntrackd-gatepeer.conf").read_text() == DROP_IN.read_text()
