"""The `gatepeer` command: thin click wrappers that parse, call, print and exit.

Exit codes: 0 ok, 1 degraded or failed, 2 bad usage or bad config. Heavy modules (pyroute2,
prometheus_client, scapy) are imported inside the commands that need them so that
`gatepeer --help` and `gatepeer status` stay fast.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from gatepeer import __version__
from gatepeer.config import Config, ConfigError, config_path, load

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"gatepeer: {message}", err=True)
    sys.exit(code)


def config_option(func: F) -> F:
    return click.option(
        "--config",
        "config_file",
        metavar="PATH",
        envvar=None,  # GATEPEER_CONFIG is read by config_path, after --config
        help="Config file (default: $GATEPEER_CONFIG, else /etc/gatepeer/gatepeer.toml).",
    )(func)


def load_config(config_file: str | None) -> Config:
    try:
        return load(config_path(config_file))
    except ConfigError as exc:
        # One line per problem, each naming its key.
        fail("\ngatepeer: ".join(f"config error: {line}" for line in exc.lines), EXIT_USAGE)


def running_daemon(cfg: Config) -> int | None:
    """The pid of a live `gatepeer run` for this config, from its state file."""
    from gatepeer import atomic_json
    from gatepeer.running_daemon import daemon_pid

    return daemon_pid((atomic_json.read(cfg.agent.state_file) or {}).get("pid"))


def setup_logging(verbose: bool, quiet_level: int = logging.WARNING) -> None:
    """One-shot commands print their own results: their log shows warnings unless -v."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else quiet_level,
        format="gatepeer: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # pyroute2 logs its own internals at INFO; they are noise for an operator.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gatepeer")
def main() -> None:
    """Run this host as a SORACOM Gate customer gate peer."""


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the effective config as JSON.")
def config_check(config_file: str | None, as_json: bool) -> None:
    """Validate the config and print the effective values (secrets masked)."""
    cfg = load_config(config_file)
    effective = cfg.masked()
    if as_json:
        click.echo(json.dumps(effective, indent=2))
        return
    click.echo(f"# {cfg.source}: valid")
    for section, values in effective.items():
        click.echo(f"[{section}]")
        for key, value in values.items():
            click.echo(f"{key} = {json.dumps(value)}")
    source = "auth_key_ssm_parameter" if cfg.soracom.auth_key_ssm_parameter else "auth_key_file"
    click.echo(f"# the auth key itself is read from soracom.{source} and never printed")


@main.command()
@config_option
@click.option(
    "--dry-run", is_flag=True, help="Print what would change, as commands; change nothing."
)
@click.option("-v", "--verbose", is_flag=True)
def apply(config_file: str | None, dry_run: bool, verbose: bool) -> None:
    """Reconcile once: register, build the tunnel, tune the kernel, verify."""
    cfg = load_config(config_file)
    setup_logging(verbose)
    from gatepeer.agent import Agent

    running = None if dry_run else running_daemon(cfg)
    if running is not None:
        # Two writers of one state file and one kernel state: let the daemon do it.
        fail(
            f"gatepeer run (pid {running}) manages this peer: send it SIGHUP "
            "(systemctl reload gatepeer) to reconcile now"
        )
    agent = Agent(cfg)
    try:
        result = agent.reconcile(dry_run=dry_run)
    finally:
        agent.close()
    for note in result.notes:
        click.echo(f"# note: {note}")
    if dry_run:
        for api_action in result.api_actions:  # the API's changes come first, as in a real run
            click.echo(api_action.command())
    for action in result.actions:
        click.echo(action.command() if dry_run else f"+ {action.command()}")
    if result.bad_config:
        fail("; ".join(result.reasons), EXIT_USAGE)
    if result.health == "failed":
        fail("; ".join(result.reasons))
    if not result.actions:
        click.echo("nothing to change: already converged")
    elif dry_run:
        click.echo(f"# {len(result.actions)} change(s) would be made (dry run: nothing changed)")
    else:
        click.echo(f"converged: {len(result.actions)} change(s) applied and verified")
    if result.health == "degraded":
        fail("degraded: " + "; ".join(result.reasons))


@main.command()
@config_option
@click.option("--unregister", is_flag=True, help="Also remove this peer's registration.")
@click.option("-v", "--verbose", is_flag=True)
def down(config_file: str | None, unregister: bool, verbose: bool) -> None:
    """Remove the tunnel and whatever else gatepeer created."""
    cfg = load_config(config_file)
    setup_logging(verbose)
    from gatepeer.agent import Agent
    from gatepeer.desired_state import DesiredStateError
    from gatepeer.kernel.netlink import KernelError
    from gatepeer.kernel.nftables import NftError
    from gatepeer.registration import GateError
    from gatepeer.soracom import SoracomError

    running = running_daemon(cfg)
    if running is not None:
        # The daemon would rebuild what we remove within milliseconds.
        fail(f"gatepeer run (pid {running}) keeps this peer up: stop it first, then run down")
    agent = Agent(cfg)
    try:
        removed, messages = agent.teardown(unregister=unregister)
    except DesiredStateError as exc:  # a link that is not ours under the configured name
        fail(str(exc), EXIT_USAGE)
    except (SoracomError, GateError, KernelError, NftError) as exc:
        fail(str(exc))
    except OSError as exc:  # the state file or the recorded sysctls could not be written
        fail(f"{exc.filename or 'down'}: {exc.strerror or exc}")
    finally:
        agent.close()
    for line in messages:
        click.echo(line)
    if not removed:
        click.echo("nothing to remove")


