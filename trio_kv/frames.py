"""The peer channel's frames: HTTP-shaped requests and answers, several per WebSocket message.

A message is a sequence of frames, each prefixed by its 4-byte big-endian length: calls that
queue while a message is being sent go out together in the next one, so under load one send
and one receive (and one wake-up on each side) carry many calls.  A frame is a 4-byte
big-endian head length, a JSON head, then the body as raw bytes (bodies are JSON already;
wrapping them in JSON again would cost a second encode per call).  Request head:
``[id, method, path, [[name, value], ...]]``; answer head: ``[id, status, content_type]``.
Frames come from the network: every field is checked here, before anything acts on it.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Awaitable, Callable

import orjson
import trio

HEAD = struct.Struct(">I")
MAX_FRAME_ID = (1 << 53) - 1
MAX_HEADERS = 32
MAX_FRAMES = 1024  # per message: bounds the work one message can ask for
BATCH_BYTES = 1 << 20  # frames joined into one message up to this (a larger frame goes alone)
METHODS = frozenset({"GET", "PUT", "POST", "DELETE"})


class FrameError(ValueError):
    """A frame that is not of the shape we send; ``frame_id`` is set when the id was readable
    (the request can then be answered 400 instead of closing the connection)."""

    def __init__(self, message: str, frame_id: int | None = None) -> None:
        super().__init__(message)
        self.frame_id = frame_id


def pack(frames: list[bytes]) -> bytes:
    return b"".join(HEAD.pack(len(frame)) + frame for frame in frames)


class Outbox:
    """Frames waiting to be sent, sent by one writer task (``run``): each time it wakes it
    sends everything queued as one message, so a lone call waits for nothing and under load
    calls share sends.  Callers never do the I/O, so a caller's timeout never interrupts a
    send that carries other calls' frames, and no caller is kept sending for others."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._send = send
        self._queue: deque[bytes] = deque()
        self._wake = trio.Event()
        self.closed = False

    def put(self, frame: bytes) -> None:
        self._queue.append(frame)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def run(self) -> None:
        """Send until closed; a failed send raises (the connection's owner closes it)."""
        queue = self._queue
        while not self.closed:
            await self._wake.wait()
            self._wake = trio.Event()
            while queue and not self.closed:
                frames = [queue.popleft()]
                size = len(frames[0])
                while queue and size + len(queue[0]) <= BATCH_BYTES and len(frames) < MAX_FRAMES:
                    size += len(queue[0])
                    frames.append(queue.popleft())
                await self._send(pack(frames))


def unpack(message: bytes) -> list[bytes]:
    """The frames of one message, or ``FrameError`` (the channel is then closed)."""
    frames: list[bytes] = []
    at, end = 0, len(message)
    while at < end:
        if len(frames) >= MAX_FRAMES or end - at < HEAD.size:
            raise FrameError(f"a message holds at most {MAX_FRAMES} length-prefixed frames")
        (size,) = HEAD.unpack_from(message, at)
        at += HEAD.size
        if size > end - at:
            raise FrameError("a frame runs past the end of its message")
        frames.append(message[at : at + size])
        at += size
    return frames


def _split(frame: bytes, max_head: int) -> tuple[object, bytes]:
    if len(frame) < HEAD.size:
        raise FrameError("frame shorter than its head length")
    (size,) = HEAD.unpack_from(frame)
    if size > max_head or HEAD.size + size > len(frame):
        raise FrameError(f"frame head of {size} bytes (at most {max_head}, within the frame)")
    try:
        head = orjson.loads(frame[HEAD.size : HEAD.size + size])
    except orjson.JSONDecodeError as exc:
        raise FrameError("frame head is not JSON") from exc
    return head, frame[HEAD.size + size :]


def _frame_id(head: object) -> int:
    if not isinstance(head, list) or not head:
        raise FrameError("frame head must be a non-empty list")
    fid = head[0]
    if type(fid) is not int or not 0 <= fid <= MAX_FRAME_ID:
        raise FrameError("frame id must be an integer from 0 to 2**53-1")
    return fid


def encode_request(
    fid: int, method: str, path: str, headers: dict[str, str], body: bytes
) -> bytes:
    head = orjson.dumps([fid, method, path, [[k, v] for k, v in headers.items()]])
    return HEAD.pack(len(head)) + head + body


def decode_request(
    frame: bytes, max_head: int
) -> tuple[int, str, str, list[tuple[str, str]], bytes]:
    """(id, method, path, headers, body) of a peer's request frame, or ``FrameError``."""
    head, body = _split(frame, max_head)
    fid = _frame_id(head)
    assert isinstance(head, list)
    if len(head) != 4:
        raise FrameError("a request head is [id, method, path, headers]", fid)
    _, method, path, raw_headers = head
    if method not in METHODS:
        raise FrameError(f"method must be one of {', '.join(sorted(METHODS))}", fid)
    if not isinstance(path, str) or not path.startswith("/") or not path.isascii():
        raise FrameError("path must be an ASCII string starting with /", fid)
    if not isinstance(raw_headers, list) or len(raw_headers) > MAX_HEADERS:
        raise FrameError(f"headers must be a list of at most {MAX_HEADERS} pairs", fid)
    headers: list[tuple[str, str]] = []
    for pair in raw_headers:
        if not isinstance(pair, list) or len(pair) != 2 or not all(
            isinstance(part, str) and part.isascii() and part.isprintable() for part in pair
        ) or not pair[0] or " " in pair[0] or ":" in pair[0]:
            raise FrameError("each header must be a [name, value] pair of printable ASCII", fid)
        headers.append((pair[0].lower(), pair[1]))
    return fid, method, path, headers, body


def encode_answer(fid: int, status: int, content_type: str, body: bytes) -> bytes:
    head = orjson.dumps([fid, status, content_type])
    return HEAD.pack(len(head)) + head + body


def decode_answer(frame: bytes, max_head: int) -> tuple[int, int, str, bytes]:
    """(id, status, content type, body) of a peer's answer frame, or ``FrameError``."""
    head, body = _split(frame, max_head)
    fid = _frame_id(head)
    assert isinstance(head, list)
    if len(head) != 3:
        raise FrameError("an answer head is [id, status, content_type]", fid)
    _, status, content_type = head
    if type(status) is not int or not 100 <= status <= 599 or not isinstance(content_type, str):
        raise FrameError("an answer needs an HTTP status and a content type", fid)
    return fid, status, content_type, body


def peek_id(frame: bytes, max_head: int) -> int | None:
    """The id of a frame whose body we will not keep (too large), if its head is readable."""
    try:
        head, _ = _split(frame, max_head)
        return _frame_id(head)
    except FrameError:
        return None
