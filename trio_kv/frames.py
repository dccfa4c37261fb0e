"""The peer channel's wire format: HTTP-shaped requests and answers, several per message.

A channel opens with ``PREFACE`` and a hello message (the secret); the owner answers with a
welcome message (``{"status": 200}``, or an error status and text, then closes).  After that
each side sends messages: a 4-byte big-endian length, then the message.  A message is a
sequence of frames, each prefixed by its 4-byte big-endian length: the calls queued for a
peer go out together when the node goes idle (``outbox.py``), so under load one send and one
receive (and one wake-up on each side) carry many calls.  A frame is a 4-byte
big-endian head length, a JSON head, then the body as raw bytes (bodies are JSON already;
wrapping them in JSON again would cost a second encode per call).  Request head:
``[id, method, path, [[name, value], ...]]``; answer head: ``[id, status, content_type]``.
Frames come from the network: every field is checked here, before anything acts on it.
"""

from __future__ import annotations

import struct

import orjson
import trio

HEAD = struct.Struct(">I")
MAX_FRAME_ID = (1 << 53) - 1
MAX_HEADERS = 32
MAX_FRAMES = 1024  # per message: bounds the work one message can ask for
BATCH_BYTES = 1 << 20  # frames joined into one message up to this (a larger frame goes alone)
METHODS = frozenset({"GET", "PUT", "POST", "DELETE"})
PREFACE = b"TKV-CHANNEL/1\r\n\r\n"  # to an HTTP server, a whole (bad) request head
MAX_HELLO = 4096  # bytes of a hello or welcome message
RECEIVE_BYTES = 65536


class FrameError(ValueError):
    """A frame that is not of the shape we send; ``frame_id`` is set when the id was readable
    (the request can then be answered 400 instead of closing the connection)."""

    def __init__(self, message: str, frame_id: int | None = None) -> None:
        super().__init__(message)
        self.frame_id = frame_id


def pack(frames: list[bytes]) -> bytes:
    """One message on the wire: its length, then its length-prefixed frames."""
    body = b"".join(HEAD.pack(len(frame)) + frame for frame in frames)
    return HEAD.pack(len(body)) + body


class MessageReader:
    """Length-prefixed messages off a stream.  A message over the limit is read past, never
    held: the caller gets its first ``keep`` bytes and its size (or ``FrameError`` when it
    keeps nothing), so one huge message costs no more memory than a small one."""

    def __init__(self, stream: trio.abc.ReceiveStream, data: bytes = b"") -> None:
        self._stream = stream
        self._buffer = bytearray(data)
        # when bytes last arrived: a large answer still arriving is not a partition
        self.received_at = trio.current_time()

    async def _fill(self) -> bool:
        data = await self._stream.receive_some(RECEIVE_BYTES)
        self._buffer += data
        self.received_at = trio.current_time()
        return bool(data)

    async def receive(self, limit: int, keep: int = 0) -> tuple[bytes, int] | None:
        """(message, its size) or None at a clean end of the stream."""
        buffer = self._buffer
        while len(buffer) < HEAD.size:
            if not await self._fill():
                if buffer:
                    raise FrameError("the stream ended inside a message")
                return None
        (size,) = HEAD.unpack_from(buffer)
        end = HEAD.size + size
        if size > limit:
            if not keep:
                raise FrameError(f"a message of {size} bytes (at most {limit})")
            while len(buffer) < HEAD.size + min(keep, size):
                if not await self._fill():
                    raise FrameError("the stream ended inside a message")
            kept = bytes(buffer[HEAD.size : HEAD.size + min(keep, size)])
            while len(buffer) < end:  # read past the rest, holding at most one read of it
                end -= len(buffer)
                buffer.clear()
                if not await self._fill():
                    raise FrameError("the stream ended inside a message")
            del buffer[:end]
            return kept, size
        while len(buffer) < end:
            if not await self._fill():
                raise FrameError("the stream ended inside a message")
        message = bytes(buffer[HEAD.size : end])
        del buffer[:end]
        return message, size


def message(payload: object) -> bytes:
    """A hello or welcome message: JSON, length-prefixed."""
    body = orjson.dumps(payload)
    return HEAD.pack(len(body)) + body


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


GOAWAY_ID = 0  # a client's ids start at 1: an answer with this id is the owner's goodbye


def goaway(frames_read: int) -> bytes:
    """Said once the owner stops reading (it is shutting down): the first ``frames_read``
    frames of this channel are served or being served, and any later one never will be."""
    return encode_answer(GOAWAY_ID, 503, "goaway", orjson.dumps({"frames_read": frames_read}))
