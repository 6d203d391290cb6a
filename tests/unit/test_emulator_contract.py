"""Contract tests: every answer of the SORACOM API emulator against the official spec.

Each case sends one real HTTP request to the emulator and validates the answer (status, body,
content type) against the response schema the spec declares for that operation and status, with
openapi-schema-validator's OAS30Validator; ``$ref``s resolve through a ``referencing`` registry
that holds the spec. Only the schemas used are touched: the spec as a whole is not validated (it
has one invalid enum default elsewhere).

Stricter than the spec in one way: object schemas get ``additionalProperties: false`` so that a
misspelled field (``vxlanId`` for ``gateVxlanId``) fails instead of passing as an extra property.

Where the spec says nothing (no body schema for most error statuses, none for openGate's answer)
the rules are written out below, each with its reason.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import http_client
from helpers.http_client import Reply
from helpers.soracom_spec import (
    FULL_SPEC,
    KEPT_SPEC,
    REPO,
    SPEC_URI,
    Contract,
    load_yaml,
    spec_path,
)

from gatepeer.lab.emulator.model import BadRequest, EmulatorSettings
from gatepeer.lab.emulator.operations import OPERATION_STATUSES
from gatepeer.lab.emulator.requests import REQUEST_BODIES, parse_request
from gatepeer.lab.emulator.service import Emulator

VPG_ID = "0f3c2b1a-9e8d-4c7b-a6f5-e4d3c2b1a098"
OPERATOR_ID = "OP0098765432"
AUTH_KEY_ID = "keyId-contract0000000000000000000000"
AUTH_KEY = "secret-contract-test-key"
VPG = f"/v1/virtual_private_gateways/{VPG_ID}"
OTHER_VPG = "/v1/virtual_private_gateways/00000000-0000-4000-8000-000000000000"
PEER = "198.18.2.9"  # a customer peer every case starts with
# SIMs every case starts with: one in session on this VPG, one with a static address and no
# session, one on another VPG.
SIMS = [
    {
        "sim_id": "8942310000000000011",
        "imsi": "440103000000011",
        "name": "pump-11",
        "group_id": "grp-a",
        "vpg_id": VPG_ID,
        "address": "198.19.128.11",
    },
    {
        "sim_id": "8942310000000000012",
        "imsi": "440103000000012",
        "online": False,
        "static_address": "198.19.128.12",
    },
    {
        "sim_id": "8942310000000000013",
        "imsi": "440103000000013",
        "name": "elsewhere",
        "vpg_id": "00000000-0000-4000-8000-000000000000",
        "address": "198.19.128.13",
    },
]

# Statuses the emulator sends that the spec does not list for the operation, and why.
UNDOCUMENTED_STATUSES: dict[str, set[int]] = {
    # The real API refuses a malformed body with 400 even where the spec lists no 400.
    "auth": {400},
    "setVirtualPrivateGatewayVxLanId": {400},
    "setRedirectionConfiguration": {400},
    # generateAuthToken's spec lists only 200 and 400; an unknown key/token is 401 everywhere.
    "generateAuthToken": {401},
    # A bad limit or page key: the spec lists no 400 for listSims.
    "listSims": {400},
}
# Every authenticated call can answer 401 (security schemes api_key + api_token), and any call
# 429 (rate limit) or an injected failure: the spec lists none of these per operation.
ANY_OPERATION_STATUSES = {401, 429, 503}

# The spec declares no body for these successes; the emulator answers the VPG, as the real API.
UNDECLARED_SUCCESS_SCHEMA = {
    "openGate": "VirtualPrivateGateway",
    "closeGate": "VirtualPrivateGateway",
    "setRedirectionConfiguration": "VirtualPrivateGateway",
    "unsetRedirectionConfiguration": "VirtualPrivateGateway",
}


# ----- the emulator and a bare HTTP client -----------------------------------------------


def send(base_url: str, method: str, path: str, body: Any = None, headers: Any = None) -> Reply:
    """One request, declared as JSON as SORACOM's clients send it."""
    return http_client.send(
        base_url, method, path, body, {"Content-Type": "application/json", **(headers or {})}
    )


