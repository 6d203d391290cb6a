"""moto's server for the recipe labs, with two of AWS's habits moto 5.2 lacks, so the addresses
the lab gets from it are addresses the lab may use (TEST-NET and 198.18.0.0/15 only):

- an interface endpoint's network interfaces take their address from their own subnet, the
  next free one, as in AWS (moto draws them from 10.0.0.0/8 whatever the subnet);
- the AWS-managed S3 prefix list (`com.amazonaws.<region>.s3`) holds the ranges given on the
  command line (`--s3-cidr`) in place of S3's public ranges, which the lab must never route.

Run as a script, in a lab namespace, started and stopped by pid (tests/helpers/recipe_lab.py):
    python moto_lab_server.py --host 203.0.113.12 --port 5000 --s3-cidr 198.18.6.0/24
"""

from __future__ import annotations

import argparse
from typing import Any


def patch_moto(s3_cidrs: list[str]) -> None:
    """Make moto behave as the module docstring says, before its server starts."""
    import ipaddress

    import moto.ec2.models.elastic_network_interfaces as enis
    import moto.ec2.models.managed_prefixes as prefixes
    import moto.ec2.models.vpcs as vpcs

    # An empty address makes moto's ENI pick one in its subnet (elastic_network_interfaces.py);
    # it picks the subnet's next free one from .10 on, as AWS would (moto's own pick is random,
    # and two endpoints could get the same address).
    vpcs.random_private_ip = lambda *args, **kwargs: ""  # type: ignore[assignment]
    drawn = enis.random_private_ip
    taken: dict[str, int] = {}

    def next_free(cidr: str | None = None, ipv6: bool = False) -> str:
        if ipv6 or not cidr:
            return drawn(cidr, ipv6)
        taken[cidr] = taken.get(cidr, 9) + 1
        return str(ipaddress.IPv4Network(cidr).network_address + taken[cidr])

    enis.random_private_ip = next_free  # type: ignore[assignment]

    backend = prefixes.ManagedPrefixListBackend
    original = backend._create_aws_managed_prefix_list

    def create(self: Any, name: str, address_family: str, entries: list[dict[str, str]]) -> None:
        if name.endswith(".s3") and s3_cidrs:
            entries = [{"Cidr": c, "Description": "lab stand-in for S3"} for c in s3_cidrs]
        original(self, name, address_family, entries)

    backend._create_aws_managed_prefix_list = create  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True)
    parser.add_argument("--s3-cidr", action="append", default=[])
    args = parser.parse_args()
    patch_moto(args.s3_cidr)
    from moto.server import main as moto_main

    moto_main(["-H", args.host, "-p", args.port])


if __name__ == "__main__":
    main()
