"""A fault-injecting HTTP proxy for the local S3 endpoint (127.0.0.1 only).

It forwards every request to the real endpoint (the suite's SeaweedFS server) and, with the
configured probabilities, instead resets the connection, answers ``500 InternalError`` or
``503 SlowDown`` (the S3 XML error bodies), or stalls before forwarding. ``always`` makes every
request fail, to outlast any retry budget. ``conditional`` makes it a store that does not do
conditional writes, as some S3-compatible servers do not: ``"ignore"`` answers a conditional
write as if its ``If-None-Match``/``If-Match`` were absent (the request goes to the server as
signed; when the server refuses it with 412, the proxy sends it again without those headers,
signed anew with the suite's credentials: a real server checks every signature), and
``"501"`` answers ``501 NotImplemented`` to it. Request loops are bounded by the client; the
proxy stops with :meth:`stop`.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_ERROR = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>"
          "<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>")


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0, reset: float = 0.0, error500: float = 0.0,
                 slowdown: float = 0.0, stall: float = 0.0, stall_seconds: float = 2.0,
                 credentials: tuple[str, str] | None = None, region: str = "us-east-1"):
        up = urlparse(upstream)
        self.upstream = (up.hostname, up.port)
        self.rates = {"reset": reset, "500": error500, "503": slowdown, "stall": stall}
        self.stall_seconds = stall_seconds
        self.always: str | None = None  # "reset" | "500" | "503": every request fails
        #: how many of the next requests are forwarded at once but answered ``stall_seconds``
        #: late: past a client's read timeout, the client sends again what has landed
        self.late = 0
        #: None, "ignore" or "501": how the proxy's store treats conditional writes (above),
        #: and which of their headers it treats so
        self.conditional: str | None = None
        self.conditional_headers = {"if-none-match", "if-match"}
        #: the access key and secret that requests sent again are signed with ("ignore")
        self.credentials, self.region = credentials, region
        self.counts = {"requests": 0, "reset": 0, "500": 0, "503": 0, "stall": 0,
                       "conditional": 0}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault(self) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if self.always:
                self.counts[self.always] += 1
                return self.always
            roll = self._rng.random()
            for kind, rate in self.rates.items():
                if roll < rate:
                    self.counts[kind] += 1
                    return kind
                roll -= rate
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply_error(self, status: int, code: str, message: str) -> None:
                body = _ERROR.format(code=code, message=message).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _reset(self) -> None:
                # RST instead of FIN: the client sees "connection reset by peer"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _conditional(self) -> bool:
                return self.command == "PUT" and any(
                    k.lower() in proxy.conditional_headers for k in self.headers.keys())

            def _send(self, headers: dict, body: bytes) -> tuple:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    return resp.status, resp.getheaders(), resp.read(), \
                        resp.getheader("Content-Length")
                finally:
                    conn.close()

            def _unconditional(self, headers: dict, body: bytes) -> dict:
                """The request without its conditional headers, signed anew (SigV4, the
                suite's credentials), for the same Host and path as the client signed."""
                from botocore.auth import S3SigV4Auth
                from botocore.awsrequest import AWSRequest
                from botocore.credentials import Credentials

                if proxy.credentials is None:
                    raise RuntimeError("FaultProxy(credentials=...) is needed to send a "
                                       "request again without its conditional headers")
                drop = {"if-none-match", "if-match", "authorization", "x-amz-date",
                        "x-amz-content-sha256", "x-amz-security-token"}
                kept = {k: v for k, v in headers.items() if k.lower() not in drop}
                req = AWSRequest(method=self.command,
                                 url=f"http://{self.headers['Host']}{self.path}",
                                 data=body, headers=kept)
                S3SigV4Auth(Credentials(*proxy.credentials), "s3",
                            proxy.region).add_auth(req)
                return dict(req.headers.items())

            def _forward(self) -> None:
                body = self._body()
                if proxy.conditional == "501" and self._conditional():
                    with proxy._lock:
                        proxy.counts["conditional"] += 1
                    return self._reply_error(501, "NotImplemented", "A header you provided "
                                             "implies functionality that is not implemented")
                fault = proxy._fault()
                if fault == "reset":
                    return self._reset()
                if fault == "500":
                    return self._reply_error(500, "InternalError", "injected fault")
                if fault == "503":
                    return self._reply_error(503, "SlowDown", "Please reduce your request rate.")
                if fault == "stall":
                    time.sleep(proxy.stall_seconds)
                with proxy._lock:
                    late, proxy.late = proxy.late > 0, max(proxy.late - 1, 0)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection")}
                headers["Content-Length"] = str(len(body))
                status, reply_headers, data, length = self._send(headers, body)
                if late:
                    time.sleep(proxy.stall_seconds)
                if status == 412 and proxy.conditional == "ignore" and self._conditional():
                    with proxy._lock:
                        proxy.counts["conditional"] += 1
                    status, reply_headers, data, length = self._send(
                        self._unconditional(headers, body), body)
                self.send_response(status)
                for key, value in reply_headers:
                    if key.lower() not in ("transfer-encoding", "connection", "content-length",
                                           "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", (length if self.command == "HEAD" else None)
                                 or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