@dataclass
class Ctx:
    emu: Emulator
    url: str
    auth: dict[str, str] = field(default_factory=dict)


@pytest.fixture(params=[False, True], ids=["plain-errors", "wrapped-errors"])
def ctx(request: pytest.FixtureRequest) -> Iterator[Ctx]:
    settings = EmulatorSettings(
        operator_id=OPERATOR_ID,
        auth_key_id=AUTH_KEY_ID,
        auth_key=AUTH_KEY,
        vpg_id=VPG_ID,
        wrapped_errors=request.param,
    )
    emu = Emulator(settings)
    url = emu.start()
    try:
        login = send(url, "POST", "/v1/auth", {"authKeyId": AUTH_KEY_ID, "authKey": AUTH_KEY})
        assert login.status == 200, login.raw
        c = Ctx(emu, url, {"X-Soracom-API-Key": login.json["apiKey"]})
        c.auth["X-Soracom-Token"] = login.json["token"]
        # Every case starts with one customer peer and a redirection, so that listing shows
        # both kinds of peer and unsetting has something to remove.
        assert (
            send(url, "POST", f"{VPG}/gate/peers", {"outerIpAddress": PEER}, c.auth).status == 200
        )
        redirect = {"enabled": True, "gateway": "198.19.0.3"}
        assert send(url, "POST", f"{VPG}/junction/set_redirection", redirect, c.auth).status == 200
        emu.set_sims(SIMS)
        emu.reset_counts()
        yield c
    finally:
        emu.stop()


# ----- the cases -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str
    status: int
    method: str
    path: str
    body: Any = None
    creds: str = "good"  # good | bad (unknown token) | none
    setup: Callable[[Emulator], None] | None = None
    fault: dict[str, int] | None = None
    why: str = ""

    @property
    def id(self) -> str:
        return f"{self.op}-{self.status}{'-' + self.why if self.why else ''}"


# The request that succeeds for each operation, from the starting state of ctx.
SUCCESS: dict[str, tuple[int, str, str, Any]] = {
    "auth": (200, "POST", "/v1/auth", {"authKeyId": AUTH_KEY_ID, "authKey": AUTH_KEY}),
    "generateAuthToken": (
        200,
        "POST",
        f"/v1/operators/{OPERATOR_ID}/token",
        {"tokenTimeoutSeconds": 3600},
    ),
    "getVirtualPrivateGateway": (200, "GET", VPG, None),
    "listGatePeers": (200, "GET", f"{VPG}/gate/peers", None),
    "registerGatePeer": (200, "POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.1"}),
    "unregisterGatePeer": (204, "DELETE", f"{VPG}/gate/peers/{PEER}", None),
    "openGate": (200, "POST", f"{VPG}/gate/open", {"vxlanId": 11}),
    "closeGate": (200, "POST", f"{VPG}/gate/close", None),
    "setVirtualPrivateGatewayVxLanId": (204, "POST", f"{VPG}/gate/set_vxlan_id", {"vxlanId": 12}),
    "setRedirectionConfiguration": (
        200,
        "POST",
        f"{VPG}/junction/set_redirection",
        {"enabled": True, "gateway": "198.19.0.3", "description": "lab"},
    ),
    "unsetRedirectionConfiguration": (200, "POST", f"{VPG}/junction/unset_redirection", None),
    "listSims": (200, "GET", "/v1/sims", None),
    "listVirtualPrivateGatewayIpAddressMapEntries": (200, "GET", f"{VPG}/ip_address_map", None),
}