@main.command()
@config_option
@click.option("-v", "--verbose", is_flag=True)
def run(config_file: str | None, verbose: bool) -> None:
    """The daemon: keep this gate peer converged until SIGTERM."""
    cfg = load_config(config_file)
    setup_logging(verbose, quiet_level=logging.INFO)
    from gatepeer.daemon import Daemon

    def reload() -> Config:
        return load(config_path(config_file))

    sys.exit(Daemon(cfg, reload).run())


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def status(config_file: str | None, as_json: bool) -> None:
    """Registration, tunnel, VPG endpoints, packet path, last reconcile, daemon: one screen.

    Reads the live kernel and the daemon's state file, so it works while the daemon is down.
    Exit 0 healthy, 1 degraded, 2 down or not configured.
    """
    from gatepeer.status_report import gather, render, to_json

    report = gather(config_path(config_file))
    click.echo(json.dumps(to_json(report), indent=2) if as_json else render(report))
    sys.exit(report.exit_code)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the devices as JSON.")
@click.option(
    "--live",
    is_flag=True,
    help="Read the kernel's counters now, not the daemon's last reading (up to 2 min old).",
)
def devices(config_file: str | None, as_json: bool, live: bool) -> None:
    """Each device seen: address, SIM name and IMSI, online, last packet, traffic, connections.

    Devices are the SIMs of this VPG (the map the daemon keeps in devices.sim_cache) and the
    addresses the packet path counted traffic for. Exit 0, 2 bad config.
    """
    from gatepeer.devices_report import gather, render

    try:
        cfg = load(config_path(config_file), check_system=False)  # reads no secret
    except ConfigError as exc:
        fail("\ngatepeer: ".join(f"config error: {line}" for line in exc.lines), EXIT_USAGE)
    report = gather(cfg, live=live)
    # --json on one line: with 10,000 devices an indented document takes 4x longer to write.
    click.echo(json.dumps(report.to_json()) if as_json else render(report))


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(config_file: str | None, as_json: bool) -> None:
    """Pre-flight and live checks: what keeps this host from being a working gate peer.

    Each check prints ok, warn, fail or skip, its name and what to change. Read-only: it never
    registers, opens Gate or sets redirection. Exit 0 nothing failed, 1 a check failed, 2 bad
    config.
    """
    setup_logging(False, quiet_level=logging.CRITICAL)  # every finding is a check line
    from gatepeer.doctor.runner import diagnose, render, to_json

    report = diagnose(config_path(config_file))
    click.echo(json.dumps(to_json(report), indent=2) if as_json else render(report))
    sys.exit(report.exit_code)


@main.command()
@config_option
@click.option(
    "--sync",
    "sync",
    is_flag=True,
    help="Check conntrackd's sync instead (the second vrrp_script, which lowers the priority).",
)
def check(config_file: str | None, sync: bool) -> None:
    """Health check for keepalived (vrrp_script): may this peer hold the gateway?

    Tunnel up with its inner address, nftables table loaded, registered, daemon running, a VPG
    endpoint answering. With --sync: conntrackd answers, the other peer's sync messages arrive,
    no recent errors. Exit 0 healthy, 1 not, 2 bad config.
    """
    from gatepeer.ha.check import run as run_check
    from gatepeer.ha.check import run_sync

    code, line = (run_sync if sync else run_check)(config_path(config_file))
    click.echo(line, err=code != 0)
    sys.exit(code)


@main.group("ha")
def ha_group() -> None:
    """High availability: two peers, keepalived elects the master."""


@ha_group.command("render")
@config_option
@click.option(
    "-o",
    "--output",
    metavar="PATH",
    help="Write the file here (after the tool's own check passes) instead of printing it.",
)
@click.option(
    "--conntrackd",
    "for_conntrackd",
    is_flag=True,
    help="Render conntrackd.conf (the connection sync) instead of keepalived.conf.",
)
def ha_render(config_file: str | None, output: str | None, for_conntrackd: bool) -> None:
    """Print (or write) keepalived.conf, or conntrackd.conf, rendered from [ha]."""
    cfg = load_config(config_file)
    if cfg.ha is None:
        fail("config error: ha: no [ha] section in the config: nothing to render", EXIT_USAGE)
    rendered = _ha_file(cfg, "conntrackd" if for_conntrackd else "keepalived")
    if output is None:
        click.echo(rendered.text, nl=False)
        return
    _ha_write(rendered, Path(output))


