"""Delivery: the systemd unit, the cloud-init examples, the Packer template, the provisioning
script and the config reference (docs/configuration.md). Each check runs the real tool where one
exists (systemd-analyze, cloud-init, packer); the boot of the provisioned image is test_boot_lab.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from gatepeer import config as cfg
from gatepeer.desired_state import neighbour_thresholds

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "gatepeer.service"
AMI = REPO / "ami"
CLOUD_INIT = REPO / "cloud-init"
EXAMPLES = sorted(CLOUD_INIT.glob("*.yaml"))
MAX_EXPOSURE = 2.5


def need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs {tool} (Debian package {package})")


def need_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


# ---- the unit --------------------------------------------------------------------------------


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; a key may repeat (SystemCallFilter=)."""
    entries, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_entries(UNIT.read_text()) if s == section and k == key]


def unit_value(section: str, key: str) -> str:
    values = unit_values(section, key)
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times: {values}"
    return values[0]


def exposure(unit_file: Path) -> float:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, f"no exposure level in:\n{proc.stdout[-2000:]}\n{proc.stderr}"
    return float(found.group(1))


def test_unit_exposure_within_target() -> None:
    need("systemd-analyze", "systemd")
    assert exposure(UNIT) <= MAX_EXPOSURE


def test_exposure_parser_sees_a_weaker_unit(tmp_path: Path) -> None:
    """The same unit without its file system, capability and syscall restrictions scores
    worse than the target: the score above is measured, not assumed."""
    need("systemd-analyze", "systemd")
    dropped = ("ProtectSystem", "CapabilityBoundingSet", "SystemCallFilter", "PrivateDevices")
    weak = tmp_path / "gatepeer.service"
    weak.write_text(
        "\n".join(ln for ln in UNIT.read_text().splitlines() if not ln.startswith(dropped))
    )
    assert exposure(weak) > MAX_EXPOSURE


def test_readme_records_the_exposure() -> None:
    need("systemd-analyze", "systemd")
    page = (REPO / "docs" / "systemd-unit.md").read_text()
    recorded = re.search(r"exposure of \*\*(\d+\.\d+)\*\*", page)
    assert recorded, "docs/systemd-unit.md does not record the exposure as 'exposure of **N.N**'"
    assert float(recorded.group(1)) == exposure(UNIT)


