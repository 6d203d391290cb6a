"""The `gatepeer` command: thin click wrappers that parse, call, print and exit.

Heavy modules (pyroute2, prometheus_client, scapy) are imported inside the commands that need
them so that `gatepeer --help` and `gatepeer status` stay fast.
"""

from __future__ import annotations

import click

from gatepeer import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gatepeer")
def main() -> None:
    """Run this host as a SORACOM Gate customer gate peer."""


def _register_lab() -> None:
    from gatepeer.lab.commands import lab

    main.add_command(lab)


_register_lab()