@ha_group.command("install")
@config_option
@click.option(
    "--keepalived",
    "keepalived_path",
    metavar="PATH",
    default="/etc/keepalived/keepalived.conf",
    show_default=True,
)
@click.option(
    "--conntrackd",
    "conntrackd_path",
    metavar="PATH",
    default=None,
    help="Where conntrackd.conf goes  [default: ha.conntrackd_config]",
)
def ha_install(config_file: str | None, keepalived_path: str, conntrackd_path: str | None) -> None:
    """Write keepalived.conf and (with ha.conntrack_sync) conntrackd.conf from [ha].

    Both are rendered and checked by their tool first; nothing is written unless both pass.
    """
    cfg = load_config(config_file)
    if cfg.ha is None:
        fail("config error: ha: no [ha] section in the config: nothing to install", EXIT_USAGE)
    files = [(_ha_file(cfg, "keepalived"), Path(keepalived_path))]
    if cfg.ha.conntrack_sync:
        files.append(
            (_ha_file(cfg, "conntrackd"), Path(conntrackd_path or cfg.ha.conntrackd_config))
        )
    for rendered, _ in files:
        _ha_validate(rendered)
    for rendered, path in files:
        _ha_write(rendered, path, validated=True)


@dataclass(frozen=True)
class _HaFile:
    tool: str  # "keepalived" or "conntrackd"
    text: str


def _ha_file(cfg: Config, tool: str) -> _HaFile:
    from gatepeer import atomic_json
    from gatepeer.ha import conntrackd, install, keepalived

    state = atomic_json.read(cfg.agent.state_file)
    assert cfg.ha is not None
    try:
        if tool == "conntrackd":
            text = conntrackd.render(cfg.ha, install.sync_facts_for(cfg, state))
        else:
            facts = install.facts_for(cfg, state)
            text = keepalived.render(cfg.ha, facts)
    except (keepalived.RenderError, conntrackd.SyncConfigError) as exc:
        fail(f"config error: {exc}", EXIT_USAGE)
    return _HaFile(tool, text)


def _ha_validate(rendered: _HaFile) -> None:
    import subprocess

    from gatepeer.ha import conntrackd, install

    test = install.keepalived_test if rendered.tool == "keepalived" else conntrackd.conntrackd_test
    try:
        complaint = test(rendered.text)
    except FileNotFoundError:
        fail(
            f"{rendered.tool} is not installed: cannot validate the file "
            f"(apt-get install {rendered.tool})"
        )
    except subprocess.TimeoutExpired:
        fail(f"{rendered.tool} did not answer in time: the file was not written")
    if complaint is not None:
        judge = "keepalived -t" if rendered.tool == "keepalived" else "conntrackd"
        fail(f"{judge} refused the rendered config: {complaint}")


def _ha_write(rendered: _HaFile, path: Path, *, validated: bool = False) -> None:
    from gatepeer.ha import install

    if not validated:
        _ha_validate(rendered)
    try:
        install.write(path, rendered.text)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
    how = "keepalived -t" if rendered.tool == "keepalived" else "conntrackd's parse"
    click.echo(f"wrote {path} ({how} passed)")


@main.group("aws")
def aws_group() -> None:
    """AWS: what the instance role needs."""


@aws_group.command("policy")
@click.option(
    "--config",
    "config_files",
    metavar="PATH",
    multiple=True,
    help="Config file; twice for the two peers of a pair sharing one role "
    "(default: $GATEPEER_CONFIG, else /etc/gatepeer/gatepeer.toml).",
)
@click.option("--partition", default="aws", show_default=True)
@click.option("--region", help="Region in the ARNs (default: aws.region, else *).")
@click.option("--account", default="*", show_default=True, help="Account id in the ARNs.")
@click.option("--table", is_flag=True, help="Print the IAM table of every setting instead.")
def aws_policy(
    config_files: tuple[str, ...], partition: str, region: str | None, account: str, table: bool
) -> None:
    """Print the minimal IAM policy (JSON) for the config's features.

    The same source gives the CloudFormation stack's role and the README's IAM table.
    """
    from gatepeer.aws.permissions import Account, iam_table, policy

    if table:
        click.echo(iam_table(), nl=False)
        return
    configs = []
    for path in config_files or (None,):
        try:
            # The instance's config, read anywhere: no key file or interface checks.
            configs.append(load(config_path(path), check_system=False))
        except ConfigError as exc:
            fail(f"config error: {exc}", EXIT_USAGE)
    if region is None:
        regions = {c.aws.region for c in configs}
        region = regions.pop() if len(regions) == 1 and None not in regions else "*"
    where = Account(partition=partition, region=str(region), account=account)
    click.echo(json.dumps(policy(configs, where), indent=2))


def _register_lab() -> None:
    from gatepeer.lab.cli import lab

    main.add_command(lab)


_register_lab()
