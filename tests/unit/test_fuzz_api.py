"""Issue 9, "Must show" 4: fuzzing the SORACOM API's answers with hypothesis.

A tiny SORACOM API on 127.0.0.1 (`ScriptedApi`: authentication always works, the VPG and the
gate peer list answer whatever the test scripts, status, raw body and headers) serves hypothesis'
answers to the real `SoracomClient`: wrong types, missing fields, huge values, control
characters, nested junk, bodies that are not JSON at all, odd rate-limit headers.

- The client and the checks (`registration.converge_registration`): every answer gives a plausible
  view or a refusal whose message is one printable line without a secret; nothing else ever
  escapes.
- The agent (a fake kernel, nft faked): after a good reconcile, a bad answer leaves the kernel
  untouched, keeps the last good view in memory, in state.json and in the gate cache, and
  turns health degraded with one printable line per reason.
- The daemon's step loop (`Daemon.step`, the API asked in its worker thread) over a stream of
  bad answers: it keeps stepping, keeps the last good state, no answer crashes the worker, and
  it is healthy again once the answers are.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_kernel import FakeKernel
from helpers.plan_inputs import FACTS, make_config
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gatepeer import ruleset
from gatepeer.agent import Agent
from gatepeer.config import AgentConfig, Config, SoracomConfig
from gatepeer.desired_state import GateView, desired_state
from gatepeer.kernel import nftables
from gatepeer.registration import GateError, converge_registration
from gatepeer.soracom import SoracomClient, SoracomError

VPG_ID = "vpg-fuzz-0001"
KEY_ID = "keyId-fuzzfuzzfuzzfuzzfuzzfuzzfuzz01"
AUTH_KEY = "secret-fuzz-authkey-3c1d9e8f7a6b5c4d"
API_KEY = "api-fuzz-9f8e7d6c5b4a39281706"
TOKEN = "token-fuzz-0a1b2c3d4e5f60718293"
SECRETS = (AUTH_KEY, API_KEY, TOKEN)
OUTER = FACTS.local_address  # this host: 198.18.0.10

# The emulator's answers (the shapes of SORACOM's published spec), the starting point of every
# mutation: one field wrong reaches the checks behind all the others.
GOOD_VPG: dict[str, Any] = {
    "vpgId": VPG_ID,
    "operatorId": "OP0012345678",
    "type": 14,
    "status": "running",
    "deviceSubnetCidrRange": "198.19.0.0/16",
    "ueSubnetCidrRange": "198.19.0.0/16",
    "gateOpened": True,
    "gateVxlanId": 10,
    "junctionEnabled": False,
}
GOOD_PEERS: list[dict[str, Any]] = [
    {"outerIpAddress": "198.18.1.11", "innerIpAddress": "198.19.0.1", "netmask": "255.255.0.0",
     "ownedByCustomer": False},
    {"outerIpAddress": "198.18.1.12", "innerIpAddress": "198.19.0.2", "netmask": "255.255.0.0",
     "ownedByCustomer": False},
    {"outerIpAddress": str(OUTER), "innerIpAddress": "198.19.0.3", "netmask": "255.255.0.0",
     "ownedByCustomer": True},
]  # fmt: skip
VPG_FIELDS = ["gateOpened", "deviceSubnetCidrRange", "ueSubnetCidrRange", "gateVxlanId",
              "redirection", "vpgId", "status"]  # fmt: skip
PEER_FIELDS = ["outerIpAddress", "innerIpAddress", "netmask", "ownedByCustomer"]


# ---- a scripted SORACOM API ------------------------------------------------------------------


@dataclass
class Answer:
    """One scripted answer: status, the raw body, extra headers."""

    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, value: Any) -> Answer:
        # allow_nan: Python writes NaN and Infinity, which strict JSON has no words for.
        return cls(json.dumps(value, allow_nan=True).encode())


GOOD = {"vpg": Answer.of(GOOD_VPG), "peers": Answer.of(GOOD_PEERS)}
# Valid, though not as the emulator writes them: a float VNI, no ueSubnetCidrRange, another row
# order, a null netmask (registerGatePeer's), an odd rate-limit header. Random answers are
# rarely all valid at once, so these make sure the accepting path is always exercised too.
ODD_BUT_VALID = {
    "vpg": Answer.of(
        {k: v for k, v in GOOD_VPG.items() if k != "ueSubnetCidrRange"} | {"gateVxlanId": 10.0}
    ),
    "peers": Answer(
        json.dumps([{**GOOD_PEERS[2], "netmask": None}, GOOD_PEERS[1]]).encode(),
        headers={"x-soracom-ratelimit-remaining": "\xb2"},
    ),
}


class ScriptedApi:
    """SORACOM's API on 127.0.0.1 as far as the gate view needs it. /v1/auth and token refresh
    always answer well; `answers["vpg"]`, `["peers"]` and `["register"]` are what the test set."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = dict(GOOD)
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def _answer(self, answer: Answer) -> None:
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.body)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer.body)

            def _route(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                path, method = self.path, self.command
                vpg = f"/v1/virtual_private_gateways/{VPG_ID}"
                if path == "/v1/auth" and method == "POST":
                    token = {"apiKey": API_KEY, "token": TOKEN, "operatorId": "OP0012345678"}
                    return self._answer(Answer.of(token))
                if path.endswith("/token") and method == "POST":
                    return self._answer(Answer.of({"token": TOKEN}))
                with api.lock:
                    answers = dict(api.answers)
                if path == vpg and method == "GET":
                    return self._answer(answers["vpg"])
                if path == f"{vpg}/gate/peers" and method == "GET":
                    return self._answer(answers["peers"])
                if path == f"{vpg}/gate/peers" and method == "POST":
                    return self._answer(answers.get("register", Answer.of(GOOD_PEERS[2])))
                return self._answer(Answer.of({"code": "ERR0001", "message": "no such path"}))

            do_GET = do_POST = do_PUT = do_DELETE = _route

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def script(self, **answers: Answer) -> None:
        with self.lock:
            self.answers = {**GOOD, **answers}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def api() -> Iterator[ScriptedApi]:
    server = ScriptedApi()
    yield server
    server.stop()


def client_for(api: ScriptedApi) -> SoracomClient:
    # No waiting between retries: a 429 or 5xx answer costs four requests, not seconds.
    return SoracomClient(api.url, KEY_ID, lambda: AUTH_KEY, sleep=lambda s: None, timeout=5)


# ---- what hypothesis generates ---------------------------------------------------------------

# Values that break checks: control characters (a header injection, an escape sequence, NUL,
# Unicode line separators), almost-right addresses, huge strings and numbers.
NASTY_TEXT = [
    "", " ", "198.19.0.0/16\n", "198.19.0.3\r\nX-Evil: 1", "\x1b[31m198.18.1.11", "198.18.1.11\x00",
    "\u2028", "198.19.0.0/16 ", "0.0.0.0", "255.255.255.255", "127.0.0.1", "224.0.0.1",
    "198.18.0.10", "10.0.0.1", "198.19.0.0/31", "198.19.0.0/7", "198.19.0.0", "::1",
    "255.255.255.255", "/16", "16", "true", "null", "x" * 100_000, "9" * 5_000,
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, 1, 10, 2**24 - 1, 2**24, -1, 10.0, 10.5, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
    st.sampled_from(NASTY_TEXT),
)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
DELETE = object()


@st.composite
def vpg_values(draw: st.DrawFn) -> Any:
    """The VPG with up to three fields wrong or missing, or an answer of another shape."""
    if draw(st.integers(0, 9)) == 0:
        return draw(junk)
    vpg = dict(GOOD_VPG)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(VPG_FIELDS))
        if name == "redirection" and draw(st.booleans()):
            value: Any = {"enabled": draw(junk), "gateway": draw(junk)}
        else:
            value = draw(st.one_of(st.just(DELETE), junk))
        if value is DELETE:
            vpg.pop(name, None)
        else:
            vpg[name] = value
    return vpg


