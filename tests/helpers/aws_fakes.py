"""Test doubles for the AWS tests: a fake IMDS on 127.0.0.1, moto's server, AWS env guards.

Nothing here reaches AWS: every client gets moto's 127.0.0.1 URL as its endpoint, the
credentials are moto's dummies, and botocore's own IMDS lookups are switched off.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

MAC = "0a:1b:2c:3d:4e:5f"
ENI = f"network/interfaces/macs/{MAC}"
TOKEN = "fake-imds-token-7f3a"

INSTANCE = {
    "instance-id": "i-0123456789abcdef0",
    "placement/availability-zone": "ap-northeast-1a",
    "placement/region": "ap-northeast-1",
    "mac": MAC,
    f"{ENI}/local-ipv4s": "198.18.0.10\n198.18.0.11",
    f"{ENI}/subnet-ipv4-cidr-block": "198.18.0.0/24",
    f"{ENI}/interface-id": "eni-0aaaabbbbccccdddd",
    f"{ENI}/subnet-id": "subnet-0123abcd",
    f"{ENI}/vpc-id": "vpc-0123abcd",
    f"{ENI}/vpc-ipv4-cidr-blocks": "198.18.0.0/16\n203.0.113.0/24",
}


@dataclass
class ImdsBehaviour:
    token: str = "issue"  # issue | refuse (403) | slow (no answer in time)
    require_token: bool = True  # IMDSv2 only: a GET without a valid token gets 401
    slow_s: float = 2.0
    data: dict[str, str] = field(default_factory=lambda: dict(INSTANCE))
    valid_tokens: set[str] = field(default_factory=lambda: {TOKEN})
    fail_next: list[int] = field(default_factory=list)  # statuses for the next GETs
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


class FakeImds:
    """The IMDS paths gatepeer reads, on 127.0.0.1 with an ephemeral port."""

    def __init__(self) -> None:
        self.behaviour = ImdsBehaviour()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _headers(self) -> dict[str, str]:
                return {k.lower(): v for k, v in self.headers.items()}

            def _answer(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                b = fake.behaviour
                b.requests.append(("PUT", self.path, self._headers()))
                if self.path != "/latest/api/token":
                    return self._answer(404)
                if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._answer(400)
                if b.token == "refuse":
                    return self._answer(403)
                if b.token == "slow":
                    time.sleep(b.slow_s)
                return self._answer(200, TOKEN)

            def do_GET(self) -> None:
                b = fake.behaviour
                b.requests.append(("GET", self.path, self._headers()))
                if b.fail_next:
                    return self._answer(b.fail_next.pop(0))
                token = self.headers.get("X-aws-ec2-metadata-token")
                if token is not None and token not in b.valid_tokens:
                    return self._answer(401)
                if token is None and b.require_token:
                    return self._answer(401)
                prefix = "/latest/meta-data/"
                key = self.path[len(prefix) :] if self.path.startswith(prefix) else None
                if key is None or key not in b.data:
                    return self._answer(404)
                return self._answer(200, b.data[key])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def gets(self) -> list[tuple[str, dict[str, str]]]:
        return [(p, h) for m, p, h in self.behaviour.requests if m == "GET"]


@contextlib.contextmanager
def running_imds() -> Iterator[FakeImds]:
    server = FakeImds()
    try:
        yield server
    finally:
        server.stop()


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (the port is bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def offline_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials and no shared config: boto3's credential chain stops at the
    environment and never reaches its IMDS step; every client names its region."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_EC2_METADATA_DISABLED",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


class Moto:
    """moto's server on 127.0.0.1 (ThreadedMotoServer), shared by a module's tests."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.stop()

    def _post(self, path: str, body: bytes) -> dict[str, Any]:
        # text/plain: flask would take urllib's default form type and hide the body.
        request = urllib.request.Request(
            self.url + path, data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310 - 127.0.0.1
            return dict(json.loads(answer.read() or b"{}"))

    def reset(self) -> None:
        self._post("/moto-api/reset", b"")

    def enforce_iam(self, enabled: bool) -> None:
        """From now on, check each request against IAM (moto counts requests from zero)."""
        self._post("/moto-api/reset-auth", b"0" if enabled else b"inf")
