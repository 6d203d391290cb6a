"""A fake IMDSv2 for the boot rehearsal (tests/delivery/test_boot_lab.py), run inside a lab
namespace:

    python tests/helpers/rehearsal_imds.py --listen 198.18.0.3:80 --data FILE

It answers as EC2's does for what gatepeer and botocore read: PUT /latest/api/token with a
TTL header gives a token; GET /latest/meta-data/PATH needs that token (IMDSv2 only, as the
stack's launch template sets HttpTokens: required) and answers the value FILE maps PATH to, or
404. FILE is JSON ({"instance-id": "i-...", ...}) read at every request, so the test swaps
the instance (a replacement with a new ENI and address) by rewriting it. Never at
169.254.169.254: the lab gives it a 198.18.x address on the VPC bridge and the booted image
finds it through AWS_EC2_METADATA_SERVICE_ENDPOINT.
"""

from __future__ import annotations

import argparse
import json
import secrets
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TOKEN_PATH = "/latest/api/token"
META_PREFIX = "/latest/meta-data/"


def serve(host: str, port: int, data: Path) -> None:
    tokens: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            print(
                f"imds: {self.command} {self.path} {args[1] if len(args) > 1 else ''}", flush=True
            )

        def _answer(self, status: int, body: str = "") -> None:
            raw = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_PUT(self) -> None:
            if self.path != TOKEN_PATH:
                return self._answer(404)
            if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return self._answer(400)
            token = secrets.token_urlsafe(24)
            tokens.add(token)
            return self._answer(200, token)

        def do_GET(self) -> None:
            if self.headers.get("X-aws-ec2-metadata-token") not in tokens:
                return self._answer(401)
            if not self.path.startswith(META_PREFIX):
                return self._answer(404)
            values = json.loads(data.read_text())
            value = values.get(self.path[len(META_PREFIX) :])
            return self._answer(404) if value is None else self._answer(200, str(value))

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    print(f"imds: serving on {host}:{port} from {data}", flush=True)
    server.serve_forever()


def instance_data(
    *,
    instance_id: str,
    mac: str,
    eni_id: str,
    address: str,
    subnet_id: str,
    subnet_cidr: str,
    vpc_id: str,
    vpc_cidr: str,
    region: str,
) -> dict[str, str]:
    """The metadata paths of one instance with one ENI, as EC2 lays them out."""
    eni = f"network/interfaces/macs/{mac}"
    return {
        "instance-id": instance_id,
        "placement/region": region,
        "placement/availability-zone": f"{region}a",
        "mac": mac,
        "local-ipv4": address,
        f"{eni}/interface-id": eni_id,
        f"{eni}/local-ipv4s": address,
        f"{eni}/subnet-id": subnet_id,
        f"{eni}/subnet-ipv4-cidr-block": subnet_cidr,
        f"{eni}/vpc-id": vpc_id,
        f"{eni}/vpc-ipv4-cidr-blocks": vpc_cidr,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="ADDRESS:PORT")
    parser.add_argument("--data", required=True, type=Path)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    serve(host, int(port), args.data)


if __name__ == "__main__":
    main()