def _cases() -> list[Case]:
    cases: list[Case] = []
    for op, (status, method, path, body) in SUCCESS.items():
        cases.append(Case(op, status, method, path, body))
        cases.append(Case(op, 429, method, path, body, fault={"rate_limit_next": 1}, why="fault"))
        cases.append(Case(op, 503, method, path, body, fault={"fail_next": 1}, why="fault"))
        if op != "auth":
            cases.append(Case(op, 401, method, path, body, creds="none", why="no-token"))
            cases.append(Case(op, 401, method, path, body, creds="bad", why="bad-token"))
        if path.startswith(VPG):
            other = OTHER_VPG + path[len(VPG) :]
            cases.append(Case(op, 404, method, other, body, why="unknown-vpg"))
    cases += [
        Case("auth", 400, "POST", "/v1/auth", b"{not json", why="bad-json"),
        Case(
            "auth",
            400,
            "POST",
            "/v1/auth",
            {"authKeyId": AUTH_KEY_ID, "authKey": AUTH_KEY, "tokenTimeoutSeconds": 172801},
            why="timeout-too-long",
        ),
        Case(
            "auth",
            401,
            "POST",
            "/v1/auth",
            {"authKeyId": AUTH_KEY_ID, "authKey": "wrong"},
            why="wrong-key",
        ),
        Case(
            "generateAuthToken",
            400,
            "POST",
            f"/v1/operators/{OPERATOR_ID}/token",
            {"tokenTimeoutSeconds": 3600},
            setup=lambda emu: emu.expire_tokens(),
            why="expired-token",
        ),
        Case(
            "registerGatePeer",
            400,
            "POST",
            f"{VPG}/gate/peers",
            {"outerIpAddress": PEER},
            why="duplicate",
        ),
        Case(
            "registerGatePeer",
            400,
            "POST",
            f"{VPG}/gate/peers",
            {"innerIpAddress": "198.19.0.9"},
            why="no-outer",
        ),
        Case("unregisterGatePeer", 400, "DELETE", f"{VPG}/gate/peers/198.18.1.11", why="endpoint"),
        Case("unregisterGatePeer", 404, "DELETE", f"{VPG}/gate/peers/198.18.2.77", why="unknown"),
        Case("openGate", 400, "POST", f"{VPG}/gate/open", {"vxlanId": "11"}, why="vni-type"),
        Case(
            "setVirtualPrivateGatewayVxLanId",
            400,
            "POST",
            f"{VPG}/gate/set_vxlan_id",
            {"vxlanId": 16777216},
            why="vni-range",
        ),
        Case(
            "setRedirectionConfiguration",
            400,
            "POST",
            f"{VPG}/junction/set_redirection",
            {"gateway": "not-an-address"},
            why="gateway",
        ),
        Case("listSims", 400, "GET", "/v1/sims?limit=0", why="limit"),
        Case("listSims", 400, "GET", "/v1/sims?last_evaluated_key=nope", why="page-key"),
        Case(
            "listVirtualPrivateGatewayIpAddressMapEntries",
            400,
            "GET",
            f"{VPG}/ip_address_map?limit=x",
            why="limit",
        ),
    ]
    return cases


CASES = _cases()


