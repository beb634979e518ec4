"""A fault-injecting HTTP proxy for the local S3 endpoint (127.0.0.1 only).

It forwards every request to the real endpoint (moto's server) and, with the configured
probabilities, instead resets the connection, answers ``500 InternalError`` or
``503 SlowDown`` (the S3 XML error bodies), or stalls before forwarding; ``drop_headers``
makes it a store that ignores conditional writes. ``always`` makes every
request fail, to outlast any retry budget. Request loops are bounded by the client; the proxy
stops with :meth:`stop`.
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
                 slowdown: float = 0.0, stall: float = 0.0, stall_seconds: float = 2.0):
        up = urlparse(upstream)
        self.upstream = (up.hostname, up.port)
        self.rates = {"reset": reset, "500": error500, "503": slowdown, "stall": stall}
        self.stall_seconds = stall_seconds
        self.always: str | None = None  # "reset" | "500" | "503": every request fails
        #: request headers dropped before forwarding: {"if-none-match", "if-match"} makes the
        #: endpoint a store that ignores conditional writes (as some S3-compatible ones do)
        self.drop_headers: set[str] = set()
        self.counts = {"requests": 0, "reset": 0, "500": 0, "503": 0, "stall": 0}
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

            def _forward(self) -> None:
                body = self._body()
                fault = proxy._fault()
                if fault == "reset":
                    return self._reset()
                if fault == "500":
                    return self._reply_error(500, "InternalError", "injected fault")
                if fault == "503":
                    return self._reply_error(503, "SlowDown", "Please reduce your request rate.")
                if fault == "stall":
                    time.sleep(proxy.stall_seconds)
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection",
                                                *proxy.drop_headers)}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length",
                                           "server", "date"):
                        self.send_header(key, value)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
