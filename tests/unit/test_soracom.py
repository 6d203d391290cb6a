"""The SORACOM API client against the emulator on 127.0.0.1, faults injected.

Nothing here sleeps: the client's `sleep` is a recorder and its `clock` (shared with the
emulator) moves only when a test says so. Only the timeout tests wait, for a short socket timeout.
"""

from __future__ import annotations

import logging
import random
import socket
import statistics
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from helpers.soracom_spec import SPEC_URI, pointer

from gatepeer import soracom
from gatepeer.lab.emulator.model import EmulatorSettings
from gatepeer.lab.emulator.service import Emulator
from gatepeer.soracom import (
    RATE_LIMIT_WAIT_MAX_S,
    ApiStats,
    AuthenticationError,
    SoracomClient,
    SoracomError,
    error_fields,
)

AUTH_KEY = "secret-soracom-client-test-6d1e0b7c9a2f4e8d"
SETTINGS = EmulatorSettings(auth_key=AUTH_KEY)
KEY_ID = SETTINGS.auth_key_id
VPG_ID = SETTINGS.vpg_id
GET_VPG = "getVirtualPrivateGateway"


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Sleeps:
    """Records the waits instead of sleeping; `then` runs on each (to lift a fault, say)."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.then: Any = None

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.then is not None:
            self.then()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emulator(clock: FakeClock) -> Iterator[Emulator]:
    emu = Emulator(SETTINGS, clock=clock)
    emu.base_url = emu.start()  # type: ignore[attr-defined]
    yield emu
    emu.stop()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def make_client(
    emu: Emulator, clock: FakeClock, sleeps: Sleeps, key: str = AUTH_KEY, **kw: Any
) -> SoracomClient:
    kw.setdefault("timeout", 5.0)
    return SoracomClient(
        emu.base_url,  # type: ignore[attr-defined]
        kw.pop("auth_key_id", KEY_ID),
        lambda: key,
        sleep=sleeps,
        clock=clock,
        **kw,
    )


@pytest.fixture
def client(emulator: Emulator, clock: FakeClock, sleeps: Sleeps) -> SoracomClient:
    return make_client(emulator, clock, sleeps)


# ---- authentication --------------------------------------------------------------------------


def test_auth_ok(client: SoracomClient, emulator: Emulator) -> None:
    client.authenticate()
    assert client.operator_id == SETTINGS.operator_id
    vpg = client.get_virtual_private_gateway(VPG_ID)
    assert vpg["vpgId"] == VPG_ID
    assert emulator.counts() == {"auth": 1, GET_VPG: 1}


def test_first_call_authenticates_lazily(client: SoracomClient, emulator: Emulator) -> None:
    assert client.operator_id is None
    client.get_virtual_private_gateway(VPG_ID)
    client.get_virtual_private_gateway(VPG_ID)
    assert emulator.counts() == {"auth": 1, GET_VPG: 2}


@pytest.mark.parametrize("wrong", ["key", "key id"])
def test_wrong_key_is_an_authentication_error_without_the_secret(
    emulator: Emulator,
    clock: FakeClock,
    sleeps: Sleeps,
    caplog: pytest.LogCaptureFixture,
    wrong: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong_secret = "secret-wrong-key-that-must-not-leak-0042"
    if wrong == "key":
        client = make_client(emulator, clock, sleeps, key=wrong_secret)
        key_id = KEY_ID
    else:
        key_id = "keyId-nosuchkey00000000000000000000"
        client = make_client(emulator, clock, sleeps, key=wrong_secret, auth_key_id=key_id)
    with pytest.raises(AuthenticationError) as info:
        client.get_virtual_private_gateway(VPG_ID)
    exc = info.value
    assert exc.status == 401
    assert f"authentication failed for auth key id {key_id}: check the key" in str(exc)
    for text in (str(exc), repr(exc), repr(exc.args), repr(client), caplog.text):
        assert wrong_secret not in text
        assert AUTH_KEY not in text
    assert emulator.counts() == {"auth": 1}  # a refused key is not retried
    assert sleeps.waits == []
    assert client.stats.auth_failures == 1


def test_unreadable_key_file(emulator: Emulator, clock: FakeClock, sleeps: Sleeps) -> None:
    def read() -> str:
        raise PermissionError(13, "Permission denied")

    client = SoracomClient(emulator.base_url, KEY_ID, read, sleep=sleeps, clock=clock)  # type: ignore[attr-defined]
    with pytest.raises(AuthenticationError, match="cannot read the auth key file"):
        client.authenticate()
    assert emulator.counts() == {}


def test_unreadable_ssm_parameter_is_named_as_such(
    emulator: Emulator, clock: FakeClock, sleeps: Sleeps
) -> None:
    from gatepeer.aws.ssm import SsmParameterError

    def read() -> str:
        raise SsmParameterError("/gatepeer/auth-key", "not found")

    client = SoracomClient(emulator.base_url, KEY_ID, read, sleep=sleeps, clock=clock)  # type: ignore[attr-defined]
    with pytest.raises(AuthenticationError) as caught:
        client.authenticate()
    assert "cannot read SSM parameter /gatepeer/auth-key: not found" in str(caught.value)
    assert "auth key file" not in str(caught.value)
    assert emulator.counts() == {}


def test_token_refreshed_before_expiry(
    emulator: Emulator, clock: FakeClock, sleeps: Sleeps
) -> None:
    client = make_client(emulator, clock, sleeps, token_lifetime=1000)
    client.get_virtual_private_gateway(VPG_ID)
    clock.advance(500)  # half the lifetime left: no refresh
    client.get_virtual_private_gateway(VPG_ID)
    assert emulator.counts().get("generateAuthToken", 0) == 0
    clock.advance(450)  # 50 s of 1000 left, inside the 10 % margin: refresh first
    client.get_virtual_private_gateway(VPG_ID)
    assert emulator.counts() == {"auth": 1, "generateAuthToken": 1, GET_VPG: 3}
    clock.advance(500)  # past the first token's expiry, well inside the new one's
    client.get_virtual_private_gateway(VPG_ID)
    counts = emulator.counts()
    assert counts == {"auth": 1, "generateAuthToken": 1, GET_VPG: 4}
    assert client.stats.requests.get((GET_VPG, 401)) is None


def test_token_already_expired_logs_in_again(
    emulator: Emulator, clock: FakeClock, sleeps: Sleeps
) -> None:
    client = make_client(emulator, clock, sleeps, token_lifetime=1000)
    client.get_virtual_private_gateway(VPG_ID)
    clock.advance(5000)  # suspended host: the token died long ago
    client.get_virtual_private_gateway(VPG_ID)
    counts = emulator.counts()
    assert counts["auth"] == 2
    assert counts[GET_VPG] == 2
    assert sleeps.waits == []


def test_one_reauth_on_401(client: SoracomClient, emulator: Emulator, sleeps: Sleeps) -> None:
    client.get_virtual_private_gateway(VPG_ID)
    emulator.expire_tokens()
    assert client.get_virtual_private_gateway(VPG_ID)["vpgId"] == VPG_ID
    assert emulator.counts() == {"auth": 2, GET_VPG: 3}
    assert client.stats.requests[(GET_VPG, 401)] == 1
    assert client.stats.requests[(GET_VPG, 200)] == 2
    assert sleeps.waits == []


def test_reauth_only_once_when_the_key_was_revoked(
    client: SoracomClient, emulator: Emulator
) -> None:
    client.get_virtual_private_gateway(VPG_ID)
    emulator.update_settings(auth_key="secret-rotated-key-0000000000000000")
    emulator.expire_tokens()
    with pytest.raises(AuthenticationError) as info:
        client.get_virtual_private_gateway(VPG_ID)
    assert "secret-rotated" not in str(info.value) and AUTH_KEY not in str(info.value)
    assert emulator.counts() == {"auth": 2, GET_VPG: 2}


# ---- retries ---------------------------------------------------------------------------------


def test_5xx_for_the_next_calls_is_retried_then_succeeds(
    emulator: Emulator, clock: FakeClock, sleeps: Sleeps
) -> None:
    client = make_client(emulator, clock, sleeps, attempts=5, backoff_base=0.5, backoff_max=8)
    client.authenticate()
    emulator.set_faults(fail_next=3, fail_status=503)
    assert client.get_virtual_private_gateway(VPG_ID)["vpgId"] == VPG_ID
    assert emulator.counts()[GET_VPG] == 4
    assert client.stats.requests[(GET_VPG, 503)] == 3
    assert client.stats.requests[(GET_VPG, 200)] == 1
    assert len(sleeps.waits) == 3
    assert all(0 <= w <= 8 for w in sleeps.waits)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_forever_gives_up_after_attempts(
    emulator: Emulator, clock: FakeClock, sleeps: Sleeps, status: int
) -> None:
    client = make_client(emulator, clock, sleeps, attempts=3)
    client.authenticate()
    emulator.set_faults(fail_next=1000, fail_status=status)
    with pytest.raises(SoracomError) as info:
        client.get_virtual_private_gateway(VPG_ID)
    exc = info.value
    assert not isinstance(exc, AuthenticationError)
    assert exc.status == status and exc.code == "EMU0012"
    assert exc.operation == GET_VPG
    assert f"HTTP {status}" in str(exc)
    assert emulator.counts()[GET_VPG] == 3
    assert len(sleeps.waits) == 2


def test_4xx_is_not_retried(client: SoracomClient, emulator: Emulator, sleeps: Sleeps) -> None:
    client.authenticate()
    emulator.set_faults(fail_next=1, fail_status=400)
    with pytest.raises(SoracomError) as info:
        client.get_virtual_private_gateway(VPG_ID)
    assert info.value.status == 400
    assert emulator.counts()[GET_VPG] == 1
    assert sleeps.waits == []


def test_backoff_grows_and_is_jittered_within_bounds(client: SoracomClient) -> None:
    client.backoff_base, client.backoff_max = 0.5, 8.0
    rng_state = random.getstate()
    random.seed(20240607)
    try:
        samples = {n: [client._backoff(n) for _ in range(400)] for n in range(1, 8)}
    finally:
        random.setstate(rng_state)
    means = [statistics.fmean(samples[n]) for n in range(1, 8)]
    for n, waits in samples.items():
        bound = min(8.0, 0.5 * 2**n)
        assert all(0 <= w <= bound for w in waits), (n, max(waits))
        assert len(set(waits)) > 300  # jittered, not one fixed value
        assert statistics.pstdev(waits) > bound / 10
    # The waits grow until the cap, then stay under it.
    assert means[0] < means[1] < means[2] < means[3]
    assert max(max(samples[n]) for n in (5, 6, 7)) <= 8.0


def test_backoff_waits_recorded_through_real_retries_grow(
    emulator: Emulator, clock: FakeClock, sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Take the top of each jitter range: what the client asks for must then double each time.
    monkeypatch.setattr(soracom.random, "uniform", lambda lo, hi: hi)
    client = make_client(emulator, clock, sleeps, attempts=6, backoff_base=0.25, backoff_max=3)
    client.authenticate()
    emulator.set_faults(fail_next=5, fail_status=500)
    client.get_virtual_private_gateway(VPG_ID)
    assert sleeps.waits == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_429_waits_what_the_header_says(
    client: SoracomClient, emulator: Emulator, sleeps: Sleeps
) -> None:
    client.authenticate()
    emulator.set_faults(rate_limit_next=2, rate_limit_seconds=7)
    assert client.get_virtual_private_gateway(VPG_ID)["vpgId"] == VPG_ID
    assert sleeps.waits == [7.0, 7.0]
    assert client.stats.requests[(GET_VPG, 429)] == 2
    assert client.stats.requests[(GET_VPG, 200)] == 1


def test_429_wait_is_capped(client: SoracomClient, emulator: Emulator, sleeps: Sleeps) -> None:
    client.authenticate()
    emulator.set_faults(rate_limit_next=1, rate_limit_seconds=3600)
    client.get_virtual_private_gateway(VPG_ID)
    assert sleeps.waits == [RATE_LIMIT_WAIT_MAX_S] == [60.0]


def test_a_call_that_gave_up_on_429s_makes_the_next_call_wait_out_the_limit(
    client: SoracomClient, emulator: Emulator, clock: FakeClock, sleeps: Sleeps
) -> None:
    # The daemon's next refresh follows a failed one by a timer interval (1 s here): it must
    # not ask inside the wait the last 429 asked for.
    client.authenticate()
    emulator.set_faults(rate_limit_next=client.attempts, rate_limit_seconds=5)
    with pytest.raises(SoracomError) as failed:
        client.get_virtual_private_gateway(VPG_ID)
    assert failed.value.status == 429
    assert sleeps.waits == [5.0] * (client.attempts - 1)
    clock.advance(1.0)
    assert client.get_virtual_private_gateway(VPG_ID)["vpgId"] == VPG_ID
    assert sleeps.waits[-1] == 4.0
    clock.advance(4.0)  # the limit has refreshed: no more waiting
    client.get_virtual_private_gateway(VPG_ID)
    assert len(sleeps.waits) == client.attempts


def test_rate_limit_wait_header_parsing() -> None:
    wait = soracom._rate_limit_wait
    key = "x-soracom-ratelimit-seconds-before-refresh"
    assert wait({key: "12"}) == 12.0
    assert wait({key: "0"}) == 0.0
    assert wait({key: "-5"}) == 0.0
    assert wait({key: "999"}) == 60.0
    assert wait({}) == 1.0
    assert wait({key: "soon"}) == 1.0
    assert 0.0 <= wait({key: "nan"}) <= 60.0
    assert wait({key: "inf"}) == 60.0


def test_dropped_connection_is_retried(
    client: SoracomClient, emulator: Emulator, sleeps: Sleeps
) -> None:
    client.authenticate()
    emulator.set_faults(drop_next=2)
    assert client.get_virtual_private_gateway(VPG_ID)["vpgId"] == VPG_ID
    assert len(sleeps.waits) == 2
    assert client.stats.requests[(GET_VPG, 0)] == 2
    assert client.stats.requests[(GET_VPG, 200)] == 1


def test_dropped_connection_forever_is_an_error_with_status_0(
    emulator: Emulator, clock: FakeClock, sleeps: Sleeps
) -> None:
    client = make_client(emulator, clock, sleeps, attempts=3)
    client.authenticate()
    emulator.set_faults(drop_next=100)
    with pytest.raises(SoracomError) as info:
        client.get_virtual_private_gateway(VPG_ID)
    assert info.value.status == 0
    assert emulator.counts()[GET_VPG] == 3


def test_timeout_is_retried_then_an_error(
    emulator: Emulator, clock: FakeClock, sleeps: Sleeps
) -> None:
    client = make_client(emulator, clock, sleeps, attempts=2, timeout=0.2)
    client.authenticate()
    emulator.set_faults(latency_ms=1500)
    with pytest.raises(SoracomError) as info:
        client.get_virtual_private_gateway(VPG_ID)
    assert info.value.status == 0
    assert "timed out" in str(info.value)
    assert emulator.counts()[GET_VPG] == 2
    assert len(sleeps.waits) == 1
    assert client.stats.requests[(GET_VPG, 0)] == 2


def test_timeout_is_retried_then_succeeds(
    emulator: Emulator, clock: FakeClock, sleeps: Sleeps
) -> None:
    client = make_client(emulator, clock, sleeps, attempts=3, timeout=0.2)
    client.authenticate()
    emulator.set_faults(latency_ms=1500)
    sleeps.then = emulator.reset_faults  # the network heals while the client backs off
    assert client.get_virtual_private_gateway(VPG_ID)["vpgId"] == VPG_ID
    assert len(sleeps.waits) == 1
    assert client.stats.requests[(GET_VPG, 0)] == 1
    assert client.stats.requests[(GET_VPG, 200)] == 1


# ---- error shapes and stats ------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [False, True])
def test_both_error_shapes_are_parsed(
    client: SoracomClient, emulator: Emulator, wrapped: bool
) -> None:
    emulator.update_settings(wrapped_errors=wrapped)
    with pytest.raises(SoracomError) as info:
        client.get_virtual_private_gateway("vpg-does-not-exist")
    exc = info.value
    assert exc.status == 404
    assert exc.code == "EMU0006"
    assert str(exc) == (f"SORACOM API {GET_VPG} failed with HTTP 404: EMU0006: No such VPG found")


def test_error_fields() -> None:
    flat = b'{"code": "SEM0016", "message": "bad"}'
    wrapped = b'{"errorMessage": {"code": "SEM0016", "message": "bad"}, "httpStatus": 400}'
    assert error_fields(flat) == ("SEM0016", "bad")
    assert error_fields(wrapped) == ("SEM0016", "bad")
    assert error_fields(b"") == ("", "")
    assert error_fields(b"[1, 2]") == ("", "")
    assert error_fields(b"<html>Bad Gateway</html>") == ("", "<html>Bad Gateway</html>")


def test_api_stats_count_by_operation_and_status(client: SoracomClient, emulator: Emulator) -> None:
    client.get_virtual_private_gateway(VPG_ID)
    client.list_gate_peers(VPG_ID)
    client.list_gate_peers(VPG_ID)
    with pytest.raises(SoracomError):
        client.get_virtual_private_gateway("vpg-does-not-exist")
    stats = client.stats
    assert stats.requests == {
        ("auth", 200): 1,
        (GET_VPG, 200): 1,
        ("listGatePeers", 200): 2,
        (GET_VPG, 404): 1,
    }
    assert set(stats.seconds) == {"auth", GET_VPG, "listGatePeers"}
    # The emulator's limit is 100 a window; five calls so far.
    assert stats.ratelimit_remaining == 95


def test_shared_stats_object(emulator: Emulator, clock: FakeClock, sleeps: Sleeps) -> None:
    stats = ApiStats()
    client = make_client(emulator, clock, sleeps, stats=stats)
    client.get_virtual_private_gateway(VPG_ID)
    assert client.stats is stats
    assert stats.requests[(GET_VPG, 200)] == 1


def test_ratelimit_remaining_after_a_429(
    client: SoracomClient, emulator: Emulator, sleeps: Sleeps
) -> None:
    client.authenticate()
    emulator.set_faults(rate_limit_next=1, rate_limit_seconds=1)
    seen: list[int | None] = []
    sleeps.then = lambda: seen.append(client.stats.ratelimit_remaining)
    client.get_virtual_private_gateway(VPG_ID)
    assert seen == [0]
    assert client.stats.ratelimit_remaining == 97


# ---- the operations --------------------------------------------------------------------------


def test_register_list_unregister_open(client: SoracomClient, emulator: Emulator) -> None:
    peer = client.register_gate_peer(VPG_ID, "198.18.0.10")
    assert peer["outerIpAddress"] == "198.18.0.10"
    assert peer["ownedByCustomer"] is True
    assert peer["netmask"] is None  # as SORACOM answers a registration
    listed = client.list_gate_peers(VPG_ID)
    assert {p["outerIpAddress"] for p in listed} == {"198.18.1.11", "198.18.1.12", "198.18.0.10"}
    client.unregister_gate_peer(VPG_ID, "198.18.0.10")
    assert emulator.peers() == []
    emulator.update_settings(gate_opened=False)
    client.open_gate(VPG_ID)
    assert emulator.settings.gate_opened is True


# ---- answers that are not HTTP or not JSON ---------------------------------------------------


class CannedServer:
    """Answers each connection on 127.0.0.1 with the next canned reply, then closes it."""

    def __init__(self, replies: list[bytes]) -> None:
        self.replies = list(replies)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.served = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.replies:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(self.replies.pop(0))
                self.served += 1

    def close(self) -> None:
        self.sock.close()


def http_reply(status: str, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


AUTH_OK = http_reply(
    "200 OK", b'{"apiKey": "api-1", "operatorId": "OP0012345678", "token": "tok-1"}'
)


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(http_reply("200 OK", b'{"apiKey"', length=400), id="truncated-body"),
        pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", id="not-http"),
    ],
)
def test_broken_answer_is_retried_like_no_answer(sleeps: Sleeps, broken: bytes) -> None:
    server = CannedServer([broken, AUTH_OK])
    try:
        client = SoracomClient(server.url, KEY_ID, lambda: AUTH_KEY, sleep=sleeps, timeout=5)
        client.authenticate()
    finally:
        server.close()
    assert client.operator_id == "OP0012345678"
    assert len(sleeps.waits) == 1
    assert client.stats.requests[("auth", 0)] == 1


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(http_reply("200 OK", b"<html>portal</html>"), id="html"),
        pytest.param(http_reply("200 OK", b'{"token": "t"}'), id="missing-fields"),
        pytest.param(http_reply("200 OK", b"[]"), id="a-list"),
    ],
)
def test_unusable_auth_answer_is_a_soracom_error(sleeps: Sleeps, reply: bytes) -> None:
    server = CannedServer([reply])
    try:
        client = SoracomClient(server.url, KEY_ID, lambda: AUTH_KEY, sleep=sleeps, timeout=5)
        with pytest.raises(SoracomError) as info:
            client.authenticate()
    finally:
        server.close()
    assert info.value.operation == "auth"
    assert AUTH_KEY not in str(info.value)


@pytest.mark.parametrize(
    ("call", "body"),
    [
        pytest.param("list_gate_peers", b'{"outerIpAddress": "x"}', id="peers-not-a-list"),
        pytest.param("get_virtual_private_gateway", b"[1]", id="vpg-not-an-object"),
    ],
)
def test_answer_of_the_wrong_type_is_a_soracom_error(
    sleeps: Sleeps, call: str, body: bytes
) -> None:
    server = CannedServer([AUTH_OK, http_reply("200 OK", body)])
    try:
        client = SoracomClient(server.url, KEY_ID, lambda: AUTH_KEY, sleep=sleeps, timeout=5)
        with pytest.raises(SoracomError):
            getattr(client, call)(VPG_ID)
    finally:
        server.close()


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:99999", "127.0.0.1:8080", "http://127.0.0.1:80x"]
)
def test_malformed_endpoint_is_a_soracom_error(sleeps: Sleeps, endpoint: str) -> None:
    client = SoracomClient(endpoint, KEY_ID, lambda: AUTH_KEY, sleep=sleeps, attempts=3)
    with pytest.raises(SoracomError) as info:
        client.authenticate()
    assert info.value.operation == "auth"
    assert info.value.status == 0
    assert AUTH_KEY not in str(info.value)
    assert len(sleeps.waits) <= 2  # a clean error, whether or not it was retried


def test_a_redirect_is_refused_and_the_credentials_stay_home(client: SoracomClient) -> None:
    import http.server

    seen: list[dict[str, str]] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            seen.append(dict(self.headers))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args: Any) -> None:
            pass

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{other.server_port}/v1/peers")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    redirecting = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    for server in (other, redirecting):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client.authenticate()  # against the emulator: the client now holds a token
        client.endpoint = f"http://127.0.0.1:{redirecting.server_port}"
        with pytest.raises(SoracomError) as info:
            client.list_gate_peers("vpg")
        assert info.value.status == 302
        assert seen == [], "the redirect was followed with the API key and token"
    finally:
        for server in (other, redirecting):
            server.shutdown()
            server.server_close()


def test_the_session_repr_hides_the_api_key_and_token(client: SoracomClient) -> None:
    client.authenticate()
    session = client._session
    assert session is not None
    text = repr(session)
    assert session.token not in text and session.api_key not in text


# ---- redirection, the endpoint's path, request bodies against the spec -----------------------


def test_set_and_unset_redirection(client: SoracomClient, emulator: Emulator) -> None:
    client.set_redirection(VPG_ID, "198.19.0.3")
    assert emulator.state()["redirection"] == {"enabled": True, "gateway": "198.19.0.3"}
    assert client.get_virtual_private_gateway(VPG_ID)["redirection"]["gateway"] == "198.19.0.3"
    client.unset_redirection(VPG_ID)
    assert emulator.state()["redirection"] is None
    assert emulator.counts()["setRedirectionConfiguration"] == 1
    assert emulator.counts()["unsetRedirectionConfiguration"] == 1


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", "/"])
def test_an_endpoint_with_a_trailing_v1_works(
    emulator: Emulator, clock: FakeClock, sleeps: Sleeps, suffix: str
) -> None:
    base = emulator.base_url  # type: ignore[attr-defined]
    client = SoracomClient(base + suffix, KEY_ID, lambda: AUTH_KEY, sleep=sleeps, clock=clock)
    assert client.endpoint == base
    assert client.get_virtual_private_gateway(VPG_ID)["vpgId"] == VPG_ID
    assert "_unknown" not in emulator.counts()


def test_every_request_body_the_client_sends_matches_the_spec(
    request: pytest.FixtureRequest, client: SoracomClient, emulator: Emulator, clock: FakeClock
) -> None:
    spec = request.getfixturevalue("contract")
    sent: list[tuple[str, str, str, Any]] = []
    real_send = client._send

    def recording(operation: str, method: str, path: str, body: Any, headers: Any) -> Any:
        sent.append((operation, method, path, body))
        return real_send(operation, method, path, body, headers)

    client._send = recording  # type: ignore[method-assign]
    client.get_virtual_private_gateway(VPG_ID)
    clock.advance(soracom.TOKEN_LIFETIME_S * 0.95)  # the next call refreshes the token
    client.list_gate_peers(VPG_ID)
    client.register_gate_peer(VPG_ID, "198.18.0.10")
    client.register_gate_peer(VPG_ID, "198.18.0.20", "198.19.0.77")
    client.set_redirection(VPG_ID, "198.19.0.77")
    client.unset_redirection(VPG_ID)
    client.unregister_gate_peer(VPG_ID, "198.18.0.10")
    emulator.update_settings(gate_opened=False)
    client.open_gate(VPG_ID)
    operations = {op for op, *_ in sent}
    assert operations >= {
        "auth",
        "generateAuthToken",
        "registerGatePeer",
        "setRedirectionConfiguration",
        "unsetRedirectionConfiguration",
        "openGate",
    }
    for operation, method, _path, body in sent:
        spec_method, template = spec.operations[operation]
        assert method == spec_method, operation
        request = spec.spec["paths"][template][method.lower()].get("requestBody")
        if request is None:
            assert body is None, f"{operation} sends a body the spec does not define"
            continue
        ref = f"{SPEC_URI}#{pointer('paths', template, method.lower(), 'requestBody')}"
        spec.validate(f"{ref}/content/application~1json/schema", body)
        if request.get("required"):
            assert body is not None, operation


def test_strict_request_schemas_catch_a_field_the_spec_lacks(
    request: pytest.FixtureRequest,
) -> None:
    spec = request.getfixturevalue("contract")
    _, template = spec.operations["setRedirectionConfiguration"]
    ref = f"{SPEC_URI}#{pointer('paths', template, 'post', 'requestBody')}"
    with pytest.raises(AssertionError):
        spec.validate(f"{ref}/content/application~1json/schema", {"gatewayAddress": "x"})


@pytest.mark.parametrize("bad", ["tok\r\nX-Injected: 1", "tok en", "t\u00f6ken", "tok\x00"])
def test_a_token_a_header_cannot_carry_is_refused_without_showing_it(
    sleeps: Sleeps, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    answer = json.dumps({"apiKey": "api-1", "operatorId": "OP1", "token": bad}).encode()
    caplog.set_level(logging.DEBUG)
    server = CannedServer([http_reply("200 OK", answer)])
    try:
        client = SoracomClient(server.url, KEY_ID, lambda: AUTH_KEY, sleep=sleeps, attempts=1)
        with pytest.raises(SoracomError) as info:
            client.get_virtual_private_gateway(VPG_ID)
    finally:
        server.close()
    message = str(info.value)
    assert "token" in message and "\n" not in message
    assert bad not in message and "Injected" not in message
    assert "Injected" not in caplog.text and bad not in caplog.text


def test_an_error_message_from_the_api_is_one_printable_line(sleeps: Sleeps) -> None:
    body = b'{"code": "E1", "message": "bad\\r\\nX-Log-Forged: yes \\u001b[31m"}'
    server = CannedServer([AUTH_OK, http_reply("400 Bad Request", body)])
    try:
        client = SoracomClient(server.url, KEY_ID, lambda: AUTH_KEY, sleep=sleeps, timeout=5)
        with pytest.raises(SoracomError) as info:
            client.get_virtual_private_gateway(VPG_ID)
    finally:
        server.close()
    assert str(info.value).endswith("E1: bad\\r\\nX-Log-Forged: yes \\x1b[31m")
    assert soracom.printable("a\r\nb\x1b[31m\u00e9" + "x" * 300) == (
        "a\\r\\nb\\x1b[31m\\xe9" + "x" * 179 + "..."
    )


def test_a_header_value_error_never_quotes_the_header(
    client: SoracomClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.authenticate()
    assert client._session is not None
    client._session.token = "secret-token\r\nX: y"  # as if a bug let one through
    with pytest.raises(SoracomError) as info:
        client.get_virtual_private_gateway(VPG_ID)
    assert "secret-token" not in str(info.value)
    assert "soracom.endpoint" in str(info.value)
