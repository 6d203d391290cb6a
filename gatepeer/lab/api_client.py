"""A stdlib SORACOM API client, just enough for the lab's own use."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from gatepeer.lab.network.netns import LabError
from gatepeer.lab.record import Credentials, LabRecord, Paths


class LabApi:
    """Just enough of the SORACOM API (stdlib only) for the baseline and `lab status`."""

    def __init__(self, base_url: str, creds: Credentials, auth_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.creds = creds
        self.auth_key = auth_key
        self.headers: dict[str, str] = {}

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("Accept", "application/json")
        for k, v in self.headers.items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise LabError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise LabError(f"{method} {path}: {exc}") from None
        return json.loads(raw) if raw.strip() else None

    def auth(self) -> None:
        body = {"authKeyId": self.creds.auth_key_id, "authKey": self.auth_key}
        answer = self._request("POST", "/v1/auth", body)
        self.headers = {"X-Soracom-API-Key": answer["apiKey"], "X-Soracom-Token": answer["token"]}

    def _vpg(self, suffix: str = "") -> str:
        return f"/v1/virtual_private_gateways/{self.creds.vpg_id}{suffix}"

    def get_vpg(self) -> dict[str, Any]:
        return dict(self._request("GET", self._vpg()))

    def list_gate_peers(self) -> list[dict[str, Any]]:
        return list(self._request("GET", self._vpg("/gate/peers")))

    def register_gate_peer(self, outer_ip: str) -> dict[str, Any]:
        return dict(self._request("POST", self._vpg("/gate/peers"), {"outerIpAddress": outer_ip}))

    def unregister_gate_peer(self, outer_ip: str) -> None:
        self._request("DELETE", self._vpg(f"/gate/peers/{outer_ip}"))

    def set_redirection(self, gateway: str, description: str = "") -> dict[str, Any]:
        """Junction redirection on: devices' traffic leaving the subnet goes to `gateway`."""
        body: dict[str, Any] = {"enabled": True, "gateway": gateway}
        if description:
            body["description"] = description
        return dict(self._request("POST", self._vpg("/junction/set_redirection"), body))

    def unset_redirection(self) -> dict[str, Any]:
        return dict(self._request("POST", self._vpg("/junction/unset_redirection")))


def lab_api(paths: Paths, record: LabRecord, host_url: str) -> LabApi:
    api = LabApi(host_url, record.credentials, paths.auth_key.read_text().strip())
    api.auth()
    return api