def check_response(contract: Contract, op: str, reply: Reply, wrapped: bool) -> None:
    """The answer matches what the spec declares for (op, status), or the rules above."""
    status = reply.status
    documented = {int(s) for s in contract.responses(op) if s.isdigit()}
    allowed = documented | UNDOCUMENTED_STATUSES.get(op, set()) | ANY_OPERATION_STATUSES
    assert status in allowed, f"{op} answered {status}; the spec lists {sorted(documented)}"
    declared = contract.declared(op, status)

    if status == 204:
        assert reply.raw == b""
        assert declared is None
        return
    assert reply.headers.get_content_type() == "application/json"
    body = reply.json

    if status >= 400:
        # No schema for most error statuses: errors are APICallErrorMessage, bare or wrapped in
        # APICallError (the README: accept both). Where the spec does declare one, it is the
        # wrapped APICallError; a bare body is then checked as its inner errorMessage.
        if declared is not None:
            assert declared[1] == {"$ref": "#/components/schemas/APICallError"}
        if wrapped:
            assert set(body) == {"errorMessage", "httpStatus"}
            assert body["httpStatus"] == status
            contract.validate_component("APICallError", body)
            if declared is not None:
                contract.validate(declared[0], body)
        else:
            contract.validate_component("APICallErrorMessage", body)
        return

    if op == "registerGatePeer":
        assert declared is not None and declared[1] == {"$ref": "#/components/schemas/GatePeer"}
        assert body["netmask"] is None  # the quirk, as documented
        contract.validate_component("GatePeerAsRegistered", body)
    elif declared is not None:
        contract.validate(declared[0], body)
    else:
        assert op in UNDECLARED_SUCCESS_SCHEMA, f"{op} {status}: spec declares no body"
        contract.validate_component(UNDECLARED_SUCCESS_SCHEMA[op], body)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_answer_matches_the_spec(contract: Contract, ctx: Ctx, case: Case) -> None:
    headers = {
        "good": ctx.auth,
        "bad": {"X-Soracom-API-Key": ctx.auth["X-Soracom-API-Key"], "X-Soracom-Token": "x"},
        "none": {},
    }[case.creds]
    if case.setup is not None:
        case.setup(ctx.emu)
    if case.fault is not None:
        ctx.emu.set_faults(**case.fault)
    reply = send(ctx.url, case.method, case.path, case.body, headers)
    assert reply.status == case.status, reply.raw
    assert ctx.emu.counts() == {case.op: 1}  # routed to the operation the case names
    check_response(contract, case.op, reply, wrapped=ctx.emu.settings.wrapped_errors)
    if case.status == 429:
        assert reply.headers["X-Soracom-Ratelimit-Remaining"] == "0"
        assert int(reply.headers["X-Soracom-Ratelimit-Limit"]) > 0
        assert int(reply.headers["X-Soracom-Ratelimit-Seconds-Before-Refresh"]) >= 0


def test_cases_cover_every_status_the_emulator_sends() -> None:
    covered = {(c.op, c.status) for c in CASES}
    expected = {(op, s) for op, statuses in OPERATION_STATUSES.items() for s in statuses}
    expected |= {(op, s) for op in OPERATION_STATUSES for s in (429, 503)}
    expected |= {(op, 401) for op in OPERATION_STATUSES}
    assert expected <= covered, sorted(expected - covered)


def test_operations_and_paths_are_the_specs(contract: Contract) -> None:
    """The operationIds exist, with the method and path template the cases use."""
    for op, (_status, method, path, _body) in SUCCESS.items():
        assert op in contract.operations, op
        spec_method, template = contract.operations[op]
        assert spec_method == method, op
        # Templates hold only [a-z_/{}]: no escaping needed around the parameters.
        pattern = "/v1" + re.sub(r"\{[a-z_]+\}", "[^/]+", template) + r"\Z"
        assert re.match(pattern, path), (op, template, path)
    assert set(SUCCESS) == set(OPERATION_STATUSES)


@pytest.mark.parametrize(
    ("op", "path", "key"),
    [
        ("listSims", "/v1/sims", "simId"),
        ("listVirtualPrivateGatewayIpAddressMapEntries", f"{VPG}/ip_address_map", "ipAddress"),
    ],
)
def test_pages_follow_the_next_key_and_each_matches_the_spec(
    contract: Contract, ctx: Ctx, op: str, path: str, key: str
) -> None:
    """One row a page: each page is valid, carries `x-soracom-next-key` while rows remain
    (the last row's key, which the next request names), and together they hold every row once."""
    seen: list[str] = []
    query = "?limit=1"
    for _ in range(20):
        reply = send(ctx.url, "GET", path + query, None, ctx.auth)
        assert reply.status == 200, reply.raw
        check_response(contract, op, reply, wrapped=False)
        assert len(reply.json) == 1
        seen.append(reply.json[0][key])
        next_key = reply.headers.get("x-soracom-next-key")
        if next_key is None:
            break
        assert next_key == seen[-1]
        query = f"?limit=1&last_evaluated_key={next_key}"
    whole = send(ctx.url, "GET", path + "?limit=100", None, ctx.auth)
    assert whole.headers.get("x-soracom-next-key") is None
    assert seen == [row[key] for row in whole.json]
    assert len(seen) == len(set(seen)) >= 3


