"""Request bodies: parse them and check them against the spec's request schemas.

The emulator runs where only the standard library is installed, so it cannot read the YAML
spec: each implemented operation's ``requestBody`` is written out by hand in ``REQUEST_BODIES``
(field -> JSON type and whether it is required). tests/unit/test_emulator_contract.py proves the
table equals the spec's schemas. A body the table refuses (not JSON, not an object, an unknown
or misspelled field, a field of the wrong type, a required one missing) is a 400 in SORACOM's
error shape, so a client's typo fails here as it would against the real API.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gatepeer.lab.emulator.model import BadRequest


@dataclass(frozen=True)
class Field:
    type: str  # the JSON Schema type: "string", "integer" or "boolean"
    required: bool = False


@dataclass(frozen=True)
class RequestBody:
    """One operation's requestBody: whether a body must be sent, and its object's fields."""

    required: bool
    fields: Mapping[str, Field] = field(default_factory=dict)


# Every operation the emulator implements; None: the spec declares no request body.
REQUEST_BODIES: dict[str, RequestBody | None] = {
    "auth": RequestBody(
        required=True,
        fields={
            "authKey": Field("string"),
            "authKeyId": Field("string"),
            "email": Field("string"),
            "mfaOTPCode": Field("string"),
            "operatorId": Field("string"),
            "password": Field("string"),
            "tokenTimeoutSeconds": Field("integer"),
            "userName": Field("string"),
        },
    ),
    "generateAuthToken": RequestBody(
        required=True, fields={"tokenTimeoutSeconds": Field("integer")}
    ),
    "getVirtualPrivateGateway": None,
    "listGatePeers": None,
    "registerGatePeer": RequestBody(
        required=True,
        fields={
            "innerIpAddress": Field("string"),
            "outerIpAddress": Field("string", required=True),
        },
    ),
    "unregisterGatePeer": None,
    "openGate": RequestBody(
        required=False,
        fields={"privacySeparatorEnabled": Field("boolean"), "vxlanId": Field("integer")},
    ),
    "closeGate": None,
    "setVirtualPrivateGatewayVxLanId": RequestBody(
        required=True, fields={"vxlanId": Field("integer", required=True)}
    ),
    "setRedirectionConfiguration": RequestBody(
        required=True,
        fields={
            "description": Field("string"),
            "enabled": Field("boolean"),
            "gateway": Field("string"),
        },
    ),
    "unsetRedirectionConfiguration": None,
    "listSims": None,
    "listVirtualPrivateGatewayIpAddressMapEntries": None,
}


def _is_json_type(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        # JSON true is not a number, though Python's bool is an int.
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    raise ValueError(f"no such JSON type in the table: {kind}")


def parse_request(operation: str, body: bytes) -> dict[str, Any]:
    """The request body of `operation` as a dict ({} when none was sent); BadRequest when the
    spec's schema refuses it."""
    schema = REQUEST_BODIES[operation]
    if schema is None:
        # No body declared: nothing to read, but a body that is there must not be garbage.
        req = json_object(body, required=False)
        if req:
            raise BadRequest(f"{operation} takes no request body; got {', '.join(sorted(req))}")
        return req
    req = json_object(body, required=schema.required)
    unknown = sorted(set(req) - set(schema.fields))
    if unknown:
        known = ", ".join(sorted(schema.fields))
        raise BadRequest(f"Unknown field {unknown[0]!r} in the request body (known: {known})")
    for name, spec in schema.fields.items():
        if name not in req:
            if spec.required:
                raise BadRequest(f"{name} is required")
            continue
        if not _is_json_type(req[name], spec.type):
            raise BadRequest(f"{name} must be of type {spec.type}")
    return req


def json_object(body: bytes, *, required: bool) -> dict[str, Any]:
    if not body.strip():
        if required:
            raise BadRequest("A JSON request body is required")
        return {}
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("The request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("The request body must be a JSON object")
    return value


def bad_request_on_value_error(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
