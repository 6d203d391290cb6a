"""Request bodies: parse them as JSON objects and check their fields."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gatepeer.lab.emulator_model import BadRequest


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


def check_fields(
    req: Mapping[str, Any], types: Mapping[str, type], required: Iterable[str]
) -> None:
    """Required fields present and declared fields of the spec's type (unknown ones ignored)."""
    for name in required:
        if name not in req:
            raise BadRequest(f"{name} is required")
    for name, kind in types.items():
        if name not in req:
            continue
        value = req[name]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise BadRequest(f"{name} must be of type {_JSON_TYPE_NAMES[kind]}")


_JSON_TYPE_NAMES: dict[type, str] = {str: "string", int: "integer", bool: "boolean"}


def bad_request_on_value_error(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
