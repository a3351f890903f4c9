"""A real local HTTP server that speaks the chat-completions protocol, scripted per request (tests, benchmarks).

`ChatServer(script)` listens on 127.0.0.1 (a free port) in a background thread; `script(body, n)` gets the
request body and the request's 1-based number and returns a `Reply`: the answer text (200 with a
chat-completions JSON), an HTTP error, raw bytes (a malformed answer) and a delay before answering.
`max_parallel` bounds how many requests it works on at once (a server's capacity); the others queue.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What the server answers: `text` (200), else `status` with `raw` bytes; after `delay` seconds."""

    text: str | None = None
    status: int = 200
    raw: bytes | None = None
    delay: float = 0.0
    headers: dict[str, str] | None = None


Script = Callable[[dict[str, Any], int], Reply]


def completion(text: str, model: str = "scripted") -> bytes:
    """The JSON body of a chat-completions answer holding `text`."""
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
        }
    ).encode()


class ChatServer:
    """The scripted server; use as a context manager. `base_url` is http://127.0.0.1:<port>/v1."""

    def __init__(self, script: Script, max_parallel: int | None = None) -> None:
        self.script, self.count, self.bodies = script, 0, []
        self.in_flight, self.peak = 0, 0
        self._lock = threading.Lock()
        self._capacity = threading.Semaphore(max_parallel) if max_parallel else None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": "no such route"}')
                    return
                if server._capacity is not None:
                    server._capacity.acquire()
                try:
                    with server._lock:
                        server.count += 1
                        n = server.count
                        server.bodies.append(body)
                        server.in_flight += 1
                        server.peak = max(server.peak, server.in_flight)
                    reply = server.script(body, n)
                    if reply.delay:
                        time.sleep(reply.delay)
                    with server._lock:
                        server.in_flight -= 1
                finally:
                    if server._capacity is not None:
                        server._capacity.release()
                payload = reply.raw if reply.raw is not None else completion(reply.text or "")
                self._send(reply.status, payload, reply.headers)

            def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the listen backlog: many clients connect at once

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)
