"""A small HTTP proxy on loopback in front of the inference service: it answers the first N chat-completions
requests itself with 429 and a Retry-After header (an overloaded gateway), 404 for the paths it hides (a service
without them, as NIM has no /tokenize), forwards everything else (a chat request's JSON body changed by `rewrite`
first, as a gateway that drops or replaces fields does), and records when each request arrived and what it got."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Seen:
    at: float  # time.monotonic() when the request arrived
    path: str
    status: int


class RateLimitingProxy:
    def __init__(self, upstream: str, refuse_first: int = 0, retry_after: int = 1, hide: tuple[str, ...] = (),
                 rewrite: Callable[[dict], dict] | None = None) -> None:
        self.upstream, self.refuse_first, self.retry_after, self.hide = upstream, refuse_first, retry_after, hide
        self.rewrite = rewrite
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                arrived = time.monotonic()
                with proxy._lock:
                    refuse = self.path == CHAT and sum(s.path == CHAT for s in proxy.seen) < proxy.refuse_first
                    if refuse:
                        proxy.seen.append(Seen(arrived, self.path, 429))
                if refuse:
                    self._reply(429, b'{"error": {"message": "slow down"}}', {"Retry-After": str(proxy.retry_after)})
                    return
                if self.path in proxy.hide:
                    with proxy._lock:
                        proxy.seen.append(Seen(arrived, self.path, 404))
                    self._reply(404, b'{"detail": "Not Found"}', {})
                    return
                headers = {name: value for name, value in self.headers.items()
                           if name.lower() in ("authorization", "content-type")}
                if self.path == CHAT and proxy.rewrite is not None:
                    body = json.dumps(proxy.rewrite(json.loads(body))).encode()
                answer = httpx.post(proxy.upstream + self.path, content=body, headers=headers, timeout=600)
                with proxy._lock:
                    proxy.seen.append(Seen(arrived, self.path, answer.status_code))
                self._reply(answer.status_code, answer.content, {})

            def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> RateLimitingProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
