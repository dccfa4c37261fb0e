"""One plain ASGI middleware for what every request needs observed: its request id, its count
and latency for ``/metrics``, and (optionally) an access-log line.

Plain ASGI, not Starlette's ``BaseHTTPMiddleware`` (which runs the app in another task and
copies bodies).  Per request it costs a header scan, two clock reads, a dict increment and a
bisect; the figures are turned into Prometheus text only when ``/metrics`` is scraped.

The request id comes from the client's ``X-Request-Id`` (validated: visible ASCII, bounded)
or is minted here; it is put in a context variable that log records and forwarded peer
calls read, so one id follows a request through every node it touches, and it is echoed in
the response.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from .stats import Histogram

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "trio_kv_request_id", default=None
)
_VALID_ID = re.compile(rb"[\x21-\x7e]+")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
ROUTES = frozenset({"/data", "/ping", "/view", "/metrics", "/openapi.json", "/internal/sync",
                    "/internal/handoff", "/internal/pull", "/internal/stable"})
METHODS = frozenset({"GET", "PUT", "POST", "DELETE", "HEAD"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("trio_kv.access")


def route_of(path: str) -> str:
    """A bounded label: the route template, never the key."""
    if path.startswith("/data/"):
        return "/data/{key}"
    return path if path in ROUTES else "other"


class RequestStats:
    """Requests by (route, method, status) and latency by (route, method)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.in_flight = 0

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        hist = self.latency.get((route, method))
        if hist is None:
            hist = self.latency[(route, method)] = Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)


class Observer:
    """Request ids, counts and latency, access log: shared by the ASGI middleware and the peer
    channel's direct path (``channel_server.py``), so both count and log alike."""

    def __init__(self, stats: RequestStats, max_id_bytes: int = 128, access: bool = False) -> None:
        self.stats = stats
        self.max_id_bytes = max_id_bytes
        self.access = access
        self._prefix = os.urandom(4).hex()
        self._ids = itertools.count(1)

    def request_id(self, rid: bytes | None) -> str | None:
        """The id this request goes by (the caller's, or minted); None if the caller's is bad."""
        if rid is None:
            return f"{self._prefix}-{next(self._ids):x}"
        if len(rid) > self.max_id_bytes or not _VALID_ID.fullmatch(rid):
            return None
        return rid.decode()

    @property
    def bad_id(self) -> str:
        return f"X-Request-Id must be 1 to {self.max_id_bytes} visible ASCII characters"

    def done(self, method: str, path: str, status: int, started: float,
             request_id: str | None) -> None:
        seconds = time.perf_counter() - started
        self.stats.record(route_of(path), method if method in METHODS else "other", status,
                          seconds)
        if self.access and request_id is not None:
            access_log.info(  # the path escaped: a key may hold a newline
                "%s %s %d %.4fs", method, repr(path)[1:-1], status, seconds,
                extra={"request_id": request_id, "method": method, "path": path,
                       "status": status, "seconds": round(seconds, 6)},
            )


class ObserveMiddleware:
    def __init__(self, app: ASGIApp, observer: Observer) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value
                break
        observer, method, path = self.observer, scope["method"], scope["path"]
        request_id = observer.request_id(rid)
        if request_id is None:
            await _send_error(send, 400, observer.bad_id)
            observer.done(method, path, 400, started, None)
            return
        header = (b"x-request-id", request_id.encode())
        status = 500

        async def send_wrapped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = REQUEST_ID.set(request_id)
        observer.stats.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            observer.stats.in_flight -= 1
            REQUEST_ID.reset(token)
            observer.done(method, path, status, started, request_id)


async def _send_error(send: Send, status: int, message: str) -> None:
    body = orjson.dumps({"error": message})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