@st.composite
def peer_values(draw: st.DrawFn) -> Any:
    """The gate peer list with fields wrong or missing, rows lost or added, or another shape."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(junk)
    rows: list[Any] = [dict(r) for r in GOOD_PEERS]
    for _ in range(draw(st.integers(0, 3))):
        row = rows[draw(st.integers(0, len(rows) - 1))]
        if not isinstance(row, dict):
            continue
        name = draw(st.sampled_from(PEER_FIELDS))
        value = draw(st.one_of(st.just(DELETE), junk))
        if value is DELETE:
            row.pop(name, None)
        else:
            row[name] = value
    if choice == 1:
        rows.append(draw(junk))
    if choice == 2:
        del rows[draw(st.integers(0, len(rows) - 1))]
    return rows


good_json = json.dumps(GOOD_VPG).encode()
not_json = st.one_of(
    st.binary(max_size=64),
    st.integers(1, len(good_json) - 1).map(lambda n: good_json[:n]),  # cut off
    st.sampled_from(
        [
            b"[" * 3_000,  # nesting deeper than Python's parser recurses
            b'{"a":' * 3_000,
            b"1" * 5_000,  # more digits than Python converts
            b"<html><body>\x1b[2J captive portal\r\n</body></html>",
            b"\xff\xfe{\x00}\x00",  # UTF-16 with a BOM
            b"\xef\xbb\xbf" + good_json,  # a UTF-8 BOM
            b"NaN",
            b'{"gateVxlanId": 1e999}',
            b"null",
            b"",
        ]
    ),
)
# Header values an HTTP server can send (Latin-1, no line breaks): the client parses the
# rate-limit headers, so odd digits ("²" is a digit to str.isdigit) and huge numbers too.
header_text = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=12),
    st.sampled_from(["\xb2", "\xb9\xb2\xb3", "9" * 5_000, "-1", "1e3", "nan", "inf", " 7 "]),
)
headers = st.dictionaries(
    st.sampled_from(
        ["x-soracom-ratelimit-remaining", "x-soracom-ratelimit-seconds-before-refresh"]
    ),
    header_text,
    max_size=2,
)
statuses = st.sampled_from([200] * 6 + [201, 204, 400, 401, 404, 429, 500, 503])


def answers(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Answer]:
    """Mostly a JSON document of `values`; sometimes a body that is not JSON, an unexpected
    status, odd headers."""
    json_body = values.map(lambda v: json.dumps(v, allow_nan=True).encode())
    return st.builds(
        Answer,
        body=st.one_of(json_body, json_body, json_body, not_json),
        status=st.one_of(st.just(200), statuses),
        headers=headers,
    )


# ---- the properties --------------------------------------------------------------------------


def assert_one_clear_line(message: str) -> None:
    assert message, "an empty message"
    assert message.isprintable(), f"not one printable line: {message!r}"
    assert len(message) <= 2_000, f"{len(message)} characters: {message[:200]!r}..."
    for secret in SECRETS:
        assert secret not in message, "a secret in a message"


def assert_plausible(view: GateView) -> None:
    """What an accepted view must hold whatever the answer was."""
    assert 1 <= view.vni < 2**24
    assert 8 <= view.device_subnet.prefixlen <= 30
    assert view.inner.ip in view.device_subnet
    assert view.inner.network == view.device_subnet
    assert view.endpoints, "a view without VPG endpoints"
    for endpoint in view.endpoints:
        assert isinstance(endpoint.outer, IPv4Address) and endpoint.outer != view.outer
        assert not (endpoint.outer.is_multicast or endpoint.outer.is_loopback)
        assert endpoint.inner is None or endpoint.inner in view.device_subnet
    json.dumps(view.to_json(), allow_nan=False)  # state.json and the cache can hold it


EXAMPLES = 600  # answers through the client and the checks
AGENT_EXAMPLES = 250  # bad answers to an agent
STREAMS = 8  # streams of 8 refused answers through the daemon's loop
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def test_every_answer_gives_a_plausible_view_or_one_clear_line(api: ScriptedApi) -> None:
    client = client_for(api)
    outcomes = {"view": 0, "refused": 0}

    @settings(FUZZ, max_examples=EXAMPLES)
    @example(vpg=ODD_BUT_VALID["vpg"], peers=ODD_BUT_VALID["peers"], register=GOOD["vpg"])
    @given(vpg=answers(vpg_values()), peers=answers(peer_values()), register=answers(junk))
    def check(vpg: Answer, peers: Answer, register: Answer) -> None:
        api.script(vpg=vpg, peers=peers, register=register)
        try:
            view = converge_registration(client, VPG_ID, OUTER, open_gate=False)
        except (SoracomError, GateError) as exc:
            outcomes["refused"] += 1
            assert_one_clear_line(str(exc))
            return
        outcomes["view"] += 1
        assert_plausible(view)

    check()
    # Both outcomes were reached, and the examples really ran.
    assert sum(outcomes.values()) >= EXAMPLES and min(outcomes.values()) > 0, outcomes


# ---- the agent keeps the last good view ------------------------------------------------------


@pytest.fixture
def nft(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """nft as a table holding what was last loaded."""
    table: list[str] = []
    monkeypatch.setattr(nftables, "nft_available", lambda: True)
    monkeypatch.setattr(nftables, "flowtable_supported", lambda netns=None: False)
    monkeypatch.setattr(
        nftables, "load", lambda spec, netns=None, counters=None: table.append(ruleset.render(spec))
    )
    monkeypatch.setattr(nftables, "current", lambda netns=None: table[-1] if table else None)
    return table


def fuzz_config(api: ScriptedApi, tmp_path: Path) -> Config:
    config = make_config()
    return dataclasses.replace(
        config,
        soracom=SoracomConfig(endpoint=api.url, auth_key_id=KEY_ID, vpg_id=VPG_ID),
        agent=AgentConfig(state_file=tmp_path / "state.json", gate_cache=tmp_path / "gate.json"),
        metrics=dataclasses.replace(config.metrics, listen=""),
    )


def good_agent(
    api: ScriptedApi, tmp_path: Path, make: Callable[..., Agent] = Agent
) -> tuple[Agent, FakeKernel, GateView]:
    """An agent converged on the good answers: its view, and the fake kernel it applied to."""
    api.script()
    config = fuzz_config(api, tmp_path)
    agent = make(config, client=client_for(api))
    assert agent.refresh_gate(facts=FACTS), agent.gate_error
    assert agent.gate is not None
    kernel = FakeKernel(desired_state(config, FACTS, agent.gate))
    agent.netlink = kernel  # type: ignore[assignment]
    result = agent.reconcile()
    assert result.health == "ok", result.reasons
    return agent, kernel, agent.gate


def assert_last_good_kept(
    agent: Agent, kernel: FakeKernel, good: GateView, applied: int, tmp_path: Path, cache: str
) -> None:
    assert agent.gate == good
    assert len(kernel.applied) == applied, "a bad answer reached the kernel"
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["gate"] == good.to_json()
    assert state["health"] == "degraded"
    assert (tmp_path / "gate.json").read_text() == cache


def test_the_agent_keeps_the_last_good_view_through_any_bad_answer(
    api: ScriptedApi, tmp_path: Path, nft: list[str]
) -> None:
    agent, kernel, good = good_agent(api, tmp_path)
    outcomes = {"view": 0, "refused": 0}

    @settings(FUZZ, max_examples=AGENT_EXAMPLES)
    @example(vpg=ODD_BUT_VALID["vpg"], peers=ODD_BUT_VALID["peers"])
    @given(vpg=answers(vpg_values()), peers=answers(peer_values()))
    def check(vpg: Answer, peers: Answer) -> None:
        api.script(vpg=vpg, peers=peers)
        applied, cache = len(kernel.applied), (tmp_path / "gate.json").read_text()
        result = agent.reconcile()
        if agent.gate_error is None:
            # A valid answer after all (an optional field gone, say): back to the good one.
            outcomes["view"] += 1
            assert agent.gate is not None
            assert_plausible(agent.gate)
            api.script()
            assert agent.reconcile().health == "ok"
            assert agent.gate == good
            return
        outcomes["refused"] += 1
        assert result.health == "degraded", result.reasons
        assert result.actions == []
        for reason in result.reasons:
            assert_one_clear_line(reason)
        assert_last_good_kept(agent, kernel, good, applied, tmp_path, cache)

    check()
    assert sum(outcomes.values()) >= AGENT_EXAMPLES and min(outcomes.values()) > 0, outcomes
    api.script()
    assert agent.reconcile().health == "ok"


# ---- the daemon's loop -----------------------------------------------------------------------

# Answers sure to be refused, whatever else they hold.
refused_vpg = st.one_of(
    # Not JSON, or JSON that is not an object (a BOM before a good document is still good).
    st.builds(
        Answer,
        body=not_json.filter(lambda b: b.strip() not in (b"", b"null") and b[:1] != b"\xef"),
    ),
    st.builds(Answer, body=st.sampled_from([b"[]", b'"vpg"', b"42", b"true"])),
    st.builds(
        lambda v, value: Answer.of({**v, "gateVxlanId": value}),
        vpg_values().filter(lambda v: isinstance(v, dict)),
        st.one_of(st.text(max_size=8), st.sampled_from([0, -1, 2**24, 10.5, 2**80, []])),
    ),
    st.builds(Answer, body=st.just(b"{}"), status=st.sampled_from([500, 503, 429, 404])),
)


def test_the_daemon_loop_outlives_a_stream_of_bad_answers(
    api: ScriptedApi, tmp_path: Path, nft: list[str]
) -> None:
    from gatepeer.daemon import Daemon, ProbedAgent

    config = fuzz_config(api, tmp_path)
    daemon = Daemon(config, lambda: config)
    agent, kernel, good = good_agent(api, tmp_path, ProbedAgent)
    daemon.agent.close()
    daemon.agent = agent  # type: ignore[assignment]
    applied = len(kernel.applied)
    cache = (tmp_path / "gate.json").read_text()
    interval = 30.0
    clock = 1_000.0
    steps = 0

    @settings(FUZZ, max_examples=STREAMS)
    @given(stream=st.lists(refused_vpg, min_size=8, max_size=8))
    def check(stream: list[Answer]) -> None:
        nonlocal clock, steps
        next_refresh = 0.0
        for answer in stream:
            api.script(vpg=answer)
            clock += interval
            # The timer is due: the step reconciles and asks the API in the worker thread...
            result, next_refresh = daemon.step(clock, next_refresh, interval)
            assert daemon._refresher is not None
            daemon._refresher.join(10)
            assert not daemon._refresher.is_alive(), "the refresh never ended"
            # ...whose end wakes the loop: the next step reconciles against what it found.
            result, next_refresh = daemon.step(clock, next_refresh, interval)
            steps += 1
            assert result is not None and result.health == "degraded", result
            assert result.actions == []
            error = agent.gate_error or ""
            assert not error.startswith("refreshing the gate view failed"), error
            assert_one_clear_line(error)
            assert_last_good_kept(agent, kernel, good, applied, tmp_path, cache)

    check()
    assert steps >= STREAMS * 8
    api.script()
    clock += interval
    daemon.step(clock, 0.0, interval)
    assert daemon._refresher is not None
    daemon._refresher.join(10)
    result, _ = daemon.step(clock, clock + interval, interval)
    assert result is not None and result.health == "ok", result
    assert agent.gate == good


# ---- what the user sees ----------------------------------------------------------------------

CLI_EXAMPLES = 60


def test_gatepeer_apply_shows_one_clear_line_never_a_traceback(
    api: ScriptedApi, tmp_path: Path, nft: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gatepeer apply` on a fresh install (no saved view) against any answer: exit 0 on a
    valid one, else exit 1 with one printable `gatepeer:` line."""
    from click.testing import CliRunner

    from gatepeer import agent as agent_module
    from gatepeer.cli import main

    api.script()
    good = converge_registration(client_for(api), VPG_ID, OUTER, open_gate=False)
    key = tmp_path / "auth-key"
    key.write_text(AUTH_KEY)
    key.chmod(0o600)
    config = tmp_path / "gatepeer.toml"
    config.write_text(
        f'[soracom]\nendpoint = "{api.url}"\nauth_key_id = "{KEY_ID}"\nauth_key_file = "{key}"\n'
        f'vpg_id = "{VPG_ID}"\n[tunnel]\nlocal_address = "{OUTER}"\n'
        f'[agent]\nstate_file = "{tmp_path / "state.json"}"\ngate_cache = ""\n'
    )

    def agent_on_a_fake_kernel(cfg: Config) -> Agent:
        agent = Agent(cfg, client=client_for(api))
        agent.netlink = FakeKernel(desired_state(cfg, FACTS, good))  # type: ignore[assignment]
        return agent

    monkeypatch.setattr(agent_module, "Agent", agent_on_a_fake_kernel)
    exits = {0: 0, 1: 0}

    @settings(FUZZ, max_examples=CLI_EXAMPLES)
    @example(vpg=GOOD["vpg"], peers=GOOD["peers"])  # the fake kernel converges on this one
    @given(vpg=answers(vpg_values()), peers=answers(peer_values()))
    def check(vpg: Answer, peers: Answer) -> None:
        api.script(vpg=vpg, peers=peers)
        result = CliRunner().invoke(main, ["apply", "--config", str(config)])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
        assert result.exit_code in exits, result.output
        exits[result.exit_code] += 1
        assert "Traceback" not in result.output
        # What gatepeer says (its verdict, its log): one printable line each. The rest is the
        # applied commands of a valid answer (an nft script has tabs).
        said = [line for line in result.output.splitlines() if line.startswith("gatepeer: ")]
        for line in said:
            assert_one_clear_line(line)
        verdicts = [line for line in said if not line.startswith("gatepeer: ERROR")]
        assert len(verdicts) == (result.exit_code != 0), result.output

    check()
    assert exits[0] > 0 and exits[1] > 0, exits
