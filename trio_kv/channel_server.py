"""Serving a peer's channel: each frame is answered as the same HTTP request would be.

Data and peer-message frames go to ``api.py``'s ``direct`` (the HTTP handlers' own parsing and
answer builders, minus Starlette's routing and middleware); every other frame runs through our
own ASGI app.  Either way the routes, validation, limits, error bodies, metrics and request ids
are those of HTTP; hypercorn's HTTP parsing and a connection per call are saved.  The secret
is checked once, at the WebSocket handshake; frames on an authenticated channel then count as
carrying it (a frame's own ``X-KV-Secret`` header is dropped, never trusted).  Frames are
served concurrently, at most ``channel_max_in_flight`` at once: past that the channel is not
read, which pushes back on the peer through TCP.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import orjson
import trio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Scope
from starlette.websockets import WebSocket, WebSocketDisconnect

from .frames import FrameError, Outbox, decode_request, encode_answer, unpack
from .transport import SECRET_HEADER

log = logging.getLogger("trio_kv.channel")

_JSON = "application/json"
_SECRET = SECRET_HEADER.encode()


Direct = Callable[[str, str, dict[str, str], bytes, str], Awaitable[tuple[int, bytes] | None]]


def channel_endpoint(
    app: Callable[[], ASGIApp], direct: Direct, secret: bytes, max_in_flight: int,
    max_head: int,
) -> Callable[[WebSocket], Any]:
    """``direct`` serves the hot routes (data, peer messages) without the ASGI stack; every
    other frame runs through ``app``."""
    async def endpoint(ws: WebSocket) -> None:
        given = ws.headers.get(SECRET_HEADER, "").encode("latin-1")
        if secret and not hmac.compare_digest(given, secret):
            await ws.send_denial_response(JSONResponse(
                {"error": "internal endpoint: cluster secret missing or wrong"}, status_code=401))
            return
        await ws.accept()
        base = _base_scope(ws.scope)
        trusted = [(_SECRET, secret)] if secret else []
        limit = trio.Semaphore(max_in_flight)
        outbox = Outbox(ws.send_bytes)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write, outbox)
            while True:
                message = await ws.receive()
                if message["type"] != "websocket.receive":
                    break  # the peer went away
                data = message.get("bytes")
                if data is None:
                    await ws.close(code=1003, reason="the channel carries binary frames only")
                    break
                try:
                    frames = unpack(data)
                except FrameError as exc:
                    log.warning("closing a peer channel: %s", exc)
                    await ws.close(code=1002, reason="malformed message")
                    break
                for frame in frames:
                    await limit.acquire()
                    nursery.start_soon(_serve, app(), direct, base, trusted, frame, outbox,
                                       ws, limit, max_head)
            # Calls in flight run to their end, as HTTP requests do when their client goes
            # away (each is bounded by its own deadline); their answers are dropped.
            outbox.close()

    return endpoint


async def _write(outbox: Outbox) -> None:
    try:
        await outbox.run()
    except (WebSocketDisconnect, RuntimeError):
        outbox.close()  # the peer went away: nobody reads the answers


def _base_scope(ws_scope: Scope) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "scheme": "http", "root_path": ws_scope.get("root_path", ""),
        "client": ws_scope.get("client"), "server": ws_scope.get("server"),
    }


async def _serve(
    app: ASGIApp, direct: Direct, base: dict[str, Any], trusted: list[tuple[bytes, bytes]],
    frame: bytes, outbox: Outbox, ws: WebSocket, limit: trio.Semaphore, max_head: int,
) -> None:
    try:
        try:
            fid, method, path, headers, body = decode_request(frame, max_head)
        except FrameError as exc:
            if exc.frame_id is None:
                log.warning("closing a peer channel: %s", exc)
                await ws.close(code=1002, reason="malformed frame")
                return
            error = orjson.dumps({"error": f"malformed channel frame: {exc}"})
            outbox.put(encode_answer(exc.frame_id, 400, _JSON, error))
            return
        first: dict[str, str] = {}
        for name, value in headers:
            if name != SECRET_HEADER:
                first.setdefault(name, value)
        client = base.get("client")
        served = await direct(method, path, first, body, client[0] if client else "?")
        if served is not None:
            status, answer = served
            content_type = _JSON
        else:
            status, content_type, answer = await _run(app, base, trusted, method, path, headers,
                                                      body)
        outbox.put(encode_answer(fid, status, content_type, answer))
    except (WebSocketDisconnect, RuntimeError):
        pass  # closed while we answered (starlette raises RuntimeError after a close)
    finally:
        limit.release()


async def _run(
    app: ASGIApp, base: dict[str, Any], trusted: list[tuple[bytes, bytes]], method: str,
    path: str, headers: list[tuple[str, str]], body: bytes,
) -> tuple[int, str, bytes]:
    """One request through the app, as hypercorn would hand it over."""
    raw_path, _, query = path.encode().partition(b"?")
    raw_headers = [
        (name.encode(), value.encode()) for name, value in headers
        if name not in (SECRET_HEADER, "content-length")
    ]
    raw_headers += trusted
    raw_headers.append((b"content-length", str(len(body)).encode()))
    scope = {
        **base, "method": method, "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path, "query_string": query, "headers": raw_headers, "state": {},
    }
    answered = trio.Event()
    body_sent = False
    status = 500
    content_type = ""
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, content_type
        if message["type"] == "http.response.start":
            status = message["status"]
            for name, value in message.get("headers", ()):
                if name == b"content-type":
                    content_type = value.decode("latin-1")
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    try:
        await app(scope, receive, send)
    except Exception:
        # Starlette answers 500 to an unhandled error (our handler logs it), then re-raises
        # it for the server: here the answer is what matters, and the channel goes on.
        if not answered.is_set():
            log.exception("unanswered error on %s %s (peer channel)", method, path)
            return 500, _JSON, orjson.dumps({"error": "internal error; see the node's log"})
    return status, content_type, b"".join(chunks)