def test_the_ip_address_map_holds_sims_peers_and_the_vpg(ctx: Ctx) -> None:
    reply = send(ctx.url, "GET", f"{VPG}/ip_address_map?limit=100", None, ctx.auth)
    kinds = {(e["key"], e["type"]) for e in reply.json}
    assert ("440103000000011", "dynamic") in kinds  # in session on this VPG
    assert ("440103000000012", "static") in kinds
    assert not any(k == "440103000000013" for k, _ in kinds)  # on another VPG
    assert {t for _, t in kinds} == {"dynamic", "static", "customerGatePeer", "gatePeer"}


def test_unknown_path_answers_an_error_body(contract: Contract, ctx: Ctx) -> None:
    reply = send(ctx.url, "GET", "/v1/no_such_thing", None, ctx.auth)
    assert reply.status == 404
    if ctx.emu.settings.wrapped_errors:
        contract.validate_component("APICallError", reply.json)
        assert reply.json["httpStatus"] == 404
    else:
        contract.validate_component("APICallErrorMessage", reply.json)


def test_listed_peers_show_both_kinds_with_a_dotted_netmask(contract: Contract, ctx: Ctx) -> None:
    reply = send(ctx.url, "GET", f"{VPG}/gate/peers", None, ctx.auth)
    declared = contract.declared("listGatePeers", 200)
    assert declared is not None
    contract.validate(declared[0], reply.json)
    assert {(p["ownedByCustomer"], p["netmask"]) for p in reply.json} == {
        (False, "255.255.0.0"),
        (True, "255.255.0.0"),
    }


def test_strict_schemas_catch_a_misspelled_field(contract: Contract) -> None:
    """The check itself can fail: a field the spec does not name is refused."""
    with pytest.raises(AssertionError, match="vxlanId"):
        contract.validate_component("VirtualPrivateGateway", {"vpgId": "x", "vxlanId": 10})
    with pytest.raises(AssertionError, match="nullable"):
        contract.validate_component("GatePeer", {"outerIpAddress": "198.18.0.1", "netmask": None})


# ----- request bodies: the emulator's hand-written table against the spec ------------------


def _request_schema(contract: Contract, op: str) -> tuple[bool, str, dict[str, Any]] | None:
    """(requestBody.required, the schema's ref, the schema), or None when the spec declares
    no request body."""
    method, path = contract.operations[op]
    body = contract.spec["paths"][path][method.lower()].get("requestBody")
    if body is None:
        return None
    name = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    ref = f"{SPEC_URI}#/components/schemas/{name}"
    return bool(body.get("required", False)), ref, contract.spec["components"]["schemas"][name]


def _spec_accepts(contract: Contract, ref: str, instance: Any) -> bool:
    try:
        contract.validate(ref, instance)
    except AssertionError:
        return False
    return True


SAMPLE = {"string": "198.19.0.3", "integer": 10, "boolean": True}
WRONG = {"string": 5, "integer": "10", "boolean": "true"}


def test_request_table_names_every_operation_the_emulator_implements() -> None:
    assert set(REQUEST_BODIES) == set(OPERATION_STATUSES)


@pytest.mark.parametrize("op", sorted(OPERATION_STATUSES))
def test_request_table_equals_the_specs_request_schema(contract: Contract, op: str) -> None:
    declared = _request_schema(contract, op)
    table = REQUEST_BODIES[op]
    if declared is None:
        assert table is None, f"{op}: the spec declares no request body"
        return
    assert table is not None, f"{op}: the spec declares a request body"
    required, _ref, schema = declared
    assert table.required == required, op
    assert schema.get("type") == "object", op
    props = schema.get("properties", {})
    assert {n: (f.type, f.required) for n, f in table.fields.items()} == {
        n: (p["type"], n in schema.get("required", [])) for n, p in props.items()
    }, op


