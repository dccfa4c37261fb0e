"""Serving a peer's channel: each frame is answered as the same HTTP request would be.

The listener (``listener.py``) hands over a connection that opened with the channel's
preface.  Data and peer-message frames go to ``api.py``'s ``direct`` (the HTTP handlers' own
parsing and answer builders, minus Starlette's routing and middleware); every other frame runs
through our own ASGI app.  Either way the routes, validation, limits, error bodies, metrics and
request ids are those of HTTP; HTTP parsing and a connection per call are saved.  The secret
is checked once, in the hello; frames on an authenticated channel then count as carrying it
(a frame's own ``X-KV-Secret`` header is dropped, never trusted).  Frames are served
concurrently, at most ``channel_max_in_flight`` being served or with an answer not yet
written: past that the channel is not read, which pushes back on the peer through TCP.  A
message over ``max_message`` bytes, a malformed one, silence past ``idle_timeout`` or a send
stuck that long closes the channel; the node goes on.  A stopping node says which frames it
read (a goaway), answers them, and closes gracefully.
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
    RECEIVE_BYTES,
    FrameError,
    MessageReader,
    decode_request,
    encode_answer,
    goaway,
    message,
    unpack,
)
from .outbox import Outbox, try_send
from .transport import SECRET_HEADER

log = logging.getLogger("trio_kv.channel")

_JSON = "application/json"
_SECRET = SECRET_HEADER.encode()


Direct = Callable[[str, str, dict[str, str], bytes, str], Awaitable[tuple[int, bytes] | None]]
ChannelServer = Callable[[trio.SocketStream, bytes, Any], Awaitable[None]]

def channel_server(
    app: Callable[[], ASGIApp], direct: Direct, secret: bytes, max_in_flight: int,
    max_head: int, max_message: int, idle_timeout: float, read_timeout: float,
    send_linger: float,
) -> ChannelServer:
    """``direct`` serves the hot routes (data, peer messages) without the ASGI stack; every
    other frame runs through ``app``.  ``read_timeout`` bounds the hello and the wait for the
    peer to close after our last answer; ``idle_timeout`` a silent channel and one send;
    ``send_linger`` how long answers may wait for this node to go idle (``outbox.py``)."""

    async def serve_channel(stream: trio.SocketStream, rest: bytes, terminated: Any) -> None:
        reader = MessageReader(stream, rest)
        hello = None
        async with trio.open_nursery() as waiting:  # the node stopping ends the wait
            waiting.start_soon(_cancel_on, terminated, waiting.cancel_scope)
            try:
                with trio.fail_after(read_timeout):
                    got = await reader.receive(MAX_HELLO)
                hello = orjson.loads(got[0]) if got else None
            except (FrameError, orjson.JSONDecodeError, trio.TooSlowError,
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            waiting.cancel_scope.cancel()
        try:
            given = hello.get("secret") if isinstance(hello, dict) else None
            if not isinstance(given, str):
                await stream.send_all(message({"status": 400, "error": "malformed hello"}))
            elif secret and not hmac.compare_digest(given.encode(), secret):
                await stream.send_all(message(
                    {"status": 401, "error": "internal endpoint: cluster secret missing or wrong"}))
            elif terminated.is_set():
                await stream.send_all(message({"status": 503, "error": "this node is stopping"}))
            else:
                await stream.send_all(message({"status": 200}))
                channel = _Channel(stream, reader, trio.Semaphore(max_in_flight), send_linger)
                if await channel.serve(app, direct, secret, terminated, max_head, max_message,
                                       idle_timeout):
                    await _close_gracefully(stream, read_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError,
                OSError):
            pass  # the peer went away
        finally:
            stream.socket.close()

    return serve_channel


async def _cancel_on(event: Any, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _close_gracefully(stream: trio.SocketStream, timeout: float) -> None:
    """Close gracefully: our FIN after the last answer, then read until the peer's (closing
    with unread bytes would be a reset, which can overtake answers still in flight)."""
    await stream.send_eof()
    with trio.move_on_after(timeout):
        while await stream.receive_some(RECEIVE_BYTES):
            pass


class _Channel:
    """One incoming channel: a reader that spawns a task per frame, at most ``limit`` frames
    whose answers are not yet written, and one writer."""

    def __init__(self, stream: trio.SocketStream, reader: MessageReader,
                 limit: trio.Semaphore, send_linger: float) -> None:
        self.stream, self.reader, self.limit = stream, reader, limit
        self.send_linger = send_linger
        self.reading = trio.CancelScope()
        self.frames_read = 0
        self.waiting_since: float | None = None  # when we began waiting for a message
        self.peer_gone = False
        self.goaway = b""

    def _sent(self, frames: list[bytes]) -> bool:
        woke = self.limit.statistics().tasks_waiting > 0  # the reader, waiting for a slot
        for frame in frames:
            if frame is not self.goaway:  # the goaway holds no slot
                self.limit.release()
        return woke

    async def serve(
        self, app: Callable[[], ASGIApp], direct: Direct, secret: bytes, terminated: Any,
        max_head: int, max_message: int, idle_timeout: float,
    ) -> bool:
        """Serve until the peer closes, misbehaves or goes silent, or the node stops; True if
        the peer may still be reading (then close gracefully)."""
        peer, here = self.stream.socket.getpeername(), self.stream.socket.getsockname()
        base = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "scheme": "http", "root_path": "",
            "client": tuple(peer[:2]), "server": tuple(here[:2]),
        }
        trusted = [(_SECRET, secret)] if secret else []

        async def send(data: bytes) -> None:
            with trio.fail_after(idle_timeout):  # a peer that reads nothing loses the channel
                await self.stream.send_all(data)

        outbox = Outbox(send, self._sent, try_send(self.stream), self.send_linger)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, outbox)
            nursery.start_soon(self._stop_reading_on, terminated)
            nursery.start_soon(self._stop_reading_when_silent, idle_timeout)
            async with trio.open_nursery() as serving:
                with self.reading:
                    try:
                        while True:
                            self.waiting_since = trio.current_time()
                            got = await self.reader.receive(max_message)
                            self.waiting_since = None
                            if got is None:
                                break
                            for frame in unpack(got[0]):
                                try:
                                    self.limit.acquire_nowait()  # no yield per frame
                                except trio.WouldBlock:
                                    await self.limit.acquire()
                                self.frames_read += 1
                                serving.start_soon(self._serve, app(), direct, base,
                                                   str(peer[0]), trusted, frame, outbox,
                                                   max_head)
                    except FrameError as exc:
                        log.warning("closing a peer channel: %s", exc)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass  # gone
                if terminated.is_set():  # counted now that reading stopped: exact
                    self.goaway = goaway(self.frames_read)
                    outbox.put(self.goaway)
                # Calls in flight run to their end, as HTTP requests do when their client
                # goes away (each is bounded by its own deadline), and are answered if the
                # peer still reads.
            outbox.finish()
            await outbox.finished.wait()  # each send is bounded by idle_timeout
            nursery.cancel_scope.cancel()
        return not self.peer_gone

    async def _write(self, outbox: Outbox) -> None:
        try:
            await outbox.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            self.peer_gone = True  # or it stopped reading: nobody reads the answers
            outbox.close()
            self.reading.cancel()

    async def _stop_reading_when_silent(self, idle_timeout: float) -> None:
        """A message not complete ``idle_timeout`` after we began waiting for it closes the
        channel (one watchdog: a timeout scope per message costs more than the message)."""
        while True:
            since = self.waiting_since
            if since is None:
                await trio.sleep(idle_timeout)
            elif trio.current_time() >= since + idle_timeout:  # the sleep's own deadline
                self.reading.cancel()
                return
            else:
                await trio.sleep_until(since + idle_timeout)

    async def _stop_reading_on(self, terminated: Any) -> None:
        await terminated.wait()
        self.reading.cancel()  # the node is stopping: no new calls on this channel

    async def _serve(
        self, app: ASGIApp, direct: Direct, base: dict[str, Any], client: str,
        trusted: list[tuple[bytes, bytes]], frame: bytes, outbox: Outbox, max_head: int,
    ) -> None:
        answered = False  # once queued, the answer's slot is freed when it is written
        try:
            try:
                fid, method, path, headers, body = decode_request(frame, max_head)
            except FrameError as exc:
                if exc.frame_id is None:
                    log.warning("closing a peer channel: %s", exc)
                    self.reading.cancel()  # an unanswerable call: its peer would wait in vain
                    return
                error = orjson.dumps({"error": f"malformed channel frame: {exc}"})
                outbox.put(encode_answer(exc.frame_id, 400, _JSON, error))
                answered = True
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
                status, content_type, answer = await _run(app, base, trusted, method, path,
                                                          headers, body)
            outbox.put(encode_answer(fid, status, content_type, answer))
            answered = True
        finally:
            if not answered:
                self.limit.release()


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
