"""The emulator's HTTP shell: a threading server on a socket it is handed, and a handler that
reads one request and passes it to whatever answers requests (`service.Emulator.handle`). It
knows that only as a `RequestAnswerer`, so the shell never imports the service that uses it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, cast

from gatepeer.lab.emulator.model import E_BAD_REQUEST, E_TOO_LARGE, MAX_BODY_BYTES, Response

log = logging.getLogger("gatepeer.lab.emulator")  # one logger for the whole emulator


class RequestAnswerer(Protocol):
    def handle(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes = b""
    ) -> Response: ...


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must not keep the process alive

    def __init__(self, sock: socket.socket, emulator: RequestAnswerer) -> None:
        super().__init__(sock.getsockname()[:2], _RequestHandler, bind_and_activate=False)
        # Replace the socket the base class made with the one we were handed.
        self.socket.close()
        self.socket = sock
        self.address_family = sock.family
        self.server_address = sock.getsockname()
        self.emulator = emulator
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._stopping = False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_lock:
                self._conns.discard(request)

    def serve(self) -> None:
        """Accept until stop(). Not serve_forever: its poll interval would delay every stop."""
        while not self._stopping:
            try:
                conn, addr = self.socket.accept()
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.05)  # EMFILE, ECONNABORTED...: keep serving, do not spin
                continue
            try:
                self.process_request(conn, addr)  # a thread per connection
            except Exception:
                self.handle_error(conn, addr)
                self.shutdown_request(conn)

    def stop(self) -> None:
        """Stop accepting, close the socket, cut open keep-alive connections."""
        self._stopping = True
        # shutdown() wakes a thread blocked in accept() on Linux; close() alone does not.
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):  # already closed by its own thread
                conn.shutdown(socket.SHUT_RDWR)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients with a session expect
    server_version = "soracom-api-emulator"
    timeout = 60  # idle keep-alive connections must not hold a thread forever

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        emulator = cast(Server, self.server).emulator
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._reply(Response(400, {"code": E_BAD_REQUEST, "message": "Send Content-Length"}))
            self.close_connection = True
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self._reply(Response(413, {"code": E_TOO_LARGE, "message": "Bad body length"}))
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        resp = emulator.handle(self.command, self.path, dict(self.headers.items()), body)
        if resp.drop:
            # Say nothing; the server closes the socket after this handler returns.
            self.close_connection = True
            return
        self._reply(resp)

    def _reply(self, resp: Response) -> None:
        data = b"" if resp.body is None else json.dumps(resp.body).encode()
        self.send_response(resp.status)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        if resp.status != 204:  # RFC 9110: no Content-Length on 204
            if data:
                self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        # Request line and status only: headers (key, token) and bodies (auth key) never.
        log.debug("%s %s", self.address_string(), format % args)