@pytest.mark.parametrize("op", sorted(o for o, b in REQUEST_BODIES.items() if b is not None))
def test_spec_and_emulator_agree_on_good_and_bad_bodies(contract: Contract, op: str) -> None:
    """The same bodies through openapi-schema-validator (strict) and the emulator's check: a
    full body of the right types passes both, a misspelled or mistyped field fails both."""
    table = REQUEST_BODIES[op]
    assert table is not None
    declared = _request_schema(contract, op)
    assert declared is not None
    ref = declared[1]
    good = {name: SAMPLE[f.type] for name, f in table.fields.items()}
    assert _spec_accepts(contract, ref, good)
    assert parse_request(op, json.dumps(good).encode()) == good
    bodies = [{**good, "zzMisspelled": "x"}]
    bodies += [{**good, name: WRONG[f.type]} for name, f in table.fields.items()]
    bodies += [
        {k: v for k, v in good.items() if k != n} for n, f in table.fields.items() if f.required
    ]
    for bad in bodies:
        assert not _spec_accepts(contract, ref, bad), (op, bad)
        with pytest.raises(BadRequest):
            parse_request(op, json.dumps(bad).encode())


# ----- the spec in use: the full one beside the checkout, or the part kept in the repository -----


def _excerpt_script() -> Any:
    path = REPO / "scripts" / "soracom_spec_excerpt.py"
    spec = importlib.util.spec_from_file_location("soracom_spec_excerpt", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_spec_is_found_beside_the_checkout_or_kept_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEPEER_SORACOM_SPEC", raising=False)
    clone = tmp_path / "work" / "gatepeer"
    clone.mkdir(parents=True)
    assert spec_path(clone) == KEPT_SPEC  # a clone alone: the kept part
    full = tmp_path / "work" / FULL_SPEC
    full.parent.mkdir(parents=True)
    full.write_text("openapi: 3.0.0\n")
    assert spec_path(clone) == full  # ../shared beside it: the full spec
    monkeypatch.setenv("GATEPEER_SORACOM_SPEC", str(tmp_path / "named.yaml"))
    assert spec_path(clone) == tmp_path / "named.yaml"


def test_the_kept_excerpt_is_the_scripts_cut() -> None:
    """The kept part is what the script cuts from the spec in use: from the full spec, it is up
    to date; from itself (a clone alone), it is closed (every $ref resolves) and holds nothing
    the emulator's operations do not reach."""
    script = _excerpt_script()
    source = spec_path()
    text = script.render(load_yaml(source), OPERATION_STATUSES)
    kept = KEPT_SPEC.read_text(encoding="utf-8")
    assert text == kept, f"{KEPT_SPEC} is not the cut of {source}: run {script.__file__}"
    assert (KEPT_SPEC.parent / "LICENSE").read_text().startswith("The MIT License")


def test_the_excerpt_drops_what_no_operation_reaches() -> None:
    """The cut can fail: an unreferenced schema and an operation not asked for are left out,
    a referenced one is kept, and an operation the spec lacks is refused."""
    script = _excerpt_script()
    spec = {
        "openapi": "3.0.0",
        "info": {"version": "t"},
        "paths": {
            "/a": {
                "get": {
                    "operationId": "a",
                    "responses": {"200": {"$ref": "#/components/responses/R"}},
                }
            },
            "/b": {"get": {"operationId": "b"}},
        },
        "components": {
            "responses": {
                "R": {
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/S"}}}
                }
            },
            "schemas": {"S": {"type": "object"}, "Unused": {"type": "object"}},
        },
    }
    cut = script.excerpt(spec, ["a"])
    assert list(cut["paths"]) == ["/a"]
    assert cut["components"] == {
        "responses": spec["components"]["responses"],
        "schemas": {"S": {"type": "object"}},
    }
    with pytest.raises(SystemExit, match="not in the spec: c"):
        script.excerpt(spec, ["a", "c"])
