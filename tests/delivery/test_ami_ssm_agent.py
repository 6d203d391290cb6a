"""The AMI's SSM Agent step (ami/ssm-agent.sh): nothing is installed unless the package carries
a good signature by AWS's pinned key. The download and dpkg run only in the AWS build; here the
verification runs against a key and signature made on the spot: a good pair, a tampered
package, a signature by another key, and a key whose fingerprint is not the pinned one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "ami" / "ssm-agent.sh"
# The fingerprint AWS prints for "SSM Agent <ssm-agent-signer@amazon.com>".
AWS_FINGERPRINT = "DE92C7DA3E56E92331D62A36BC1F495C97DD04ED"


def gpg(home: Path, *args: str, data: bytes | None = None) -> str:
    proc = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
         "--passphrase", "", *args],
        input=data, capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def make_key(home: Path, name: str) -> tuple[str, Path]:
    """A signing key in its own keyring: its fingerprint and its exported public key."""
    home.mkdir(mode=0o700)
    gpg(home, "--quick-gen-key", f"{name} <{name}@example.com>", "ed25519", "sign", "never")
    fpr = next(
        line.split(":")[9]
        for line in gpg(home, "--with-colons", "--list-keys").splitlines()
        if line.startswith("fpr:")
    )
    public = home.parent / f"{name}.asc"
    public.write_text(gpg(home, "--armor", "--export", fpr))
    return fpr, public


def stop_agents(root: Path) -> None:
    """gpg starts an agent per keyring to make and use keys, and it outlives the test: stop
    each one under `root` (gpgconf addresses it by its keyring, never by name)."""
    for home in root.iterdir():
        if (home / "pubring.kbx").exists():
            subprocess.run(
                ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                capture_output=True, timeout=30,
            )  # fmt: skip


@pytest.fixture
def signed(tmp_path: Path) -> Iterator[dict[str, Path | str]]:
    if shutil.which("gpg") is None:
        pytest.skip("needs gpg (Debian package gpg)")
    fpr, public = make_key(tmp_path / "aws", "aws")
    deb = tmp_path / "amazon-ssm-agent.deb"
    deb.write_bytes(os.urandom(4096))
    sig = tmp_path / "amazon-ssm-agent.deb.sig"
    gpg(tmp_path / "aws", "--local-user", fpr, "--output", str(sig), "--detach-sign", str(deb))
    # The script with the local key pinned instead of AWS's: the logic under test is the same.
    pinned = tmp_path / "ssm-agent.sh"
    text = SCRIPT.read_text()
    assert text.count(f"SSM_AGENT_KEY_FINGERPRINT={AWS_FINGERPRINT}") == 1
    pinned.write_text(text.replace(AWS_FINGERPRINT, fpr))
    try:
        yield {"fpr": fpr, "public": public, "deb": deb, "sig": sig, "pinned": pinned}
    finally:
        stop_agents(tmp_path)


def verify(script: Path, deb: Path, sig: Path, key: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), "verify", str(deb), str(sig), str(key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_script_parses_and_pins_aws_key() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert re.search(rf"^SSM_AGENT_KEY_FINGERPRINT={AWS_FINGERPRINT}$", SCRIPT.read_text(), re.M)


def test_good_signature_passes(signed: dict) -> None:
    proc = verify(signed["pinned"], signed["deb"], signed["sig"], signed["public"])
    assert proc.returncode == 0, proc.stderr
    assert f"good signature by {signed['fpr']}" in proc.stdout


def test_tampered_package_fails(signed: dict) -> None:
    deb: Path = signed["deb"]
    data = bytearray(deb.read_bytes())
    data[100] ^= 0x01
    deb.write_bytes(bytes(data))
    proc = verify(signed["pinned"], deb, signed["sig"], signed["public"])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"ssm-agent: {deb}: no good signature by {signed['fpr']} in {signed['sig']} (BADSIG)"
    ]


def test_signature_by_another_key_fails(signed: dict, tmp_path: Path) -> None:
    """The pinned key's text, but the package signed by someone else."""
    other_fpr, _ = make_key(tmp_path / "other", "other")
    sig = tmp_path / "other.sig"
    gpg(tmp_path / "other", "--local-user", other_fpr, "--output", str(sig), "--detach-sign",
        str(signed["deb"]))  # fmt: skip
    proc = verify(signed["pinned"], signed["deb"], sig, signed["public"])
    assert proc.returncode == 1
    assert "no good signature" in proc.stderr and "(ERRSIG)" in proc.stderr  # no such key


def test_a_key_that_is_not_aws_is_refused(signed: dict) -> None:
    """The script as shipped: a valid signature by a key other than AWS's installs nothing."""
    proc = verify(SCRIPT, signed["deb"], signed["sig"], signed["public"])
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"ssm-agent: {signed['public']}: key {signed['fpr']} is not AWS's SSM Agent key "
        f"{AWS_FINGERPRINT}"
    )


def test_missing_file_and_bad_usage() -> None:
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = subprocess.run(
        ["bash", str(SCRIPT), "install", "not-a-region", "amd64", "/dev/null"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == "ssm-agent: region not-a-region: not an AWS region"
