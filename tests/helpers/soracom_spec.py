"""SORACOM's API spec as a contract to validate against: the full spec where a `shared/` folder
sits beside the checkout (or above a worktree), else the part kept in the repository
(tests/spec/soracom-api/, cut by scripts/soracom_spec_excerpt.py). The `contract` fixture
(conftest.py) loads it once per module."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

SPEC_URI = "urn:soracom-api"


REPO = Path(__file__).resolve().parents[2]


# The full spec sits in a `shared/` folder beside the checkout (or above a worktree); the part
# the tests need is kept in the repository for a clone without it (scripts/soracom_spec_excerpt.py).
FULL_SPEC = Path("shared", "soracom-api", "soracom-api.en.yaml")


KEPT_SPEC = REPO / "tests" / "spec" / "soracom-api" / "soracom-api.excerpt.yaml"


def spec_path(start: Path = REPO) -> Path:
    """GATEPEER_SORACOM_SPEC when set, else the full spec above `start`, else the kept part."""
    env = os.environ.get("GATEPEER_SORACOM_SPEC")
    if env:
        return Path(env)
    for parent in [start, *start.parents]:
        if (parent / FULL_SPEC).is_file():
            return parent / FULL_SPEC
    return KEPT_SPEC


def load_yaml(path: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster
    with path.open(encoding="utf-8") as f:
        return dict(yaml.load(f, Loader=loader))  # noqa: S506 - a safe loader


def strict(schema: Any, in_composition: bool = False) -> None:
    """Forbid undeclared properties in place; walks schema keywords, not arbitrary keys."""
    if not isinstance(schema, dict) or "$ref" in schema:
        return
    props = schema.get("properties")
    if isinstance(props, dict):
        # Inside allOf/anyOf/oneOf a branch sees only its own properties: leave those open.
        if not in_composition and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for sub in props.values():
            strict(sub)
    for key in ("items", "not"):
        strict(schema.get(key))
    if isinstance(schema.get("additionalProperties"), dict):
        strict(schema["additionalProperties"])
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            strict(sub, in_composition=True)


def pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


@dataclass
class Contract:
    spec: dict[str, Any]
    operations: dict[str, tuple[str, str]]  # operationId -> (method, path template)
    registry: Registry[Any]

    def responses(self, op: str) -> dict[str, Any]:
        method, path = self.operations[op]
        return dict(self.spec["paths"][path][method.lower()]["responses"])

    def declared(self, op: str, status: int) -> tuple[str, Any] | None:
        """(ref to the declared JSON schema, the schema itself), or None when none."""
        method, path = self.operations[op]
        response = self.responses(op).get(str(status)) or {}
        schema = response.get("content", {}).get("application/json", {}).get("schema")
        if schema is None:
            return None
        ref = pointer("paths", path, method.lower(), "responses", str(status))
        return f"{SPEC_URI}#{ref}/content/application~1json/schema", schema

    def validate(self, ref: str, instance: Any) -> None:
        validator = OAS30Validator({"$ref": ref}, registry=self.registry)
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
        assert not errors, f"{ref}: {errors} in {instance!r}"

    def validate_component(self, name: str, instance: Any) -> None:
        self.validate(f"{SPEC_URI}#/components/schemas/{name}", instance)


def load_contract() -> Contract:
    """The spec in use, its operations, and a registry of its schemas made strict."""
    spec = load_yaml(spec_path())
    operations: dict[str, tuple[str, str]] = {}
    for template, item in spec["paths"].items():
        for method, op in item.items():
            if isinstance(op, dict) and "operationId" in op:
                operations[op["operationId"]] = (method.upper(), template)
    schemas = copy.deepcopy(spec["components"]["schemas"])
    for schema in schemas.values():
        strict(schema)
    # Documented quirk the spec misses: registerGatePeer answers the new peer with
    # "netmask": null, and GatePeer.netmask is a plain (non-nullable) string. Only this answer
    # is validated against a copy with that one field nullable.
    as_registered = copy.deepcopy(schemas["GatePeer"])
    as_registered["properties"]["netmask"]["nullable"] = True
    schemas["GatePeerAsRegistered"] = as_registered
    doc = {"paths": spec["paths"], "components": {"schemas": schemas}}
    registry: Registry[Any] = Registry().with_resource(
        SPEC_URI, Resource.from_contents(doc, default_specification=DRAFT4)
    )
    return Contract(spec, operations, registry)