def test_every_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` on each unit in systemd/, with /opt/gatepeer present in a
    private mount namespace (a tmpfs over /opt that vanishes with it; the host is untouched)."""
    need("systemd-analyze", "systemd")
    need("unshare", "util-linux")
    need_root("a private mount namespace to stand /opt/gatepeer up in")
    units = sorted((REPO / "systemd").glob("*.service"))
    assert units
    script = (
        "set -e; mount -t tmpfs gatepeer-verify /opt; mkdir -p /opt/gatepeer/venv/bin; "
        "printf '#!/bin/sh\\n' > /opt/gatepeer/venv/bin/gatepeer; "
        "chmod 0755 /opt/gatepeer/venv/bin/gatepeer; "
        'exec systemd-analyze verify --man=no "$@"'
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "verify"]
        + [str(u) for u in units],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_unit_runs_the_daemon_as_notify_with_watchdog_and_restart() -> None:
    assert unit_value("Service", "Type") == "notify"
    assert unit_value("Service", "ExecStart") == "/opt/gatepeer/venv/bin/gatepeer run"
    assert unit_value("Service", "Restart") == "on-failure"
    watchdog = cfg.parse_duration(unit_value("Service", "WatchdogSec"), "WatchdogSec")
    # The loop pings at half the interval; it must outlast the longest sleep between pings.
    assert watchdog >= 2 * cfg.AgentConfig.reconcile_interval
    for key in ("Wants", "After"):
        assert "network-online.target" in unit_value("Unit", key).split()
    assert unit_value("Unit", "ConditionPathExists") == str(cfg.DEFAULT_PATH)


def test_unit_privileges_are_exactly_what_the_agent_needs() -> None:
    user = unit_value("Service", "User")
    sysusers = (REPO / "systemd" / "gatepeer.sysusers").read_text()
    assert re.search(rf"^u {user} ", sysusers, re.M), "the unit's user is not the sysusers one"
    wanted = {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(unit_value("Service", "CapabilityBoundingSet").split()) == wanted
    assert set(unit_value("Service", "AmbientCapabilities").split()) == wanted
    assert unit_value("Service", "NoNewPrivileges") == "yes"
    assert unit_value("Service", "ProtectSystem") == "strict"
    # Writable: the net sysctls, and the two directories systemd makes for the state files.
    assert unit_value("Service", "ReadWritePaths").split() == ["/proc/sys/net"]
    runtime = Path("/run") / unit_value("Service", "RuntimeDirectory")
    state = Path("/var/lib") / unit_value("Service", "StateDirectory")
    assert cfg.AgentConfig.state_file.parent == runtime
    assert cfg.AgentConfig.gate_cache is not None
    assert cfg.AgentConfig.gate_cache.parent == state
    families = set(unit_value("Service", "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}
    assert "@system-service" in unit_values("Service", "SystemCallFilter")


def test_sysctl_defaults_match_the_agent() -> None:
    """The boot-time defaults are what the agent itself sets for the default config."""
    conf = REPO / "systemd" / "gatepeer.sysctl.conf"
    values = dict(
        (k.strip(), int(v))
        for k, _, v in (
            ln.partition("=") for ln in conf.read_text().splitlines() if "=" in ln and ln[0] != "#"
        )
    )
    g1, g2, g3 = neighbour_thresholds(cfg.KernelConfig.neighbour_table_devices)
    assert values == {
        "net.ipv4.ip_forward": 1,
        "net.ipv4.conf.all.send_redirects": 0,
        "net.ipv4.neigh.default.gc_thresh1": g1,
        "net.ipv4.neigh.default.gc_thresh2": g2,
        "net.ipv4.neigh.default.gc_thresh3": g3,
    }


def test_service_user_sees_net_sysctls_as_writable() -> None:
    """As the unit runs it (not root, ambient CAP_NET_ADMIN), in a throwaway network namespace:
    the agent must see net sysctls as writable and write them. Plain access(2) drops a non-root
    caller's capabilities and answered "read-only" for every one of them."""
    need("unshare", "util-linux")
    need("setpriv", "util-linux")
    need_root("a throwaway network namespace and a switch to an unprivileged user")
    script = (
        "from gatepeer.kernel import nftables, sysctl\n"
        "print(sysctl.read_writable('net/ipv4/ip_forward'))\n"
        "sysctl.write('net/ipv4/ip_forward', 1)\n"
        "print(sysctl.read('net/ipv4/ip_forward'))\n"
        "print(nftables.unwritable([('net/ipv4/conf/all/send_redirects', 0)]))\n"
    )
    proc = subprocess.run(
        [
            "unshare", "--net", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=+net_admin", "--ambient-caps=+net_admin", sys.executable, "-c", script,
        ],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["0", "1", "[]"]


# ---- provisioning ----------------------------------------------------------------------------


def test_provision_script_parses() -> None:
    for script in ("provision.sh", "bundle.sh"):
        proc = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], capture_output=True)
        assert proc.returncode == 0, proc.stderr


def test_provision_refuses_what_is_not_a_bundle(tmp_path: Path) -> None:
    """Checked before anything is installed: exit 2 and one line naming what is missing."""
    need_root("provision.sh refuses non-root first")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "provision.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"provision: {tmp_path}/systemd/gatepeer.service missing: not a bundle from "
        "scripts/bundle.sh"
    ]


@pytest.fixture(scope="module")
def bundle_with_dependencies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the AMI's release pipeline and the boot test install from (needs PyPI or pip's
    cache for the dependencies' wheels)."""
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "bundle.sh"), str(out), "--with-dependencies"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=600,
    )
    if proc.returncode != 0 and "No matching distribution" in proc.stderr + proc.stdout:
        pytest.skip(f"no package index reachable for the dependencies' wheels: {proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_bundle_carries_the_aws_extra(bundle_with_dependencies: Path) -> None:
    """The image reads its key from SSM and its facts from IMDS: boto3 must be in the bundle,
    or an image provisioned with PIP_NO_INDEX=1 has none (issue 16, item 1)."""
    wheels = sorted(
        p.name.split("-")[0].lower() for p in (bundle_with_dependencies / "wheels").glob("*.whl")
    )
    assert {"gatepeer", "boto3", "botocore", "pyroute2"} <= set(wheels), wheels


def test_provision_installs_the_aws_extra() -> None:
    """provision.sh asks pip for gatepeer[aws] and checks boto3 imports (the boot test runs it
    inside a Debian root; tests/delivery/test_boot_lab.py)."""
    text = (REPO / "scripts" / "provision.sh").read_text()
    assert '"${wheels[0]}[aws]"' in text
    assert '-c "import boto3"' in text


def test_wheel_carries_the_license(tmp_path: Path) -> None:
    """pyproject says Apache-2.0; the text is LICENSE at the top and in the wheel's dist-info."""
    import zipfile

    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
         "--wheel-dir", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("gatepeer-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        licenses = [n for n in zf.namelist() if n.endswith("/LICENSE") and ".dist-info/" in n]
        assert licenses, zf.namelist()
        assert zf.read(licenses[0]).decode() == license_text


# ---- cloud-init examples ---------------------------------------------------------------------


def example_id(path: Path) -> str:
    return path.stem


# What each example is for, checked on its effective config (`gatepeer config check --json`).
# Route mode means one thing in every example: redirection to this peer (connections VPC hosts
# open to devices reply through it) and traffic leaving the VPC masqueraded (no return route).
ROUTE_MODE = {
    ("packet_path", "mode"): "route",
    ("soracom", "redirection"): "self",
    ("packet_path", "outside_vpc"): "masquerade",
}
EXPECTED = {
    "route": ROUTE_MODE,
    "nat-redirection": {("packet_path", "mode"): "nat", ("soracom", "redirection"): "self"},
    "ssm-auth-key": {
        **ROUTE_MODE,
        ("soracom", "auth_key_ssm_parameter"): "/gatepeer/auth-key",
    },
    "non-ec2": {
        **ROUTE_MODE,
        ("tunnel", "mtu"): "auto",
        ("tunnel", "underlay_interface"): "eth0",
        ("tunnel", "local_address"): "10.0.1.4",
        ("packet_path", "vpc_cidrs"): ["10.0.0.0/16"],
    },
}
# What a user fills in for the examples' placeholders.
FILLED = {
    "keyId-REPLACE-WITH-YOUR-AUTH-KEY-ID": "keyId-0123456789abcdef0123456789abcdef",
    "REPLACE-WITH-YOUR-VPG-ID": "vpg-0123abcd",
}


def test_every_purpose_has_an_example() -> None:
    assert sorted(p.stem for p in EXAMPLES) == sorted(EXPECTED)


@pytest.mark.parametrize("example", EXAMPLES, ids=example_id)
def test_example_passes_cloud_init_schema(example: Path) -> None:
    need("cloud-init", "cloud-init")
    proc = subprocess.run(
        ["cloud-init", "schema", "-c", str(example)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def user_data(example: Path) -> dict[str, Any]:
    text = example.read_text()
    assert text.startswith("#cloud-config\n")
    return dict(yaml.safe_load(text))


def written(example: Path) -> dict[str, dict[str, Any]]:
    return {f["path"]: f for f in user_data(example)["write_files"]}


@pytest.mark.parametrize("example", EXAMPLES, ids=example_id)
def test_example_writes_config_secret_reference_and_enables(example: Path) -> None:
    files = written(example)
    config = tomllib.loads(files[str(cfg.DEFAULT_PATH)]["content"])
    soracom = config["soracom"]
    assert ("auth_key_file" in soracom) != ("auth_key_ssm_parameter" in soracom)
    if "auth_key_file" in soracom:
        key = files[soracom["auth_key_file"]]
        # Readable by the service user only: config check refuses anything looser.
        assert key["owner"] == f"{unit_value('Service', 'User')}:{unit_value('Service', 'Group')}"
        assert key["permissions"] == "0600"
    runcmd = user_data(example)["runcmd"]
    assert ["systemctl", "enable", "--now", "--no-block", "gatepeer.service"] in runcmd


def render_example(example: Path, root: Path, *, filled: bool = True) -> Path:
    """Write the example's files under `root`, its paths re-rooted there, as cloud-init would
    write them on the instance, the placeholders filled in as a user would (unless `filled`
    is false); returns the config's path."""
    for entry in user_data(example)["write_files"]:
        target = root / entry["path"].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        content = entry["content"].replace("/etc/gatepeer/", f"{root}/etc/gatepeer/")
        for placeholder, value in FILLED.items() if filled else ():
            content = content.replace(placeholder, value)
        target.write_text(content)
        target.chmod(int(entry.get("permissions", "0644"), 8))
    return root / str(cfg.DEFAULT_PATH).lstrip("/")


@pytest.mark.parametrize("example", EXAMPLES, ids=example_id)
def test_example_config_checks(example: Path, tmp_path: Path) -> None:
    """`gatepeer config check` accepts the example's TOML, system checks included; an
    underlay it names exists in a throwaway network namespace made for the check."""
    config = render_example(example, tmp_path)
    argv = [sys.executable, "-m", "gatepeer", "config", "check", "--json", "--config", str(config)]
    underlay = tomllib.loads(config.read_text()).get("tunnel", {}).get("underlay_interface")
    if underlay:
        need("unshare", "util-linux")
        need_root(f"a private network namespace with an interface named {underlay}")
        argv = [
            "unshare", "--net", "sh", "-c",
            f'ip link add {underlay} type veth peer name {underlay}p && exec "$@"', "check",
            *argv,
        ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    effective = json.loads(proc.stdout)
    for (section, key), value in EXPECTED[example.stem].items():
        assert effective[section][key] == value, (section, key)


@pytest.mark.parametrize("example", EXAMPLES, ids=example_id)
def test_example_left_unfilled_is_refused_naming_each_placeholder(
    example: Path, tmp_path: Path
) -> None:
    """Copied without filling in: `config check` names every placeholder's key, one line
    each, exit 2 (the host checks are not reached, so no namespace is needed)."""
    config = render_example(example, tmp_path, filled=False)
    argv = [sys.executable, "-m", "gatepeer", "config", "check", "--config", str(config)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    keys = [line.split(": ")[2] for line in proc.stderr.splitlines()]
    assert keys == ["soracom.auth_key_id", "soracom.vpg_id"], proc.stderr
    assert "secret-REPLACE" not in proc.stderr


# ---- the Packer template ---------------------------------------------------------------------

PLUGINS_FILE = "plugins.pkr.hcl"
VAR_FILES = {"x86_64": "x86_64.pkrvars.hcl", "arm64": "arm64.pkrvars.hcl"}


def packer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # No version check against HashiCorp's servers: CI must not depend on them.
    env = {**os.environ, "CHECKPOINT_DISABLE": "1"}
    return subprocess.run(["packer", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_packer_fmt_check() -> None:
    need("packer", "packer")
    proc = packer("fmt", "-check", ".", cwd=AMI)
    assert proc.returncode == 0, f"not formatted: {proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("arch", sorted(VAR_FILES))
def test_packer_validate_syntax_only(arch: str, tmp_path: Path) -> None:
    """Debian's packer 1.6.6 knows no `required_plugins`: every file but that block's."""
    need("packer", "packer")
    for f in AMI.glob("*.hcl"):
        if f.name != PLUGINS_FILE:
            shutil.copy(f, tmp_path / f.name)
    proc = packer("validate", "-syntax-only", f"-var-file={VAR_FILES[arch]}", ".", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def hcl(name: str) -> dict[str, Any]:
    import hcl2

    with open(AMI / name) as f:
        return dict(hcl2.load(f))


def unquote(value: Any) -> Any:
    """python-hcl2 keeps string literals' quotes."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def test_packer_template_structure() -> None:
    template = hcl("gatepeer.pkr.hcl")
    sources = template["source"]
    assert len(sources) == 1 and list(sources[0]) == ['"amazon-ebs"']
    (source,) = sources[0]['"amazon-ebs"'].values()
    assert unquote(source["imds_support"]) == "v2.0"
    assert unquote(source["metadata_options"][0]["http_tokens"]) == "required"
    (ami_filter,) = source["source_ami_filter"]
    assert [unquote(o) for o in ami_filter["owners"]] == ["136693071363"]  # Debian's account
    assert unquote(ami_filter["filters"]["name"]).startswith("debian-12-")
    assert ami_filter["filters"]["architecture"] == "${var.architecture}"
    assert ami_filter["most_recent"] is True
    # The image is made by the same script the boot test runs.
    (build,) = template["build"]
    commands = [
        unquote(c)
        for p in build["provisioner"]
        for kind, body in p.items()
        if kind == '"shell"'
        for c in body["inline"]
    ]
    assert any(
        "provision.sh /tmp/gatepeer-bundle" in c and c.startswith("sudo bash") for c in commands
    )
    # The SSM agent, from AWS's package, only through the signature check (test_ami_ssm_agent).
    assert (
        "sudo bash /tmp/ssm-agent.sh install ${var.region} ${local.debian_arch} "
        "/tmp/ssm-agent-public-key.asc"
    ) in commands
    assert not any("dpkg -i" in c or "amazon-ssm-agent.deb" in c for c in commands)
    declared = {unquote(name) for block in template["variable"] for name in block}
    for arch, var_file in VAR_FILES.items():
        values = {k: unquote(v) for k, v in hcl(var_file).items()}
        assert values["architecture"] == arch
        assert set(values) <= declared
        # Graviton types (a "g" after the generation digit) are the arm64 ones.
        graviton = re.match(r"^[a-z]+\d+[a-z]*g[a-z]*\.", values["instance_type"]) is not None
        assert graviton == (arch == "arm64"), values["instance_type"]


def test_packer_required_plugins_pinned_and_documented() -> None:
    (block,) = hcl(PLUGINS_FILE)["packer"]
    (plugins,) = block["required_plugins"]
    amazon = plugins["amazon"]
    assert unquote(amazon["source"]) == "github.com/hashicorp/amazon"
    version = unquote(amazon["version"])
    page = (REPO / "docs" / "image.md").read_text()
    assert version in page, f"docs/image.md does not give {version!r}"
    # Only this file holds the block that 1.6.6 cannot read.
    for f in AMI.glob("*.hcl"):
        if f.name != PLUGINS_FILE:
            assert "required_plugins" not in f.read_text(), f.name


# ---- the config reference (docs/configuration.md) -----------------------------------------------


def config_keys() -> list[str]:
    """Every `section.key` the config accepts: the fields of Config's section dataclasses."""
    keys = []
    hints = typing.get_type_hints(cfg.Config)
    for section in dataclasses.fields(cfg.Config):
        # A section is a dataclass, or an optional one ([ha]); `source` is not a section.
        kinds = [hints[section.name], *typing.get_args(hints[section.name])]
        table = next((k for k in kinds if dataclasses.is_dataclass(k)), None)
        if table is None:
            continue
        # A field filled from another key (the AWS names of allowed_destinations) is no key.
        keys += [
            f"{section.name}.{f.name}"
            for f in dataclasses.fields(table)
            if "from_key" not in f.metadata
        ]
    return keys


def reference_table() -> dict[str, list[str]]:
    page = (REPO / "docs" / "configuration.md").read_text()
    part = page.split("## Config reference", 1)
    assert len(part) == 2, "docs/configuration.md has no '## Config reference' section"
    body = part[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and re.fullmatch(r"`[a-z_]+\.[a-z_]+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_config_keys_are_enough_to_find() -> None:
    keys = config_keys()
    assert "soracom.auth_key_id" in keys and "probes.timeout" in keys and len(keys) > 20


def test_readme_config_reference_lists_every_key() -> None:
    rows = reference_table()
    missing = [k for k in config_keys() if k not in rows]
    assert not missing, f"docs/configuration.md '## Config reference' lacks: {', '.join(missing)}"
    for key, cells in rows.items():
        assert len(cells) == 2 and all(cells), f"{key}: needs a default and a meaning"
