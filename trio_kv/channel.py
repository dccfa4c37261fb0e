"""Peer calls over one persistent connection per peer, on the peer's own port.

A forwarded request over HTTP cost a full hypercorn request at the owner plus an httpx call
here, three times a local request.  A channel carries many calls at once on one connection
(frames in ``frames.py``, matched by id, answered in any order), and the owner serves each
frame as it would the same HTTP request (``channel_server.py``), minus HTTP parsing.  The
connection opens with a preface the owner's listener tells from HTTP (``listener.py``), so the
view keeps one address per node.

Bounds: every call sits in a cancel scope of its timeout, connecting and the handshake in
``connect_timeout``, calls in flight in a capacity limiter, answers in ``max_answer_bytes``.
A call whose frame provably never left (connect or handshake failed, the connection closed
before our frame was handed to the socket, or a reset found the kernel never sent it) is
``not_sent``; otherwise it may have been applied.  A call that timed out on a connection that
has received nothing since the call was sent takes the connection down with it (a partition):
the next call reconnects.  Sooner than that, a watcher resets a connection with calls in
flight once its kernel has been resending for ``stall_timeout`` (and three base
retransmission timeouts) with no acknowledgement at all (Linux's ``TCP_INFO``, ``tcpinfo.py``):
the network is dropping what we send, as even a busy peer's kernel acknowledges what arrives.
The reset makes the kernel drop what it still holds, so nothing stale arrives after a heal.
Without the watcher a partition held calls for their whole timeout, and after a heal the
bytes waited for TCP's next backed-off resend, seconds later.

A peer that does not serve the channel (it answers the preface with HTTP: an older version) is
called over HTTP instead, so clusters can upgrade one node at a time.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections import deque

import orjson
import trio

from .frames import (
    GOAWAY_ID,
    HEAD,
    MAX_HELLO,
    PREFACE,
    FrameError,
    MessageReader,
    decode_answer,
    encode_request,
    message,
    peek_id,
    unpack,
)
from .observe import REQUEST_ID, REQUEST_ID_HEADER
from .outbox import Outbox, try_send
from .tcpinfo import tcp_info, tcp_info_usable, tcp_stall, tcp_unsent
from .transport import (
    PeerCaller,
    PeerClient,
    PeerResponse,
    PeerUnavailable,
    route_of,
)

log = logging.getLogger("trio_kv.channel")

MAX_ANSWER_HEAD = 4096
MARKS = 1024  # recent messages whose start a link remembers (older calls: maybe sent)
HTTP_ONLY_FOR = 60.0  # seconds a peer without the channel is called over HTTP before we re-ask


class _NotSent(Exception):
    """The connection closed before our frame was written: safe to send it elsewhere."""


class _Pending:
    __slots__ = ("done", "error", "not_sent", "response", "status")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: PeerResponse | None = None
        self.error = ""
        self.status: int | None = None
        self.not_sent = False

    def fail(self, why: str, status: int | None = None, not_sent: bool = False) -> None:
        self.error, self.status, self.not_sent = why, status, not_sent
        self.done.set()


class _Link:
    """One open channel to one peer, shared by every call to it."""

    def __init__(self, address: str, stream: trio.SocketStream, reader: MessageReader,
                 linger: float, offset: int = 0) -> None:
        self.address = address
        self.stream = stream
        self.reader = reader
        self.pending: dict[int, _Pending] = {}
        # What went to the socket, so a reset can tell which calls' frames never left: the
        # frames handed out so far (ids 1 to ``handed``), the stream offset after them
        # (``offset``: the handshake's bytes first), and where each recent message began.
        self.handed = 0
        self.offset = offset
        self._marks: deque[tuple[int, int]] = deque(maxlen=MARKS)  # (first frame id, offset)
        self.busy = trio.Event()  # set when a call is made: the stall watcher looks again
        self.closed = False
        self.going_away = False  # the peer is stopping: it reads no more frames
        self.used_at = trio.current_time()
        self._next_id = 1  # the n-th frame on the connection has id n
        self.outbox = Outbox(self.send, try_send=try_send(stream), linger=linger,
                             starting=self._starting)

    def _starting(self, frames: int, size: int) -> None:
        self._marks.append((self.handed + 1, self.offset))
        self.handed += frames
        self.offset += size

    def never_left(self, fid: int, left: int) -> bool:
        """Whether frame ``fid`` provably never left this host, given that at most ``left``
        bytes of the stream did: not yet handed to the socket, or in a message that begins
        at or after ``left``.  False when unsure (its message is older than the marks kept)."""
        if fid > self.handed:
            return True
        for first, start in reversed(self._marks):
            if first <= fid:
                return start >= left
        return False

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise _NotSent
        try:
            await self.stream.send_all(data)
        except BaseException:
            self.abort("sending failed")  # a partly written message leaves the stream unusable
            raise

    async def call(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> PeerResponse:
        if self.closed or self.going_away:
            raise _NotSent
        # The n-th frame queued has id n (a goaway and a reset count on it): an id is taken
        # only once its frame is made.
        frame = encode_request(self._next_id, method, path, headers, body)
        fid, self._next_id = self._next_id, self._next_id + 1
        pending = self.pending[fid] = _Pending()
        self.busy.set()
        self.used_at = trio.current_time()
        try:
            self.outbox.put(frame)
            await pending.done.wait()
        finally:
            self.pending.pop(fid, None)
        if pending.response is None:
            raise PeerUnavailable(self.address, pending.error, pending.not_sent,
                                  status=pending.status)
        self.used_at = trio.current_time()
        return pending.response

    def deliver(self, frame: bytes) -> None:
        try:
            fid, status, content_type, body = decode_answer(frame, MAX_ANSWER_HEAD)
        except FrameError as exc:
            self.abort(f"malformed answer frame: {exc}")
            return
        if fid == GOAWAY_ID and content_type == "goaway":
            return self._going_away(body)
        pending = self.pending.get(fid)
        if pending is not None:  # else: an answer to a call that timed out meanwhile
            pending.response = PeerResponse(status, body, content_type)
            pending.done.set()

    def _going_away(self, body: bytes) -> None:
        """The peer stops reading: frames after the first ``frames_read`` were never served."""
        try:
            served = orjson.loads(body)["frames_read"]
            if type(served) is not int:
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            self.abort(f"malformed goaway: {exc!r}")
            return
        self.going_away = True
        for fid, pending in self.pending.items():
            if fid > served and not pending.done.is_set():
                pending.fail("the peer is stopping; this call was not served", 503,
                             not_sent=True)

    def refuse(self, fid: int | None, why: str, status: int) -> None:
        if fid is None:
            self.abort(why)
        elif (pending := self.pending.get(fid)) is not None:
            pending.fail(why, status)  # else: the call timed out meanwhile

    async def write(self) -> None:
        """The writer task: sends what the idle flush left (a partly written message, or
        frames queued while it sent) until the connection closes."""
        try:
            await self.outbox.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, _NotSent, OSError) as exc:
            self.abort(f"sending failed: {exc!r}")
        except Exception:
            log.exception("channel to %s: writer failed", self.address)
            self.abort("writer failed")

    def abort(self, why: str, reset: bool = False) -> None:
        """Close the connection now; every call waiting on it fails: as not sent if its
        frame was never handed to the socket (it never will be), else maybe applied.  With
        ``reset`` (the network drops what we send) the kernel discards what it still holds
        and answers with a reset, rather than resend it for minutes and deliver it after a
        heal; then a call whose frame the kernel never sent fails as not sent too, so a
        forwarded write can go to another replica.  A frame sent into a network that drops
        it stays maybe applied."""
        self.outbox.close()
        left: int | None = None  # at most this much of the stream ever left this host
        if not self.closed:
            self.closed = True
            sock = self.stream.socket
            if reset:
                info = tcp_info(sock)  # read last: nothing can go out after the close below
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    if tcp_stall(info) is not None:  # still nothing acknowledged: none sent
                        left = self.offset - tcp_unsent(info)
            sock.close()  # wakes the reader
            self.busy.set()  # and the stall watcher
            log.debug("channel to %s closed: %s", self.address, why)
        for fid, pending in self.pending.items():
            if not pending.done.is_set():
                unsent = fid > self.handed or (left is not None and self.never_left(fid, left))
                pending.fail(f"channel closed: {why}", not_sent=unsent)

    def idle_for(self, now: float) -> float:
        return 0.0 if self.pending else now - self.used_at


class ChannelClient(PeerCaller):
    """Peer calls over channels; same interface and bounds as the HTTP ``PeerClient``."""

    def __init__(
        self,
        concurrency: int,
        connect_timeout: float,
        keepalive_expiry: float,
        secret: str = "",
        max_answer_bytes: int = 16 << 20,
        fallback: PeerClient | None = None,
        linger: float = 0.005,
        stall_timeout: float = 2.0,
    ) -> None:
        super().__init__(concurrency)
        self._linger = linger
        self._stall_timeout = stall_timeout
        self._connect_timeout = connect_timeout
        self._expiry = keepalive_expiry
        self._secret = secret
        self._max_answer = max_answer_bytes
        self._fallback = fallback
        self._links: dict[str, _Link] = {}
        self._connecting: dict[str, trio.Lock] = {}
        self._http_only: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Connections' readers run in the node's nursery (one per open channel)."""
        self._nursery = nursery

    async def aclose(self) -> None:
        for link in self._links.values():
            link.abort("shutting down")
        self._links.clear()
        if self._fallback is not None:
            await self._fallback.aclose()

    async def request(
        self,
        address: str,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float,
    ) -> PeerResponse:
        until = self._http_only.get(address)
        if until is not None and self._fallback is not None:
            if trio.current_time() < until:
                return await self._fallback.request(
                    address, method, path, content=content, headers=headers, timeout=timeout)
            del self._http_only[address]
        hdrs = dict(headers or {})
        if (request_id := REQUEST_ID.get()) is not None:
            hdrs[REQUEST_ID_HEADER] = request_id
        if content is not None:
            hdrs.setdefault("content-type", "application/json")
        body = content or b""
        stats, route = self.stats, route_of(path)
        stats.add(stats.calls, route)
        stats.add(stats.bytes_sent, route, len(body))
        try:
            resp = await self._request(address, method, path, hdrs, body, timeout)
        except _UseHttp:
            assert self._fallback is not None
            return await self._fallback.request(
                address, method, path, content=content, headers=headers, timeout=timeout)
        except PeerUnavailable:
            stats.add(stats.failures, route)
            raise
        stats.add(stats.bytes_received, route, len(resp.body))
        return resp

    async def _request(
        self, address: str, method: str, path: str, headers: dict[str, str], body: bytes,
        timeout: float,
    ) -> PeerResponse:
        if len(body) > self._max_answer:
            raise PeerUnavailable(address, f"request larger than {self._max_answer} bytes "
                                  "(max_peer_message_bytes)", not_sent=True, status=413)
        borrower = object()
        link, sent_at = None, 0.0
        with trio.move_on_after(timeout):
            try:
                self.limiter.acquire_on_behalf_of_nowait(borrower)  # no yield per call
            except trio.WouldBlock:
                await self.limiter.acquire_on_behalf_of(borrower)
            try:
                await trio.lowlevel.checkpoint_if_cancelled()  # out of time: send nothing
                for attempt in (1, 2):
                    link = await self._link(address)
                    sent_at = trio.current_time()
                    try:
                        return await link.call(method, path, headers, body)
                    except _NotSent:
                        if attempt == 2:
                            raise PeerUnavailable(address, "channel closed before sending",
                                                  not_sent=True) from None
            finally:
                self.limiter.release_on_behalf_of(borrower)
        # Our own timeout (a caller that cancels, e.g. its client went away, says nothing
        # about the connection): nothing at all came back since the call went out.
        if link is not None and not link.closed and link.reader.received_at <= sent_at:
            link.abort("a call timed out with nothing received since it was sent")
        raise PeerUnavailable(address, f"no answer within {timeout:.1f}s")

    async def _link(self, address: str) -> _Link:
        link = self._links.get(address)
        if link is not None and not link.closed and not link.going_away:
            if link.idle_for(trio.current_time()) < self._expiry:
                return link
            link.abort("idle")  # before the peer's read timeout closes it under a call
        lock = self._connecting.setdefault(address, trio.Lock())
        async with lock:
            link = self._links.get(address)
            if link is not None and not link.closed and not link.going_away:
                return link
            if self._nursery is None:
                raise PeerUnavailable(address, "this node is not running", not_sent=True)
            link = await self._connect(address)
            try:
                self._nursery.start_soon(self._read, link)
                self._nursery.start_soon(link.write)
                if self._stall_timeout > 0 and tcp_info_usable(link.stream.socket):
                    self._nursery.start_soon(self._watch, link)
            except RuntimeError:  # the node's nursery is closing: we are stopping
                link.abort("this node is stopping")
                raise PeerUnavailable(address, "this node is stopping", not_sent=True) from None
            self._links[address] = link
            return link

    async def _connect(self, address: str) -> _Link:
        host, _, port = address.rpartition(":")
        with trio.move_on_after(self._connect_timeout):
            try:
                stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
            except OSError as exc:
                raise PeerUnavailable(address, f"connect failed: {exc!r}", True) from exc
            try:
                return await self._handshake(address, stream)
            except BaseException:
                stream.socket.close()
                raise
        raise PeerUnavailable(address, f"no channel within {self._connect_timeout:g}s", True)

    async def _handshake(self, address: str, stream: trio.SocketStream) -> _Link:
        try:
            hello = PREFACE + message({"secret": self._secret})
            await stream.send_all(hello)
            first = b""
            while len(first) < len(b"HTTP/"):  # enough to tell a welcome from HTTP
                data = await stream.receive_some(MAX_HELLO)
                if not data:
                    break
                first += data
            if first.startswith(b"HTTP/") and self._fallback is not None:
                # an older node: its HTTP server took the preface for a bad request
                self._http_only[address] = trio.current_time() + HTTP_ONLY_FOR
                raise _UseHttp
            reader = MessageReader(stream, first)
            got = await reader.receive(MAX_HELLO)
            welcome = orjson.loads(got[0]) if got else None
        except (trio.BrokenResourceError, OSError, FrameError, orjson.JSONDecodeError) as exc:
            raise PeerUnavailable(address, f"channel handshake failed: {exc!r}", True) from exc
        if not isinstance(welcome, dict):
            raise PeerUnavailable(address, "channel handshake failed: no welcome", True)
        status = welcome.get("status")
        if status == 200:
            return _Link(address, stream, reader, self._linger, len(hello))
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise PeerUnavailable(address, "channel handshake failed: no welcome", True)
        raise PeerUnavailable(address, f"channel refused ({status}): {welcome.get('error')}",
                              True, status=status)

    async def _watch(self, link: _Link) -> None:
        """While calls are in flight, four times per ``stall_timeout``: take the connection
        down once the kernel has resent for that long (or three base retransmission timeouts,
        on a slow path) with no acknowledgement (the module's docstring).  Never raises into
        the node."""
        since: float | None = None  # the first look that found the kernel resending
        try:
            while not link.closed:
                if not link.pending:
                    since = None
                    link.busy = trio.Event()
                    await link.busy.wait()
                    continue
                await trio.sleep(self._stall_timeout / 4)
                info = b"" if link.closed else tcp_info(link.stream.socket)
                stall = tcp_stall(info)
                if stall is None:
                    since = None
                    continue
                quiet, rto = stall
                now = trio.current_time()
                since = now if since is None else since
                if min(now - since, quiet) >= max(self._stall_timeout, 3 * rto):
                    link.abort(f"no acknowledgement for {quiet:.1f}s while resending: the "
                               "network is dropping what we send", reset=True)
        except Exception:
            log.exception("channel to %s: stall watcher failed", link.address)

    async def _read(self, link: _Link) -> None:
        """Deliver answers until the connection ends; never raises into the node."""
        limit = self._max_answer + MAX_ANSWER_HEAD
        why = "the peer closed the channel"
        try:
            while not link.closed:
                got = await link.reader.receive(limit, keep=2 * HEAD.size + MAX_ANSWER_HEAD)
                if got is None:
                    break
                data, size = got
                if size > limit:  # only a lone answer can be (batches are capped)
                    link.refuse(peek_id(data[HEAD.size :], MAX_ANSWER_HEAD),
                                f"answer larger than {self._max_answer} bytes", 413)
                    continue
                for frame in unpack(data):
                    link.deliver(frame)
        except FrameError as exc:
            why = f"malformed message: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError, _NotSent, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        except Exception:
            log.exception("channel to %s: reader failed", link.address)
            why = "reader failed"
        finally:
            link.abort(why)
            if self._links.get(link.address) is link:
                del self._links[link.address]


class _UseHttp(Exception):
    """The peer does not serve the channel: call it over HTTP."""
