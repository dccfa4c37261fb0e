"""Serving a peer's channel: each frame is answered as the same HTTP request would be.

The listener (``listener.py``) hands over a connection that opened with the channel's
preface.  Data and peer-message frames go to ``api.py``'s ``direct`` (the HTTP handlers' own
parsing and answer builders, minus Starlette's routing and middleware); every other frame runs
through our own ASGI app.  Either way the routes, validation, limits, error bodies, metrics and
request ids are those of HTTP; HTTP parsing and a connection per call are saved.  The secret
is checked once, in the hello; frames on an authenticated channel then count as carrying it
(a frame's own ``X-KV-Secret`` header is dropped, never trusted).  Frames are served
concurrently, at most ``channel_max_in_flight`` at once: past that the channel is not read,
which pushes back on the peer through TCP.  A message over ``max_message`` bytes, a malformed
one, or silence past ``idle_timeout`` closes the channel; the node goes on.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import orjson
import trio
from starlette.types import ASGIApp, Message

from .frames import (
    MAX_HELLO,
    FrameError,
    MessageReader,
    Outbox,
    decode_request,
    encode_answer,
    message,
    unpack,
)
from .transport import SECRET_HEADER

log = logging.getLogger("trio_kv.channel")

_JSON = "application/json"
_SECRET = SECRET_HEADER.encode()


Direct = Callable[[str, str, dict[str, str], bytes, str], Awaitable[tuple[int, bytes] | None]]
ChannelServer = Callable[[trio.SocketStream, bytes, Any], Awaitable[None]]


def channel_server(
    app: Callable[[], ASGIApp], direct: Direct, secret: bytes, max_in_flight: int,
    max_head: int, max_message: int, idle_timeout: float,
) -> ChannelServer:
    """``direct`` serves the hot routes (data, peer messages) without the ASGI stack; every
    other frame runs through ``app``."""

    async def serve_channel(stream: trio.SocketStream, rest: bytes, terminated: Any) -> None:
        reader = MessageReader(stream, rest)
        try:
            with trio.fail_after(idle_timeout):
                got = await reader.receive(MAX_HELLO)
            hello = orjson.loads(got[0]) if got else None
        except (FrameError, orjson.JSONDecodeError, trio.TooSlowError,
                trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            hello = None
        try:
            given = hello.get("secret") if isinstance(hello, dict) else None
            if not isinstance(given, str):
                await stream.send_all(message({"status": 400, "error": "malformed hello"}))
            elif secret and not hmac.compare_digest(given.encode(), secret):
                await stream.send_all(message(
                    {"status": 401, "error": "internal endpoint: cluster secret missing or wrong"}))
            else:
                await stream.send_all(message({"status": 200}))
                await _channel(stream, reader, terminated)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer went away
        finally:
            stream.socket.close()

    async def _channel(stream: trio.SocketStream, reader: MessageReader, terminated: Any) -> None:
        peer, here = stream.socket.getpeername(), stream.socket.getsockname()
        base = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "scheme": "http", "root_path": "",
            "client": tuple(peer[:2]), "server": tuple(here[:2]),
        }
        trusted = [(_SECRET, secret)] if secret else []
        limit = trio.Semaphore(max_in_flight)
        outbox = Outbox(stream.send_all)
        reading = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write, outbox, reading)
            nursery.start_soon(_stop_reading_on, terminated, reading)
            async with trio.open_nursery() as serving:
                with reading:
                    try:
                        while True:
                            with trio.fail_after(idle_timeout):
                                got = await reader.receive(max_message)
                            if got is None:
                                break
                            for frame in unpack(got[0]):
                                await limit.acquire()
                                serving.start_soon(_serve, app(), direct, base, str(peer[0]),
                                                   trusted, frame, outbox, limit, reading,
                                                   max_head)
                    except FrameError as exc:
                        log.warning("closing a peer channel: %s", exc)
                    except (trio.TooSlowError, trio.BrokenResourceError,
                            trio.ClosedResourceError, OSError):
                        pass  # silent past idle_timeout, or gone
                # Calls in flight run to their end, as HTTP requests do when their client
                # goes away (each is bounded by its own deadline), and are answered if the
                # peer still reads.
            outbox.finish()
            with trio.move_on_after(idle_timeout):
                await outbox.finished.wait()
            nursery.cancel_scope.cancel()

    return serve_channel


async def _write(outbox: Outbox, reading: trio.CancelScope) -> None:
    try:
        await outbox.run()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        outbox.close()  # the peer went away: nobody reads the answers
        reading.cancel()


async def _stop_reading_on(terminated: Any, reading: trio.CancelScope) -> None:
    await terminated.wait()
    reading.cancel()  # the node is shutting down: no new calls on this channel


async def _serve(
    app: ASGIApp, direct: Direct, base: dict[str, Any], client: str,
    trusted: list[tuple[bytes, bytes]], frame: bytes, outbox: Outbox, limit: trio.Semaphore,
    reading: trio.CancelScope, max_head: int,
) -> None:
    try:
        try:
            fid, method, path, headers, body = decode_request(frame, max_head)
        except FrameError as exc:
            if exc.frame_id is None:
                log.warning("closing a peer channel: %s", exc)
                reading.cancel()  # an unanswerable call: the peer would wait for it in vain
                return
            error = orjson.dumps({"error": f"malformed channel frame: {exc}"})
            outbox.put(encode_answer(exc.frame_id, 400, _JSON, error))
            return
        first: dict[str, str] = {}
        for name, value in headers:
            if name != SECRET_HEADER:
                first.setdefault(name, value)
        served = await direct(method, path, first, body, client)
        if served is not None:
            status, answer = served
            content_type = _JSON
        else:
            status, content_type, answer = await _run(app, base, trusted, method, path, headers,
                                                      body)
        outbox.put(encode_answer(fid, status, content_type, answer))
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
