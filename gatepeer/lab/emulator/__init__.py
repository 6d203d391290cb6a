"""SORACOM API emulator: the API side of the lab, and the fake the client's tests talk to.

It speaks the shapes of the official spec (``shared/soracom-api/soracom-api.en.yaml``) for the
operations a customer gate peer needs, keeps its state in memory, and injects faults on demand.
Standard library only: it runs inside lab network namespaces where nothing else is installed.

Public API (kept stable: the lab and the tests use it)
--------------------------------------------

``EmulatorSettings(...)``
    Frozen dataclass, every field has a default (see the class). ``endpoints`` are the VPG's
    own tunnel endpoints as ``Peer(outer_ip, inner_ip)`` (plain 2-tuples are accepted).

``Emulator(settings=None, on_peers_changed=None, *, on_vpg_changed=None,
on_redirection_changed=None, clock=time.monotonic)``
    ``on_peers_changed(peers: list[Peer])`` is called after every registerGatePeer or
    unregisterGatePeer that changed the customer gate peers, outside the state lock, in the
    order of the changes, with the full list of customer peers. ``on_vpg_changed(settings)`` is
    called likewise when the VNI, device subnet, endpoints or gate state change (control
    endpoint, ``update_settings``, openGate, closeGate, setVirtualPrivateGatewayVxLanId), and
    ``on_redirection_changed(redirection: dict | None)`` when set/unsetRedirectionConfiguration
    changed the Junction redirection (None: unset). All run before the API call (or control
    request) that caused them is answered, so a caller that got its answer may rely on the lab
    having followed. A callback that raises is logged; the call still succeeds (the real API
    knows nothing of the lab).
    ``clock`` (monotonic seconds) drives token expiry and the rate-limit window; tests pass a
    settable one.

    ``serve_on(sock) -> base_url``  serve on an already bound socket (listening or not) in a
                                    daemon thread; the emulator owns the socket from then on.
                                    Call it several times to serve several sockets at once.
    ``start(host="127.0.0.1", port=0) -> base_url``  bind and serve (tests, manual use).
    ``stop()``                       stop every server and close its socket.
    ``settings``, ``peers()``, ``endpoints()``, ``update_settings(**changes)``,
    ``set_faults(**faults)``, ``reset_faults()``, ``faults()``, ``set_overrides(vpg=...,
    vpg_remove=..., peers=...)``, ``overrides()``, ``redirection()``, ``expire_tokens()``,
    ``counts()``, ``reset_counts()``, ``state()``, ``handle(...)`` (one request without HTTP),
    ``set_sims([Sim | dict])``, ``sims()`` (the operator's SIMs: ``model.Sim``).

``base_url`` is ``http://HOST:PORT`` without ``/v1``; the API lives under ``/v1``.

The parts: ``model`` (settings, faults, answers: ``EmulatorSettings``, ``Peer``), ``operations``
(routes and the operations, ``OPERATION_STATUSES``), ``requests`` (request bodies),
``http_server`` (the HTTP shell), ``service`` (the ``Emulator``), ``__main__`` (the one command
line) and ``lab_process`` (its ``--lab-dir`` mode, the lab's emulator). Import each name from its
own module; this package's ``__init__`` holds only this description.

Control endpoints (no authentication, never subject to faults)
---------------------------------------------------------------

``GET  /_emulator/state``         counts, recent requests (with the emulator clock's arrival
                                  time), peers, settings (never the auth key),
                                  faults, redirection, overrides
``POST /_emulator/faults``        merge, e.g. ``{"latency_ms": 200, "fail_next": 3,
                                  "fail_status": 503, "rate_limit_next": 2,
                                  "rate_limit_seconds": 1, "drop_next": 1, "deny":
                                  ["listSims"]}`` (``deny``: those operations answer 403, as
                                  for a key without the permission, until reset)
``POST /_emulator/reset_faults``  all faults and overrides off
``POST /_emulator/overrides``     replace the answer overrides (the API lies; the state and the
                                  lab stay true), e.g. ``{"vpg": {"gateVxlanId": 99},
                                  "vpg_remove": ["redirection"], "peers": {"198.18.0.10":
                                  {"innerIpAddress": "10.0.0.1"}}}``: ``vpg`` fields are set and
                                  ``vpg_remove`` fields dropped in every answer carrying the VPG
                                  (getVirtualPrivateGateway, openGate, closeGate, set/unset
                                  redirection), ``peers`` fields set in the listGatePeers and
                                  registerGatePeer entries of that outer address. Values are raw
                                  JSON, never validated. ``{}`` clears them.
``POST /_emulator/settings``      any settings field but ``auth_key``, e.g. ``{"vxlan_id": 20,
                                  "device_subnet": "198.19.0.0/24", "endpoints":
                                  [{"outer_ip": "198.18.1.21", "inner_ip": "198.19.0.1"}],
                                  "gate_opened": false, "token_lifetime_s": 1,
                                  "wrapped_errors": true}``
``POST /_emulator/sims``          replace the operator's SIMs (listSims, the VPG's IP address
                                  map), e.g. ``{"sims": [{"sim_id": "8942...", "imsi":
                                  "440103...", "name": "pump-1", "group_id": "...", "online":
                                  true, "vpg_id": "<this VPG>", "address": "198.19.128.5",
                                  "static_address": null}]}``; with ``"append": true``
                                  added to the SIMs there (a body holds at most 1 MiB)
``POST /_emulator/expire_tokens`` every issued token expires now
``POST /_emulator/reset_counts``  request counts and recent requests cleared

Each answers 200 with the state document; a bad value answers 400 ``{"code", "message"}``.

Faults apply to every ``/v1`` call, in this order: ``latency_ms`` delays each answer (until
reset); ``drop_next`` closes the connection without answering; ``rate_limit_next`` answers 429
with the ``X-Soracom-Ratelimit-*`` headers; ``fail_next`` answers ``fail_status``.

Where the spec is silent, the emulator chooses (each choice is tested):

- a missing, unknown or mismatched key/token is 401; an expired token is 401, except on
  generateAuthToken where the spec documents 400 (the client must then log in again);
- ``token_lifetime_s`` is the lifetime when the request names no ``tokenTimeoutSeconds`` and a
  cap when it does, so shortening it in a test also shortens tokens a client asks to be long;
- registering an outer (or inner) address already taken is 400; nothing is ever duplicated;
- openGate, closeGate and set/unset_redirection answer 200 with the VPG (the spec gives no body);
- listSims and the IP address map page by ``limit`` (10 when not given) and
  ``last_evaluated_key``; ``X-Soracom-Next-Key`` is the last row's key (the SIM id, the
  address) while rows remain; a key no page ended with, or a bad limit, is 400. The map holds
  static entries, the addresses of SIMs in session on this VPG (dynamic), customer gate peers
  and the VPG's own endpoints, as the spec warns it does;
- error codes look like SORACOM's (``SEM0016``) but are the emulator's own (``EMU0001``...).
- a request body is checked against the operation's request schema (``requests``):
  not JSON, not an object, an unknown or misspelled field, a wrong type or a missing required
  field is 400, after the token check; an operation whose spec declares no body accepts none
  or ``{}`` and refuses anything else.

Command line: ``python -m gatepeer.lab.emulator --listen 127.0.0.1:8080 [--vni N]
[--device-subnet CIDR] [--endpoint OUTER=INNER ...] [--auth-key-id ID] [--auth-key-file PATH]
[--vpg-id ID] [--operator-id ID] [--token-lifetime S] [--wrapped-errors] [--gate-closed]``.
The lab runs it as ``python -m gatepeer.lab.emulator --lab-dir DIR [--foreground]``.
"""
